"""Anthropic request → chat turns, and text stop matching: pure functions, no model."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pensieved.conversation.attachments import IMAGE_PLACEHOLDER
from pensieved.conversation.prompt import shown_tools, to_chat_messages
from pensieved.conversation.stops import StopMatcher
from pensieved.wire.decode import decode_request
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import MessagesRequest
from tests.documents import pdf_block
from tests.requests import request_of


def request(**fields: object) -> MessagesRequest:
    return request_of({"model": "m", "max_tokens": 5, **fields})


def test_system_blocks_lead_and_same_role_turns_merge() -> None:
    turns = to_chat_messages(
        request(
            system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            messages=[
                {"role": "user", "content": "one"},
                {"role": "user", "content": [{"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "three"},
            ],
        ),
        "m",
    )
    assert turns == [
        {"role": "system", "content": "A\nB"},
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "three"},
    ]


def test_inline_system_turns_stay_in_place() -> None:
    turns = to_chat_messages(
        request(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "note"},
                {"role": "user", "content": "again"},
            ]
        ),
        "m",
    )
    assert [t["role"] for t in turns] == ["user", "system", "user"]


TOOL_ROUND_TRIP = [
    {"role": "user", "content": "list files"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "ls",
                "input": {"path": ".", "all": True},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "pwd", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [
                    {"type": "text", "text": "a.py"},
                    {"type": "image", "source": {"type": "base64", "data": "AA=="}},
                ],
            },
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "/x", "is_error": True},
            {"type": "text", "text": "and now?"},
        ],
    },
]


def test_tool_history_in_the_generic_text_format() -> None:
    turns = to_chat_messages(request(messages=TOOL_ROUND_TRIP), "m")
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert "hmm" not in turns[1]["content"]  # earlier thinking is dropped
    assert turns[1]["content"].startswith("Let me look.")
    # Inputs are re-serialised with their keys in the order received.
    assert '{"name": "ls", "arguments": {"path": ".", "all": true}}' in turns[1]["content"]
    assert '<tool_response name="ls">\na.py\n[image omitted' in turns[2]["content"]
    assert '<tool_response name="pwd" is_error="true">\n/x\n' in turns[2]["content"]
    assert turns[2]["content"].endswith("and now?")


def test_tool_history_for_templates_with_tool_support() -> None:
    turns = to_chat_messages(request(messages=TOOL_ROUND_TRIP), "m", native_tools=True)
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "tool", "user"]
    assert turns[1]["content"] == "Let me look."
    assert turns[1]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "ls", "arguments": {"path": ".", "all": True}},
        },
        {"id": "toolu_2", "type": "function", "function": {"name": "pwd", "arguments": {}}},
    ]
    assert turns[2] == {
        "role": "tool",
        "tool_call_id": "toolu_1",
        "name": "ls",
        "content": f"a.py\n{IMAGE_PLACEHOLDER}",
    }
    assert turns[3]["content"] == "Error: /x"
    assert turns[4] == {"role": "user", "content": "and now?"}


def user_turn(*blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": "what is this?"}]}]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}


def test_images_become_a_placeholder_in_user_turns_and_tool_results() -> None:
    turns = to_chat_messages(request(messages=user_turn(IMAGE)), "m")
    assert turns == [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nwhat is this?"}]
    assert "cannot see images" in IMAGE_PLACEHOLDER
    # In a tool result (TOOL_ROUND_TRIP's first result holds one) too.
    turns = to_chat_messages(request(messages=TOOL_ROUND_TRIP), "m", native_tools=True)
    assert turns[2]["content"] == f"a.py\n{IMAGE_PLACEHOLDER}"


def test_images_are_refused_naming_the_block_when_the_model_says_reject() -> None:
    with pytest.raises(InvalidRequest, match=r"^messages\.0\.content\.0: .*image input"):
        to_chat_messages(request(messages=user_turn(IMAGE)), "m", images="reject")
    with pytest.raises(InvalidRequest, match=r"^messages\.2\.content\.0\.content\.1: .*image"):
        to_chat_messages(request(messages=TOOL_ROUND_TRIP), "m", images="reject")


def document(source: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"type": "document", "source": source, **fields}


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            document(
                {"type": "text", "media_type": "text/plain", "data": "The sky is green."},
                title="Notes",
                context="From the wiki",
            ),
            "[document: Notes]\nFrom the wiki\nThe sky is green.",
        ),
        (
            document(
                {
                    "type": "content",
                    "content": [
                        {"type": "text", "text": "part one"},
                        IMAGE,
                        {"type": "text", "text": "two"},
                    ],
                }
            ),
            f"[document]\npart one\n{IMAGE_PLACEHOLDER}\ntwo",
        ),
        (document({"type": "content", "content": "plain"}), "[document]\nplain"),
        (
            document(
                {
                    "type": "base64",
                    "media_type": "text/plain",
                    "data": base64.b64encode("héllo".encode()).decode(),
                }
            ),
            "[document]\nhéllo",
        ),
        (
            pdf_block(["Quarterly report", "The answer is 42 (exactly)."], title="Q3"),
            "[document: Q3]\nQuarterly report\nThe answer is 42 (exactly).",
        ),
        (
            document({"type": "base64", "media_type": "application/pdf", "data": "bm90IGEgcGRm"}),
            "[document]\n[PDF omitted: its text could not be extracted]",
        ),
        (
            document({"type": "url", "url": "https://example.com/a.pdf"}),
            "[document]\n[document omitted: https://example.com/a.pdf is a URL; "
            "this server fetches none]",
        ),
        (
            document({"type": "file", "file_id": "file_1"}),
            "[document]\n[document omitted: it is in Anthropic's Files API, which this "
            "server cannot read]",
        ),
    ],
)
def test_documents_are_inlined_as_text(block: dict[str, Any], expected: str) -> None:
    turns = to_chat_messages(request(messages=user_turn(block)), "m")
    assert turns == [{"role": "user", "content": f"{expected}\nwhat is this?"}]


def test_search_results_are_inlined_with_their_source_and_title() -> None:
    result = {
        "type": "search_result",
        "source": "https://docs.example.com/install",
        "title": "Installing",
        "content": [{"type": "text", "text": "Run make."}, {"type": "text", "text": "Done."}],
    }
    turns = to_chat_messages(request(messages=user_turn(result)), "m")
    assert turns[0]["content"] == (
        "[search result: Installing]\nSource: https://docs.example.com/install\n"
        "Run make.\nDone.\nwhat is this?"
    )


def tool(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "input_schema": {"type": "object"}, **fields}


SEARCHED = [
    {"role": "user", "content": "find a tool for the weather"},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_s", "name": "ToolSearch", "input": {}}],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_s",
                "content": [{"type": "tool_reference", "tool_name": "Weather"}],
            }
        ],
    },
]


def test_deferred_tools_stay_out_until_a_tool_reference_names_them() -> None:
    tools = [
        tool("ToolSearch"),
        tool("Weather", defer_loading=True),
        tool("Stocks", defer_loading=True),
    ]
    before = request(messages=SEARCHED[:1], tools=tools)
    assert [t.name for t in shown_tools(before)] == ["ToolSearch"]
    after = request(messages=SEARCHED, tools=tools)
    assert [t.name for t in shown_tools(after)] == ["ToolSearch", "Weather"]
    # A forced deferred tool is shown: the model must be able to call it.
    forced = request(
        messages=SEARCHED[:1], tools=tools, tool_choice={"type": "tool", "name": "Stocks"}
    )
    assert [t.name for t in shown_tools(forced)] == ["ToolSearch", "Stocks"]
    # The reference itself reads as a line naming the tool.
    turns = to_chat_messages(after, "m")
    assert '<tool_response name="ToolSearch">\n[tool available: Weather]' in turns[-1]["content"]


def test_the_cloud_tool_search_result_loads_tools_too() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "server_tool_use",
                    "id": "srvtoolu_1",
                    "name": "tool_search_tool_regex",
                    "input": {"query": "weather"},
                },
                {
                    "type": "tool_search_tool_result",
                    "tool_use_id": "srvtoolu_1",
                    "content": {
                        "type": "tool_search_tool_search_result",
                        "tool_references": [{"type": "tool_reference", "tool_name": "Weather"}],
                    },
                },
                {"type": "text", "text": "Found it."},
            ],
        },
        {"role": "user", "content": "go on"},
    ]
    loaded = request(messages=messages, tools=[tool("Weather", defer_loading=True)])
    assert [t.name for t in shown_tools(loaded)] == ["Weather"]
    assert "[tools available: Weather]" in to_chat_messages(loaded, "m")[1]["content"]


def decoded(messages: list[dict[str, Any]], **fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 5, "messages": messages, **fields}
    return decode_request(json.dumps(body).encode(), MessagesRequest)


CLOUD_HISTORY = [
    {
        "role": "user",
        "content": [
            {"type": "container_upload", "file_id": "file_9"},
            {"type": "text", "text": "look things up"},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "compaction", "content": "Summary: the user wants the weather in Oslo."},
            {"type": "redacted_thinking", "data": "EuYBCkQYAiJA"},
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": "oslo weather"},
            },
            {
                "type": "web_search_tool_result",
                "tool_use_id": "srvtoolu_1",
                "content": [
                    {
                        "type": "web_search_result",
                        "title": "Oslo forecast",
                        "url": "https://yr.no/oslo",
                        "encrypted_content": "x",
                    },
                ],
            },
            {
                "type": "server_tool_use",
                "id": "srvtoolu_2",
                "name": "web_fetch",
                "input": {"url": "https://yr.no/oslo"},
            },
            {
                "type": "web_fetch_tool_result",
                "tool_use_id": "srvtoolu_2",
                "content": {
                    "type": "web_fetch_result",
                    "url": "https://yr.no/oslo",
                    "content": {
                        "type": "document",
                        "source": {
                            "type": "text",
                            "media_type": "text/plain",
                            "data": "Rain, 9 degrees.",
                        },
                    },
                },
            },
            {
                "type": "code_execution_tool_result",
                "tool_use_id": "srvtoolu_3",
                "content": {
                    "type": "code_execution_result",
                    "stdout": "9\n",
                    "stderr": "",
                    "return_code": 0,
                    "content": [],
                },
            },
            {
                "type": "bash_code_execution_tool_result",
                "tool_use_id": "srvtoolu_4",
                "content": {
                    "type": "bash_code_execution_tool_result_error",
                    "error_code": "unavailable",
                },
            },
            {
                "type": "text_editor_code_execution_tool_result",
                "tool_use_id": "srvtoolu_5",
                "content": {
                    "type": "text_editor_code_execution_view_result",
                    "content": "line one",
                    "file_type": "text",
                },
            },
            {
                "type": "mcp_tool_use",
                "id": "mcptoolu_1",
                "name": "lookup",
                "server_name": "wiki",
                "input": {"q": "Oslo"},
            },
            {
                "type": "mcp_tool_result",
                "tool_use_id": "mcptoolu_1",
                "content": [{"type": "text", "text": "Capital of Norway"}],
            },
            {"type": "fallback", "from": {"model": "a"}, "to": {"model": "b"}},
            {"type": "a_block_from_the_future", "payload": 1},
            {"type": "text", "text": "It rains in Oslo."},
        ],
    },
    {"role": "user", "content": "thanks, and tomorrow?"},
]


def test_cloud_history_is_rendered_as_short_text_never_refused() -> None:
    turns = to_chat_messages(decoded(CLOUD_HISTORY), "m")
    assert turns[0] == {
        "role": "user",
        "content": "[file file_9 uploaded to the code execution container]\nlook things up",
    }
    assert turns[1]["content"].split("\n") == [
        "Summary: the user wants the weather in Oslo.",
        '[server tool call web_search: {"query":"oslo weather"}]',
        "[web search results]",
        "- Oslo forecast (https://yr.no/oslo)",
        '[server tool call web_fetch: {"url":"https://yr.no/oslo"}]',
        "[web fetch of https://yr.no/oslo]",
        "Rain, 9 degrees.",
        "[code execution: return code 0]",
        "9",
        "",
        "[bash code execution failed: unavailable]",
        "[text editor code execution]",
        "line one",
        '[MCP tool call wiki.lookup: {"q":"Oslo"}]',
        "[MCP tool result]",
        "Capital of Norway",
        "It rains in Oslo.",
    ]
    assert "EuYBCkQYAiJA" not in str(turns)  # redacted thinking is dropped


def test_unknown_block_types_are_dropped_from_history_but_refused_from_the_user() -> None:
    only_unknown = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "a_block_from_the_future"}]},
        {"role": "user", "content": "again"},
    ]
    # The emptied assistant turn goes: the two user turns read as one.
    assert to_chat_messages(decoded(only_unknown), "m") == [
        {"role": "user", "content": "hi\n\nagain"}
    ]
    tool_result_part = [
        *SEARCHED[:2],
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_s",
                    "content": [
                        {"type": "browser_state", "tabs": []},
                        {"type": "text", "text": "ok"},
                    ],
                }
            ],
        },
    ]
    assert to_chat_messages(decoded(tool_result_part), "m")[-1]["content"].endswith(
        "ok\n</tool_response>"
    )
    with pytest.raises(InvalidRequest, match=r"^messages\.0\.content\.0\.type: Invalid value"):
        decoded([{"role": "user", "content": [{"type": "a_block_from_the_future"}]}])


CAPTURES = sorted(Path(__file__).parents[2].glob("shared/claude-code/*.jsonl"))


@pytest.mark.skipif(not CAPTURES, reason="no Claude Code captures beside the repository")
def test_every_claude_code_request_is_accepted_and_renders() -> None:
    count = 0
    for capture in CAPTURES:
        for line in capture.read_text().splitlines():
            body = json.loads(line).get("body")
            if not isinstance(body, dict):
                continue  # the HEAD probe
            parsed = decode_request(json.dumps(body).encode(), MessagesRequest)
            for native in (False, True):
                turns = to_chat_messages(parsed, "m", native_tools=native)
                assert turns[-1]["role"] in {"user", "system", "tool"}
            count += 1
    assert count >= 20


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "matched"),
    [
        (["Hello", " wor", "ld END", " tail"], ["END"], "Hello world ", "END"),
        (["ab", "c"], ["bcd"], "abc", None),  # held back, then flushed
        (["x</", "stop>y"], ["</stop>"], "x", "</stop>"),
        (["one two"], ["two", "one"], "", "one"),  # the earliest match wins
        (["no stops"], [], "no stops", None),
        (["ab", "cd"], ["abcd", "bc"], "a", "bc"),  # the first one complete ends it
        (["abcd"], ["abcd", "bc"], "a", "bc"),  # however the text was split into tokens
        (["xx", "ab", "ab", "c"], ["ababc"], "xx", "ababc"),  # overlapping starts
        (["aab"], ["ab", "aab"], "", "aab"),  # ending together: the one that began first
        (["a", "b"], ["b", "b"], "a", "b"),  # duplicates
    ],
)
def test_stop_matcher(
    pieces: list[str], stops: list[str], emitted: str, matched: str | None
) -> None:
    matcher = StopMatcher(stops)
    out = ""
    found = None
    for piece in pieces:
        text, found = matcher.feed(piece)
        out += text
        if found:
            break
    if found is None:
        out += matcher.flush()
    assert (out, found) == (emitted, matched)


def test_stop_matcher_never_emits_a_partial_stop() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", None)
    assert matcher.feed("O") == ("", None)
    assert matcher.feed("X") == ("STOX", None)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
LOOSE_KEYS = st.sampled_from(
    [
        "type",
        "url",
        "content",
        "source",
        "data",
        "media_type",
        "tool_references",
        "stdout",
        "error_code",
    ]
)
LOOSE = JSON | st.dictionaries(
    LOOSE_KEYS,
    JSON
    | st.sampled_from(
        [
            "web_fetch_result",
            "base64",
            "text",
            "content",
            "url",
            "file",
            "application/pdf",
            "text/plain",
        ]
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    loose=LOOSE,
    kind=st.sampled_from(
        [
            "web_search_tool_result",
            "web_fetch_tool_result",
            "code_execution_tool_result",
            "bash_code_execution_tool_result",
            "text_editor_code_execution_tool_result",
            "tool_search_tool_result",
        ]
    ),
)
def test_cloud_history_of_any_shape_renders_without_failing(loose: Any, kind: str) -> None:
    """Their inner shapes are read loosely: whatever they hold, rendering does not fail."""
    messages = [
        {
            "role": "user",
            "content": [document(loose if isinstance(loose, dict) else {}), text_block("?")],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "server_tool_use", "id": "s", "name": "x", "input": loose},
                {"type": kind, "tool_use_id": "s", "content": loose},
                {"type": "document", "source": loose},
            ],
        },
        {"role": "user", "content": "next"},
    ]
    parsed = decoded(messages, tools=[tool("T", defer_loading=True)])
    for native in (False, True):
        turns = to_chat_messages(parsed, "m", native_tools=native)
        assert turns[-1] == {"role": "user", "content": "next"}
    shown_tools(parsed)


def text_block(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}
