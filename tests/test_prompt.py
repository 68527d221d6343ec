"""Anthropic request → chat turns, and text stop matching: pure functions, no model."""

from __future__ import annotations

import msgspec
import pytest

from pensieved.conversation.prompt import to_chat_messages
from pensieved.conversation.stops import StopMatcher
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import MessagesRequest


def request(**fields: object) -> MessagesRequest:
    return msgspec.convert({"model": "m", "max_tokens": 5, **fields}, MessagesRequest)


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
        "content": "a.py\n[image omitted: this model is text-only]",
    }
    assert turns[3]["content"] == "Error: /x"
    assert turns[4] == {"role": "user", "content": "and now?"}


def test_images_are_refused_naming_the_block() -> None:
    with pytest.raises(InvalidRequest, match=r"messages\.0\.content\.1: .*image"):
        to_chat_messages(
            request(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this"},
                            {"type": "image", "source": {"type": "url", "url": "http://x"}},
                        ],
                    }
                ]
            ),
            "m",
        )


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "matched"),
    [
        (["Hello", " wor", "ld END", " tail"], ["END"], "Hello world ", "END"),
        (["ab", "c"], ["bcd"], "abc", None),  # held back, then flushed
        (["x</", "stop>y"], ["</stop>"], "x", "</stop>"),
        (["one two"], ["two", "one"], "", "one"),  # the earliest match wins
        (["no stops"], [], "no stops", None),
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
