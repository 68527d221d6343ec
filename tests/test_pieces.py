"""Prompts tokenized piece by piece give the tokens of whole tokenizing, or are not used."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from bench.claude_code import Conversation
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pensieved.conversation.pieces import CHECKED_RENDERS, PieceTokenizer
from pensieved.conversation.prompt import PromptBuilder
from pensieved.wire.protocol import MessagesRequest
from tests.requests import request_of


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir: Path) -> Any:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(smollm_dir)


def claude_code_turns(reply: str, lines: int) -> MessagesRequest:
    conversation = Conversation(lines)
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": conversation.turn2(reply),
        **conversation.anthropic_extras(),
    }
    return request_of(body)


REPLIES = [
    "Let me run the tests.",
    "Let me run the tests. (1)",
    "",  # a call with no text before it
    "  leading spaces, trailing newline\n",
    "A user may write <|im_start|> or <|im_end|> in text; they stay text (control_tokens.py).",
    "Digits 1234567890, unicode café ✓ 中文, emoji 🙂, tabs\tand\r\nCRLF.",
]


def test_pieces_give_the_tokens_of_whole_tokenizing(smollm_tokenizer: Any) -> None:
    by_pieces = PromptBuilder(smollm_tokenizer, "smollm")
    whole = PromptBuilder(smollm_tokenizer, "smollm")
    whole._pieces._pattern = None  # the plain path, for reference
    assert by_pieces._pieces.pattern is not None
    for lines in (0, 12, 40):
        for reply in REPLIES:
            request = claude_code_turns(reply, lines)
            assert by_pieces.build(request).tokens == whole.build(request).tokens
    # Past the first few renders, pieces are trusted: still the same tokens,
    # and the pieces seen before (system prompt, tools, history) came from the cache.
    assert not by_pieces._pieces.checking
    assert by_pieces._pieces._held > 0


def test_a_difference_from_whole_tokenizing_turns_pieces_off(
    smollm_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pieces = PieceTokenizer(smollm_tokenizer)
    assert pieces.checking and pieces.pattern is not None
    assert pieces.encode("<|im_start|>user\nhello<|im_end|>", pieces.pattern)[0] == 1
    with caplog.at_level(logging.WARNING, logger="pensieved.conversation.pieces"):
        assert pieces.confirm([1, 2], [1, 3]) == [1, 3]
    assert pieces.pattern is None and not pieces.checking
    assert "tokenizing prompts whole" in caplog.text
    for _ in range(CHECKED_RENDERS):
        assert PieceTokenizer(smollm_tokenizer).confirm([5], [5]) == [5]


def fast_tokenizer(pre_tokenizer: Any, added: list[AddedToken]) -> PreTrainedTokenizerFast:
    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)
END = AddedToken("<|end|>", special=True, normalized=False)


@pytest.mark.parametrize(
    ("pre_tokenizer", "added", "used"),
    [
        (BYTE_LEVEL, [END], True),
        (
            pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]
            ),
            [END],
            True,
        ),
        # SentencePiece-style: the first piece of the input is treated apart.
        (pre_tokenizers.Metaspace(prepend_scheme="first"), [END], False),
        # Takes the whitespace before it.
        (BYTE_LEVEL, [AddedToken("<|end|>", lstrip=True, special=True, normalized=False)], False),
        # Matched in a second pass, after "b": one split could not cut "xab" as the tokenizer does.
        (
            BYTE_LEVEL,
            [AddedToken("b", normalized=False), AddedToken("ab", normalized=True)],
            False,
        ),
    ],
)
def test_only_tokenizers_whose_pieces_are_independent_use_pieces(
    pre_tokenizer: Any, added: list[AddedToken], used: bool
) -> None:
    tokenizer = fast_tokenizer(pre_tokenizer, added)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert [token["content"] for token in spec["added_tokens"]] == [t.content for t in added]
    assert (PieceTokenizer(tokenizer).pattern is not None) is used
