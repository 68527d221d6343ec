"""Generated text → content blocks, for every tool-call format: pure text work, no model.

Each family's recorded output goes through `ContentAssembler` whole and in
small chunks (which split its markers), and both the finished blocks and the
streamed events are checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pensieved.conversation.content import BlockEvent, ContentAssembler, ThinkingMarkers
from pensieved.conversation.toolcalls import GENERIC, ToolFormat, family_format


def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": "", "parameters": schema}}


TOOLS = [
    _tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
    _tool("get_time", {"zone": {"type": "string"}}),
]
WEATHER = {"name": "get_weather", "input": {"city": "Zürich", "days": 3}}
TIME = {"name": "get_time", "input": {"zone": "Europe/Zurich"}}
LEAD = "Let me look that up.\n\n"
THINK = ThinkingMarkers("<think>", "</think>")
CHUNKS = pytest.mark.parametrize("chunk", [None, 1, 3, 7], ids=lambda c: f"chunk{c or '-all'}")

# (case, one call, two calls in one turn or None), as each family's template
# writes them: the get_weather call, then get_weather and get_time. The case
# names the family (`tool_format`), or a variant of it.
_JSON_ONE = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}\n</tool_call>'
)
_JSON_TWO = (
    f"{_JSON_ONE}\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"zone": "Europe/Zurich"}}\n</tool_call>'
)
_QWEN3_CODER_ONE = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
_GLM_ONE = (
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Zürich</arg_value>"
    "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
)
_KIMI_WEATHER = (
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Zürich", "days": 3}<|tool_call_end|>'
)
_FUNCTION_GEMMA_ONE = (
    "<start_function_call>call:get_weather{city:<escape>Zürich<escape>,days:3}<end_function_call>"
)
_GEMMA4_ONE = '<|tool_call>call:get_weather{city:<|"|>Zürich<|"|>,days:3}<tool_call|>'
_MINIMAX_WEATHER = (
    '<invoke name="get_weather">\n<parameter name="city">Zürich</parameter>\n'
    '<parameter name="days">3</parameter>\n</invoke>\n'
)
_LONGCAT_ONE = (
    "<longcat_tool_call>get_weather<longcat_arg_key>city</longcat_arg_key>"
    "<longcat_arg_value>Zürich</longcat_arg_value><longcat_arg_key>days</longcat_arg_key>"
    "<longcat_arg_value>3</longcat_arg_value></longcat_tool_call>"
)
RECORDED: list[tuple[str, str, str | None]] = [
    ("json_tools", _JSON_ONE, _JSON_TWO),
    ("generic", _JSON_ONE, _JSON_TWO),
    (
        "mistral_json",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}, '
        '{"name": "get_time", "arguments": {"zone": "Europe/Zurich"}}]',
    ),
    (
        "mistral_args",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 3}',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 3}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "Europe/Zurich"}',
    ),
    (
        "qwen3_coder",
        _QWEN3_CODER_ONE,
        f"{_QWEN3_CODER_ONE}\n<tool_call>\n<function=get_time>\n<parameter=zone>\n"
        "Europe/Zurich\n</parameter>\n</function>\n</tool_call>",
    ),
    (
        "glm47",
        _GLM_ONE,
        f"{_GLM_ONE}<tool_call>get_time<arg_key>zone</arg_key>"
        "<arg_value>Europe/Zurich</arg_value></tool_call>",
    ),
    (
        "kimi_k2",
        f"<|tool_calls_section_begin|>{_KIMI_WEATHER}<|tool_calls_section_end|>",
        f"<|tool_calls_section_begin|>{_KIMI_WEATHER}<|tool_call_begin|>functions.get_time:1"
        '<|tool_call_argument_begin|>{"zone": "Europe/Zurich"}<|tool_call_end|>'
        "<|tool_calls_section_end|>",
    ),
    (
        "function_gemma",
        _FUNCTION_GEMMA_ONE,
        f"{_FUNCTION_GEMMA_ONE}<start_function_call>call:get_time"
        "{zone:<escape>Europe/Zurich<escape>}<end_function_call>",
    ),
    (
        "gemma4",
        _GEMMA4_ONE,
        f'{_GEMMA4_ONE}<|tool_call>call:get_time{{zone:<|"|>Europe/Zurich<|"|>}}<tool_call|>',
    ),
    (
        "pythonic",
        '<|tool_call_start|>[get_weather(city="Zürich", days=3)]<|tool_call_end|>',
        '<|tool_call_start|>[get_weather(city="Zürich", days=3), '
        'get_time(zone="Europe/Zurich")]<|tool_call_end|>',
    ),
    (
        "minimax_m2",
        f"<minimax:tool_call>\n{_MINIMAX_WEATHER}</minimax:tool_call>",
        f'<minimax:tool_call>\n{_MINIMAX_WEATHER}<invoke name="get_time">\n'
        '<parameter name="zone">Europe/Zurich</parameter>\n</invoke>\n</minimax:tool_call>',
    ),
    (
        "longcat",
        _LONGCAT_ONE,
        f"{_LONGCAT_ONE}\n<longcat_tool_call>get_time<longcat_arg_key>zone</longcat_arg_key>"
        "<longcat_arg_value>Europe/Zurich</longcat_arg_value></longcat_tool_call>",
    ),
    # Llama 3's bare JSON object holds exactly one call.
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}',
        None,
    ),
]


def tool_format(case: str) -> ToolFormat:
    if case == "generic":
        return GENERIC
    return family_format("mistral" if case.startswith("mistral_") else case)


def assemble(assembler: ContentAssembler, output: str, chunk: int | None) -> list[BlockEvent]:
    """Feed `output` whole (chunk None) or `chunk` characters at a time, then finish."""
    size = chunk or len(output) or 1
    events: list[BlockEvent] = []
    for i in range(0, len(output), size):
        events += assembler.feed(output[i : i + size])
    return events + assembler.finish()


def check_events(events: list[BlockEvent], blocks: list[dict[str, Any]]) -> None:
    """The events are well formed, and replaying them rebuilds exactly `blocks`."""
    rebuilt: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    open_index: int | None = None
    for name, payload in events:
        assert payload["type"] == name
        if name == "content_block_start":
            assert open_index is None and payload["index"] == len(rebuilt)
            open_index, deltas = payload["index"], []
            rebuilt.append(dict(payload["content_block"]))
            continue
        assert open_index is not None and payload["index"] == open_index
        if name == "content_block_delta":
            deltas.append(payload["delta"])
            continue
        assert name == "content_block_stop"
        block, kinds = rebuilt[open_index], [d["type"] for d in deltas]
        if block["type"] == "text":
            assert block["text"] == "" and set(kinds) == {"text_delta"}
            block["text"] = "".join(d["text"] for d in deltas)
        elif block["type"] == "thinking":
            # The signature comes once, last, just before the block closes.
            assert block["thinking"] == "" and kinds[-1] == "signature_delta"
            assert set(kinds[:-1]) == {"thinking_delta"}
            block["thinking"] = "".join(d["thinking"] for d in deltas[:-1])
            block["signature"] = deltas[-1]["signature"]
        else:
            assert block["type"] == "tool_use" and block["input"] == {}
            assert kinds and set(kinds) == {"input_json_delta"}
            block["input"] = json.loads("".join(d["partial_json"] for d in deltas))
        open_index = None
    assert open_index is None
    assert rebuilt == blocks


def tool_uses(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    uses = [b for b in blocks if b["type"] == "tool_use"]
    assert all(b["id"].startswith("toolu_") for b in uses)
    assert len({b["id"] for b in uses}) == len(uses)
    return [{"name": b["name"], "input": b["input"]} for b in uses]


def assert_no_markers(blocks: list[dict[str, Any]], *markers: str) -> None:
    for block in blocks:
        if block["type"] == "text":
            for marker in filter(None, markers):
                assert marker not in block["text"]


def _recorded_turns() -> list[Any]:
    params = []
    for case, one, two in RECORDED:
        params.append(pytest.param(case, one, [WEATHER], id=f"{case}-one"))
        if two is not None:
            params.append(pytest.param(case, two, [WEATHER, TIME], id=f"{case}-two"))
    return params


@CHUNKS
@pytest.mark.parametrize(("family", "calls_text", "calls"), _recorded_turns())
def test_recorded_calls_become_tool_use_blocks_after_the_text(
    family: str, calls_text: str, calls: list[dict[str, Any]], chunk: int | None
) -> None:
    fmt = tool_format(family)
    assembler = ContentAssembler(tool_format=fmt, tools=TOOLS)
    events = assemble(assembler, LEAD + calls_text, chunk)
    blocks = assembler.blocks
    assert blocks[0] == {"type": "text", "text": LEAD, "citations": []}
    assert [b["type"] for b in blocks[1:]] == ["tool_use"] * len(calls)
    assert tool_uses(blocks) == calls
    assert assembler.calls == len(calls)
    check_events(events, blocks)
    assert_no_markers(blocks, fmt.start, fmt.end)


# A call the output ends inside: the argument value "Zürich" is cut to "Zür".
# (glm47's and longcat's parsers would read it as a call without that argument.)
_CUT = [pytest.param(case, one[: one.index("Zürich") + 3], id=case) for case, one, _ in RECORDED]


@CHUNKS
@pytest.mark.parametrize(("family", "cut"), _CUT)
def test_a_call_cut_short_inside_an_argument_comes_back_as_text(
    family: str, cut: str, chunk: int | None
) -> None:
    assembler = ContentAssembler(tool_format=tool_format(family), tools=TOOLS)
    events = assemble(assembler, LEAD + cut, chunk)
    assert assembler.blocks == [{"type": "text", "text": LEAD + cut, "citations": []}]
    assert assembler.calls == 0
    check_events(events, assembler.blocks)


MALFORMED = [
    ("not-json", "generic", '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'),
    ("unknown", "json_tools", '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'),
    (
        "not-an-object",
        "json_tools",
        '<tool_call>\n{"name": "get_weather", "arguments": "x"}\n</tool_call>',
    ),
    ("unknown", "mistral", "[TOOL_CALLS]launch[ARGS]{}"),
    ("unknown", "qwen3_coder", "<tool_call>\n<function=launch>\n</function>\n</tool_call>"),
    (
        "unknown",
        "kimi_k2",
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.launch:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
    ),
    ("unclosed-string", "gemma4", '<|tool_call>call:get_weather{city:<|"|>Zürich}<tool_call|>'),
    # One unknown name in a section returns the whole section as text.
    (
        "one-unknown",
        "pythonic",
        '<|tool_call_start|>[get_weather(city="Zürich"), launch()]<|tool_call_end|>',
    ),
    (
        "unknown",
        "minimax_m2",
        '<minimax:tool_call>\n<invoke name="launch">\n</invoke>\n</minimax:tool_call>',
    ),
    # Llama 3's marker is ordinary JSON: prose that quotes an object stays prose.
    ("prose", "llama3_json", 'The record reads {"name": "Ada", "role": "engineer"} in full.'),
]


@CHUNKS
@pytest.mark.parametrize(
    ("family", "output"), [pytest.param(f, o, id=f"{f}-{i}") for i, f, o in MALFORMED]
)
def test_unreadable_or_unknown_calls_come_back_as_text_with_nothing_dropped(
    family: str, output: str, chunk: int | None
) -> None:
    assembler = ContentAssembler(tool_format=tool_format(family), tools=TOOLS)
    events = assemble(assembler, "Sure. " + output, chunk)
    assert assembler.blocks == [{"type": "text", "text": "Sure. " + output, "citations": []}]
    assert assembler.calls == 0
    check_events(events, assembler.blocks)


@CHUNKS
def test_a_bad_call_does_not_swallow_the_good_call_after_it(chunk: int | None) -> None:
    bad = '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>\n'
    assembler = ContentAssembler(tool_format=GENERIC, tools=TOOLS)
    events = assemble(assembler, bad + _JSON_ONE, chunk)
    assert assembler.blocks[0] == {"type": "text", "text": bad, "citations": []}
    assert tool_uses(assembler.blocks) == [WEATHER]
    check_events(events, assembler.blocks)


def test_without_tools_the_call_syntax_is_plain_text() -> None:
    assembler = ContentAssembler(tool_format=GENERIC, tools=[])
    events = assemble(assembler, LEAD + _JSON_ONE, 3)
    assert assembler.blocks == [{"type": "text", "text": LEAD + _JSON_ONE, "citations": []}]
    check_events(events, assembler.blocks)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_constrained_arguments_stream_in_pieces_before_the_call_closes(chunk: int) -> None:
    output = LEAD + _JSON_TWO
    assembler = ContentAssembler(tool_format=GENERIC, tools=TOOLS, constrained=True)
    events: list[BlockEvent] = []
    first_start: int | None = None  # how much output was fed when the first call opened
    for i in range(0, len(output), chunk):
        events += assembler.feed(output[i : i + chunk])
        if first_start is None and any(
            p.get("content_block", {}).get("type") == "tool_use" for _, p in events
        ):
            first_start = i + chunk
    events += assembler.finish()
    assert tool_uses(assembler.blocks) == [WEATHER, TIME]
    check_events(events, assembler.blocks)
    assert first_start is not None and first_start < output.index(GENERIC.end)
    for index in (1, 2):
        pieces = [p for name, p in events if name == "content_block_delta" and p["index"] == index]
        assert len(pieces) > 1


# Several calls in one section (pythonic, minimax, kimi, mistral) included.
_PARALLEL = [pytest.param(case, two, id=case) for case, _, two in RECORDED if two is not None]


@CHUNKS
@pytest.mark.parametrize(("family", "calls_text"), _PARALLEL)
def test_single_call_keeps_only_the_first_call(
    family: str, calls_text: str, chunk: int | None
) -> None:
    assembler = ContentAssembler(tool_format=tool_format(family), tools=TOOLS, single_call=True)
    events = assemble(assembler, LEAD + calls_text, chunk)
    assert assembler.done and assembler.calls == 1
    assert [b["type"] for b in assembler.blocks] == ["text", "tool_use"]
    assert tool_uses(assembler.blocks) == [WEATHER]
    check_events(events, assembler.blocks)
    assert assembler.feed("More text.") == []


def test_single_call_is_done_as_soon_as_the_call_closes() -> None:
    assembler = ContentAssembler(tool_format=GENERIC, tools=TOOLS, single_call=True)
    events = assembler.feed(LEAD + _JSON_ONE)
    assert assembler.done
    assert events[-1][0] == "content_block_stop"
    assert assembler.feed("\n" + _JSON_ONE) == []


REASONING = "\nThe user asks about Zürich.\nget_weather answers that.\n"


def sign(thinking: str) -> str:
    return f"sig-{len(thinking)}"


@CHUNKS
@pytest.mark.parametrize("opened_by", ["template", "model"])
def test_thinking_comes_first_and_is_signed_before_it_closes(
    opened_by: str, chunk: int | None
) -> None:
    output = f"{REASONING}</think>\n\n{LEAD}{_JSON_ONE}"
    if opened_by == "model":
        output = THINK.start + output
    assembler = ContentAssembler(
        tool_format=GENERIC,
        tools=TOOLS,
        thinking=THINK,
        thinking_open=opened_by == "template",
        signer=sign,
    )
    events = assemble(assembler, output, chunk)
    blocks = assembler.blocks
    assert blocks[0] == {"type": "thinking", "thinking": REASONING, "signature": sign(REASONING)}
    assert blocks[1] == {"type": "text", "text": LEAD, "citations": []}
    assert tool_uses(blocks) == [WEATHER]
    check_events(events, blocks)
    assert_no_markers(blocks, THINK.start, THINK.end, GENERIC.start, GENERIC.end)


def test_a_think_marker_after_text_is_text_however_the_output_is_chunked() -> None:
    output = "Hello <think>x</think> bye"
    for chunk in (1, None):
        assembler = ContentAssembler(tool_format=None, tools=[], thinking=THINK)
        assemble(assembler, output, chunk)
        assert assembler.blocks == [{"type": "text", "text": output, "citations": []}]


@pytest.mark.parametrize(
    ("family", "output", "held"),
    [
        ("generic", "Answer <tool_c", "<tool_c"),
        ("generic", "<thi", "<thi"),
        ("gemma4", "Answer <|tool_", "<|tool_"),
        ("kimi_k2", "Answer <|tool_calls_sec", "<|tool_calls_sec"),
        ("mistral", "Answer [TOOL_", "[TOOL_"),
        ("llama3_json", 'Answer {"na', '{"na'),
    ],
    ids=["generic", "think", "gemma4", "kimi_k2", "mistral", "llama3_json"],
)
def test_a_partial_marker_at_the_end_is_held_then_flushed_as_text(
    family: str, output: str, held: str
) -> None:
    assembler = ContentAssembler(tool_format=tool_format(family), tools=TOOLS, thinking=THINK)
    streamed = assembler.feed(output)
    sent = "".join(p["delta"]["text"] for n, p in streamed if n == "content_block_delta")
    assert sent == output[: -len(held)]
    events = streamed + assembler.finish()
    assert assembler.blocks == [{"type": "text", "text": output, "citations": []}]
    check_events(events, assembler.blocks)
