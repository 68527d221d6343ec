"""Prompts tokenized piece by piece give the tokens of whole tokenizing, or are not used."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from bench.claude_code import Conversation
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pensieved.pieces import CHECKED_RENDERS, PieceTokenizer
from pensieved.prompt import PromptBuilder
from pensieved.protocol import MessagesRequest


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
    return msgspec.convert(body, MessagesRequest)


REPLIES = [
    "Let me run the tests.",
    "Let me run the tests. (1)",
    "",  # a call with no text before it
    "  leading spaces, trailing newline\n",
    "A user may write <|im_start|> or <|im_end|> in text; they are still special tokens.",
    "Digits 1234567890, unicode café ✓ 中文, emoji 🙂, tabs\tand\r\nCRLF.",
]


def test_pieces_give_the_tokens_of_whole_tokenizing(smollm_tokenizer: Any) -> None:
    by_pieces = PromptBuilder(smollm_tokenizer, "smollm")
    whole = PromptBuilder(smollm_tokenizer, "smollm")
    whole._pieces._pattern = None  # the plain path, for reference
    assert by_pieces._pieces.enabled
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
    assert pieces.checking
    pieces.encode("<|im_start|>user\nhello<|im_end|>")
    with caplog.at_level(logging.WARNING, logger="pensieved.pieces"):
        assert pieces.confirm([1, 2], [1, 3]) == [1, 3]
    assert not pieces.enabled and not pieces.checking
    assert "tokenizing prompts whole" in caplog.text
    for _ in range(CHECKED_RENDERS):
        assert PieceTokenizer(smollm_tokenizer).confirm([5], [5]) == [5]


def fast_tokenizer(pre_tokenizer: Any, lstrip: bool = False) -> PreTrainedTokenizerFast:
    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken("<|end|>", lstrip=lstrip, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize(
    ("pre_tokenizer", "lstrip", "enabled"),
    [
        (pre_tokenizers.ByteLevel(add_prefix_space=False), False, True),
        (
            pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]
            ),
            False,
            True,
        ),
        # SentencePiece-style: the first piece of the input is treated apart.
        (pre_tokenizers.Metaspace(prepend_scheme="first"), False, False),
        (pre_tokenizers.ByteLevel(add_prefix_space=False), True, False),  # eats whitespace
    ],
)
def test_only_tokenizers_whose_pieces_are_independent_use_pieces(
    pre_tokenizer: Any, lstrip: bool, enabled: bool
) -> None:
    tokenizer = fast_tokenizer(pre_tokenizer, lstrip)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert spec["added_tokens"][0]["lstrip"] is lstrip
    assert PieceTokenizer(tokenizer).enabled is enabled
