"""Tiny random MLX models for tests, built from real parts.

They use the real SmolLM2 tokenizer (imported from the embedded GGUF) and
mlx-lm's real llama implementation with random weights: fast enough for the
2-core CI machine, and loaded by the daemon exactly like any other model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_model(
    dest: Path,
    tokenizer_dir: Path,
    *,
    vocab_size: int = 49152,
    context: int = 4096,
    seed: int = 0,
    out_of_vocab_head: bool = False,
) -> Path:
    """Write a 2-layer random llama to `dest`.

    `out_of_vocab_head` makes a defective model: its vocabulary is larger than
    its tokenizer's, and its output head favours the ids past the tokenizer's
    end, so decoding its output fails. Real models with mismatched vocabularies
    fail the same way; the daemon must report it, not crash.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": not out_of_vocab_head,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if out_of_vocab_head:
        head = mx.random.normal((vocab_size, config["hidden_size"])) * 5.0
        known = 49152
        head = mx.concatenate([mx.zeros((known, config["hidden_size"])), head[known:]])
        weights["lm_head.weight"] = head
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    (dest / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest
