"""Every block type a client sends, against a real daemon through the official SDK.

A text-only model is never bricked by content it cannot use: images become a
placeholder, documents and search results text, the cloud's history short
text. What a request asks for now and cannot be done (server tools, MCP
servers) is a 400 in the API's words, and so is what the API itself refuses.

The models are tiny and random, so what they answer is noise: prompts are
checked through `count_tokens`, which counts exactly what generation prefills
(a block rendered as text counts the same as that text sent as text).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from pensieved.config import ConfigError, parse_config
from pensieved.conversation.attachments import IMAGE_PLACEHOLDER
from pensieved.paths import default_paths
from pensieved.wire.client_tools import (
    BASH_DESCRIPTION,
    BASH_SCHEMA,
    MEMORY_DESCRIPTION,
    MEMORY_SCHEMA,
)
from tests.daemon import Daemon, running_daemon
from tests.documents import pdf_block
from tests.models import HERMES_TEMPLATE, build_tiny_model


@pytest.fixture(scope="module")
def daemon(
    smollm_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """SmolLM2's template (generic tool format), a Qwen-style one (native tool turns),
    and a model configured to refuse images."""
    hermes = build_tiny_model(
        tmp_path_factory.mktemp("models") / "hermes", smollm_dir, chat_template=HERMES_TEMPLATE
    )
    config = {
        "models": {
            "tiny": {"source": str(tiny_dir), "default": True, "context_length": 4096},
            "hermes": {"source": str(hermes), "context_length": 4096},
            "tiny-reject": {"source": str(tiny_dir), "context_length": 4096, "images": "reject"},
        }
    }
    yield from running_daemon(tmp_path_factory.mktemp("content-daemon"), config)


def count(daemon: Daemon, messages: list[dict[str, Any]], **fields: Any) -> int:
    fields.setdefault("model", "tiny")
    result = daemon.client().messages.count_tokens(messages=messages, **fields)
    return result.input_tokens


def reply(daemon: Daemon, messages: list[dict[str, Any]], **fields: Any) -> Any:
    fields.setdefault("model", "tiny")
    fields.setdefault("max_tokens", 8)
    message = daemon.client().messages.create(messages=messages, **fields)
    assert message.stop_reason in {"end_turn", "max_tokens"}
    return message


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


IMAGE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
}
QUESTION = text("What is in this screenshot?")


# -- images -------------------------------------------------------------------


def test_an_image_in_a_user_turn_is_a_placeholder_and_the_next_turn_works(
    daemon: Daemon,
) -> None:
    first = [{"role": "user", "content": [IMAGE, QUESTION]}]
    assert count(daemon, first) == count(
        daemon, [{"role": "user", "content": [text(IMAGE_PLACEHOLDER), QUESTION]}]
    )
    reply(daemon, first)
    # Claude Code keeps the image in the history: the next turn must work too.
    second = [
        *first,
        {"role": "assistant", "content": [text("It shows a terminal.")]},
        {"role": "user", "content": "And what does it say?"},
    ]
    reply(daemon, second)
    with daemon.client().messages.stream(model="tiny", max_tokens=8, messages=second) as stream:
        assert stream.get_final_message().stop_reason in {"end_turn", "max_tokens"}


SCREENSHOT_TOOL = {
    "name": "screenshot",
    "description": "Capture the screen.",
    "input_schema": {"type": "object", "properties": {}},
}


def tool_round(result_content: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Take a screenshot."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_shot", "name": "screenshot", "input": {}}
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_shot", "content": result_content}
            ],
        },
    ]


@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_an_image_in_a_tool_result_is_a_placeholder(daemon: Daemon, model: str) -> None:
    with_image = tool_round([text("Saved shot.png"), IMAGE])
    as_text = tool_round([text("Saved shot.png"), text(IMAGE_PLACEHOLDER)])
    tools = [SCREENSHOT_TOOL]
    assert count(daemon, with_image, model=model, tools=tools) == count(
        daemon, as_text, model=model, tools=tools
    )
    reply(daemon, with_image, model=model, tools=tools)
    later = [
        *with_image,
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks."},
    ]
    reply(daemon, later, model=model, tools=tools)


def test_a_model_configured_to_reject_images_answers_400(daemon: Daemon) -> None:
    client = daemon.client()
    messages = [{"role": "user", "content": [IMAGE, QUESTION]}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny-reject", max_tokens=8, messages=messages)
    assert caught.value.status_code == 400
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        "messages.0.content.0: model 'tiny-reject' is text-only and does not accept image input"
    )
    with pytest.raises(anthropic.BadRequestError, match="image input"):
        client.messages.count_tokens(model="tiny-reject", messages=messages)
    # The same model takes text.
    reply(daemon, [{"role": "user", "content": "Hello"}], model="tiny-reject")


def test_the_images_setting_is_validated() -> None:
    table = {"models": {"m": {"source": "/m", "images": "describe"}}}
    with pytest.raises(
        ConfigError, match=r"models\.m\.images: expected one of placeholder, reject"
    ):
        parse_config(table, default_paths())
    table["models"]["m"]["images"] = "reject"
    assert parse_config(table, default_paths()).models[0].images == "reject"
    assert parse_config({}, default_paths()).default_model.images == "placeholder"


# -- documents and search results ----------------------------------------------


def test_pdf_text_reaches_the_prompt(daemon: Daemon) -> None:
    lines = ["Pensieve quarterly report", "Revenue grew by 42 percent."]
    pdf = [{"role": "user", "content": [pdf_block(lines, title="Q3"), text("Summarize it.")]}]
    same_as_text = [
        {
            "role": "user",
            "content": [text("[document: Q3]\n" + "\n".join(lines)), text("Summarize it.")],
        }
    ]
    assert count(daemon, pdf) == count(daemon, same_as_text)
    reply(daemon, pdf)


def test_text_documents_and_search_results_are_inlined(daemon: Daemon) -> None:
    blocks = [
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "Tea is at four."},
            "title": "Rules",
        },
        {
            "type": "search_result",
            "source": "https://example.com/tea",
            "title": "Tea times",
            "content": [text("Four o'clock.")],
        },
        QUESTION,
    ]
    inlined = [
        text("[document: Rules]\nTea is at four."),
        text("[search result: Tea times]\nSource: https://example.com/tea\nFour o'clock."),
        QUESTION,
    ]
    assert count(daemon, [{"role": "user", "content": blocks}]) == count(
        daemon, [{"role": "user", "content": inlined}]
    )
    reply(daemon, [{"role": "user", "content": blocks}])


# -- tool search ----------------------------------------------------------------

WEATHER = {
    "name": "Weather",
    "description": "The weather forecast for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOL_SEARCH = {
    "name": "ToolSearch",
    "description": "Find a tool by keywords.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}


def searched(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_search",
                    "name": "ToolSearch",
                    "input": {"query": "weather"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_search", "content": content}],
        },
    ]


@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_deferred_tools_load_when_a_tool_reference_names_them(daemon: Daemon, model: str) -> None:
    deferred = [TOOL_SEARCH, {**WEATHER, "defer_loading": True}]
    ask = searched([])[:1]
    # Deferred and not yet named: it costs no context.
    assert count(daemon, ask, model=model, tools=deferred) == count(
        daemon, ask, model=model, tools=[TOOL_SEARCH]
    )
    # ToolSearch answers with a tool_reference: from then on it is in the prompt.
    found = searched([{"type": "tool_reference", "tool_name": "Weather"}])
    loaded = count(daemon, found, model=model, tools=deferred)
    assert loaded == count(
        daemon,
        searched([text("[tool available: Weather]")]),
        model=model,
        tools=[TOOL_SEARCH, WEATHER],
    )
    assert loaded > count(daemon, found, model=model, tools=[TOOL_SEARCH])
    reply(daemon, found, model=model, tools=deferred)


# -- history only the cloud produces ----------------------------------------------

CLOUD_TURN = [
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
                "encrypted_content": "abc",
                "page_age": None,
            }
        ],
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
        "is_error": False,
        "content": [text("Capital of Norway")],
    },
    {"type": "compaction", "content": "Earlier: the user lives in Oslo."},
    {"type": "a_block_type_from_the_future", "data": {"x": 1}},
    text("It will rain."),
]
CLOUD_TURN_AS_TEXT = "\n".join(
    [
        '[server tool call web_search: {"query":"oslo weather"}]',
        "[web search results]",
        "- Oslo forecast (https://yr.no/oslo)",
        '[MCP tool call wiki.lookup: {"q":"Oslo"}]',
        "[MCP tool result]",
        "Capital of Norway",
        "Earlier: the user lives in Oslo.",
        "It will rain.",
    ]
)


def test_a_conversation_begun_in_the_cloud_continues_here(daemon: Daemon) -> None:
    def conversation(turn: Any) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": turn},
            {"role": "user", "content": "And tomorrow?"},
        ]

    assert count(daemon, conversation(CLOUD_TURN)) == count(
        daemon, conversation(CLOUD_TURN_AS_TEXT)
    )
    reply(daemon, conversation(CLOUD_TURN))


def test_server_tools_and_mcp_servers_asked_for_now_are_a_400(daemon: Daemon) -> None:
    client = daemon.client()
    ask = [{"role": "user", "content": "Search the web."}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="tiny",
            max_tokens=8,
            messages=ask,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    message = caught.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith(
        "tools.0: Input tag 'web_search_20250305' found using 'type' does not match any of "
        "the expected tags: 'bash_20241022', 'bash_20250124', "
    )
    for server_tool in (
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
        {"type": "computer_toolset_20260801"},
    ):
        with pytest.raises(anthropic.BadRequestError, match=server_tool["type"]):
            client.messages.count_tokens(model="tiny", messages=ask, tools=[server_tool])  # type: ignore[list-item]
    with pytest.raises(anthropic.BadRequestError, match=r"^.*mcp_servers: MCP connector"):
        client.messages.create(
            model="tiny",
            max_tokens=8,
            messages=ask,
            extra_body={
                "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]
            },
        )


# -- Anthropic-defined tools the client runs ----------------------------------------

CLIENT_TOOLS = [
    {"type": "bash_20250124", "name": "bash"},
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    {"type": "text_editor_20250124", "name": "str_replace_editor"},
    {"type": "memory_20250818", "name": "memory"},
    {
        "type": "computer_20251124",
        "name": "computer",
        "display_width_px": 1280,
        "display_height_px": 800,
        "enable_zoom": True,
    },
]


@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_client_tool_types_are_shown_with_their_documented_schemas(
    daemon: Daemon, model: str
) -> None:
    ask = [{"role": "user", "content": "List the files, then remember what you saw."}]
    typed = [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "memory_20250818", "name": "memory"},
    ]
    spelled_out = [
        {"name": "bash", "description": BASH_DESCRIPTION, "input_schema": BASH_SCHEMA},
        {"name": "memory", "description": MEMORY_DESCRIPTION, "input_schema": MEMORY_SCHEMA},
    ]
    assert count(daemon, ask, model=model, tools=typed) == count(
        daemon, ask, model=model, tools=spelled_out
    )
    bare = count(daemon, ask, model=model)
    shown = count(daemon, ask, model=model, tools=CLIENT_TOOLS)
    assert shown > bare + 500  # five full schemas
    reply(daemon, ask, model=model, tools=CLIENT_TOOLS)
    # A round trip through one of them.
    used = [
        *ask,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_ls", "name": "bash", "input": {"command": "ls"}}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_ls", "content": "a.py"}],
        },
    ]
    reply(daemon, used, model=model, tools=CLIENT_TOOLS)


# -- turns merged as the API merges them --------------------------------------------

TWO_CALLS = {
    "role": "assistant",
    "content": [
        {"type": "tool_use", "id": "toolu_a", "name": "screenshot", "input": {}},
        {"type": "tool_use", "id": "toolu_b", "name": "screenshot", "input": {}},
    ],
}


def result(tool_use_id: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": "ok"}


@pytest.mark.parametrize(
    "answers",
    [
        # Results split over two user turns.
        [
            {"role": "user", "content": [result("toolu_a")]},
            {"role": "user", "content": [result("toolu_b")]},
        ],
        # Text in one user turn, the results in the next.
        [
            {"role": "user", "content": "Here they are."},
            {"role": "user", "content": [result("toolu_a"), result("toolu_b")]},
        ],
    ],
)
@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_consecutive_user_turns_are_merged_not_refused(
    daemon: Daemon, answers: list[dict[str, Any]], model: str
) -> None:
    messages = [{"role": "user", "content": "Two screenshots."}, TWO_CALLS, *answers]
    reply(daemon, messages, model=model, tools=[SCREENSHOT_TOOL])


# -- thinking and max_tokens values Claude Code and the SDKs send ------------------


@pytest.mark.parametrize(
    "thinking",
    [
        {"type": "between_tools"},
        {"type": "adaptive", "display": "omitted"},
        {"type": "adaptive", "display": "a-future-mode"},
        {"type": "enabled", "budget_tokens": 1024, "display": "summarized"},
    ],
)
def test_thinking_display_and_between_tools_are_accepted(
    daemon: Daemon, thinking: dict[str, Any]
) -> None:
    ask = [{"role": "user", "content": "Hi"}]
    assert count(daemon, ask, thinking=thinking) > 0
    reply(daemon, ask, thinking=thinking, max_tokens=1100 if "budget_tokens" in thinking else 8)


def test_max_tokens_zero_passes_validation(daemon: Daemon) -> None:
    with daemon.http() as http:
        response = http.post(
            "/v1/messages",
            json={
                "model": "tiny",
                "max_tokens": 0,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["output_tokens"] == 0


# -- what the API refuses, in its words ---------------------------------------------

CALL = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "toolu_a", "name": "screenshot", "input": {}}],
}
REFUSED = [
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "?"},
        ],
        "messages.1: all messages must have non-empty content except for the optional final "
        "assistant message",
    ),
    (
        [{"role": "user", "content": []}],
        "messages.0: all messages must have non-empty content except for the optional final "
        "assistant message",
    ),
    (
        [{"role": "user", "content": [text("Hi"), text("")]}],
        "messages.0.content.1.text: text content blocks must be non-empty",
    ),
    (
        [{"role": "user", "content": [text(" \n\t")]}],
        "messages.0.content.0.text: text content blocks must contain non-whitespace text",
    ),
    (
        [{"role": "user", "content": "   "}],
        "messages.0.content: text content blocks must contain non-whitespace text",
    ),
    (
        [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "Roses "}],
        "final assistant content cannot end with trailing whitespace",
    ),
    (
        [
            {"role": "user", "content": "Code?"},
            {"role": "assistant", "content": [text("def f():\n    ")]},
        ],
        "final assistant content cannot end with trailing whitespace",
    ),
    (
        [{"role": "user", "content": "Shot?"}, CALL, {"role": "user", "content": "Well?"}],
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: "
        "toolu_a. Each `tool_use` block must have a corresponding `tool_result` block in the "
        "next message.",
    ),
    (
        [
            {"role": "user", "content": "Two?"},
            TWO_CALLS,
            {"role": "user", "content": [result("toolu_b")]},
        ],
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: "
        "toolu_a. Each `tool_use` block must have a corresponding `tool_result` block in the "
        "next message.",
    ),
]


@pytest.mark.parametrize(("messages", "expected"), REFUSED)
def test_refused_content_gets_the_apis_own_words(
    daemon: Daemon, messages: list[dict[str, Any]], expected: str
) -> None:
    client = daemon.client()
    for send in (
        lambda: client.messages.create(model="tiny", max_tokens=8, messages=messages),
        lambda: client.messages.count_tokens(model="tiny", messages=messages),
    ):
        with pytest.raises(anthropic.BadRequestError) as caught:
            send()
        error = caught.value.body["error"]  # type: ignore[index]
        assert (error["type"], error["message"]) == ("invalid_request_error", expected)


def test_what_the_api_allows_is_allowed(daemon: Daemon) -> None:
    # An empty final assistant turn, and a tool_use in the final assistant turn.
    assert count(daemon, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    assert count(daemon, [{"role": "user", "content": "Shot?"}, CALL], tools=[SCREENSHOT_TOOL])
    # A prefill without trailing whitespace continues.
    reply(daemon, [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "Roses"}])
