"""Small GGUF files written with the `gguf` package, shaped the way llama.cpp writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

HIDDEN, HEADS, KV_HEADS, FFN = 32, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *"abcdefghijklmnopqrstuvwxyz",
    "Ġ",
    "Ġa",
    "ab",
]
MERGES = ["Ġ a", "a b"]


def llamacpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q and K rows (HF order → GGUF order)."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """One llama layer in Hugging Face order, named the GGUF way."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    vocab = len(TOKENS)
    return {
        "token_embd.weight": w(vocab, HIDDEN),
        "output_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.ffn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_q.weight": w(HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": w(HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": w(FFN, HIDDEN),
        "blk.0.ffn_up.weight": w(FFN, HIDDEN),
        "blk.0.ffn_down.weight": w(HIDDEN, FFN),
    }


def write_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    odd_tensor_type: GGMLQuantizationType | None = None,
    f16: bool = False,
    add_bos: bool = False,
) -> dict[str, np.ndarray]:
    """Write a one-layer llama GGUF; returns its weights in HF order."""
    weights = hf_weights()
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.embedding_length", HIDDEN)
    writer.add_uint32(f"{arch}.block_count", 1)
    writer.add_uint32(f"{arch}.feed_forward_length", FFN)
    writer.add_uint32(f"{arch}.attention.head_count", HEADS)
    writer.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    writer.add_uint32(f"{arch}.context_length", 128)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(MERGES)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    writer.add_string(
        "tokenizer.chat_template",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    for name, value in weights.items():
        if name.endswith("attn_q.weight"):
            value = llamacpp_permute(value, HEADS)
        elif name.endswith("attn_k.weight"):
            value = llamacpp_permute(value, KV_HEADS)
        if odd_tensor_type is not None and name == "blk.0.ffn_up.weight":
            # Raw bytes in a K-quant's layout (144-byte blocks of 256 values).
            blocks = np.zeros((value.size // 256, 144), np.uint8)
            writer.add_tensor(name, blocks, raw_dtype=odd_tensor_type)
            continue
        writer.add_tensor(name, value.astype(np.float16) if f16 and value.ndim == 2 else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
