"""Import a llama-architecture GGUF file as an MLX model directory.

The result is a directory `mlx_lm.load` reads like any converted model:
`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
MLX reads GGUF tensors itself (`mx.load(..., return_metadata=True)`): Q4_0,
Q4_1 and Q8_0 come back as MLX affine (weight, scales, biases) triples with
group size 32, so nothing is dequantized. The `gguf` package reads the tensor
types, which `mx.load` does not report (it would silently cast K-quants).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from gguf import GGUFReader

from pensieved.models.registry import IMPORTER_VERSION
from pensieved.models.sampling import valid_settings, write_recommendation

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)
GROUP_SIZE = 32  # every GGML block type MLX reads natively uses blocks of 32

# GGUF names the pre-tokenizer (llama.cpp's `tokenizer.ggml.pre`); each maps to
# the Hugging Face pre-tokenizer that produces the same splits.
_DIGITS_THEN_BYTES = "digits+bytelevel"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, str] = {
    "default": "bytelevel",
    "gpt2": "bytelevel",
    "smollm": _DIGITS_THEN_BYTES,
    "starcoder": _DIGITS_THEN_BYTES,
    "refact": _DIGITS_THEN_BYTES,
    "llama-bpe": "llama3",
    "llama3": "llama3",
}

_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFImportError(ValueError):
    """The GGUF file uses something this importer does not support."""


# GGUF's recommended-sampling metadata (llama.cpp's `general.sampling.*`),
# under the names generation_config.json uses.
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def import_gguf(
    gguf_path: Path, out_dir: Path, sampling: dict[str, float | int] | None = None
) -> Path:
    """Convert `gguf_path` into an MLX model directory at `out_dir`.

    The recommended sampling in the file's metadata, overridden by
    `sampling` (an Ollama Modelfile's parameters, or what the model's authors
    published elsewhere), goes into `generation_config.json`.

    Writes into a temporary sibling and renames it into place, so a failed or
    interrupted import never leaves a half-written model behind.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFImportError(f"no such GGUF file: {gguf_path}")
    _check_tensor_types(gguf_path)
    weights, metadata = cast(
        tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(gguf_path), return_metadata=True)
    )
    arch = str(metadata.get("general.architecture", "unknown"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"unsupported architecture {arch!r} in {gguf_path.name} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    config = _model_config(metadata)
    mlx_weights, quantization = _convert_weights(weights, config)
    if quantization:
        config["quantization"] = quantization

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), mlx_weights, {"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(metadata, staging, config["max_position_embeddings"])
        recommended = {**_sampling(metadata, gguf_path.name), **(sampling or {})}
        if recommended:
            write_recommendation(staging, recommended)
        (staging / "pensieve-import.json").write_text(
            json.dumps(
                {
                    "source": str(gguf_path),
                    "size": gguf_path.stat().st_size,
                    "importer": IMPORTER_VERSION,
                }
            )
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_tensor_types(gguf_path: Path) -> None:
    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError) as exc:
        raise GGUFImportError(f"{gguf_path.name} is not a readable GGUF file: {exc}") from exc
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise GGUFImportError(
                f"tensor {tensor.name} has type {kind}, which the importer does not "
                f"support (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )


def _sampling(metadata: dict[str, Any], origin: str) -> dict[str, float | int]:
    found = {
        name: _scalar(metadata, key) for key, name in _SAMPLING_KEYS.items() if key in metadata
    }
    return valid_settings(found, origin)


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise GGUFImportError(f"GGUF metadata lacks {key}")
    return value.item() if isinstance(value, mx.array) else value


def _model_config(metadata: dict[str, Any]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return _scalar(metadata, f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": True,  # corrected below when `output.weight` exists
    }


def _mlx_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TENSOR_NAMES:
        return f"{_TENSOR_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_TENSOR_NAMES[parts[2]]}.{suffix}"
    raise GGUFImportError(f"unsupported tensor {gguf_name}")


def _unpermute(rows: mx.array, n_head: int) -> mx.array:
    # llama.cpp's converter interleaves the two rotary halves of each head's
    # rows for its RoPE kernel; MLX's llama expects the Hugging Face order.
    shape = rows.shape
    half = shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _convert_weights(
    weights: dict[str, mx.array], config: dict[str, Any]
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        target = _mlx_name(name)
        if ".self_attn.q_proj." in target:
            value = _unpermute(value, config["num_attention_heads"])
        elif ".self_attn.k_proj." in target:
            value = _unpermute(value, config["num_key_value_heads"])
        out[target] = value
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False

    # Record each quantized layer's bits: GGUF files mix them (SmolLM2's
    # Q4_1 file keeps an 8-bit token embedding).
    quantization: dict[str, Any] = {}
    for name in sorted(out):
        if not name.endswith(".scales"):
            continue
        layer = name[: -len(".scales")]
        packed = out[f"{layer}.weight"].shape[-1]
        groups = out[name].shape[-1]
        bits = packed * 32 // (groups * GROUP_SIZE)
        quantization[layer] = {"group_size": GROUP_SIZE, "bits": bits}
    if quantization:
        most_common = max(
            {q["bits"] for q in quantization.values()},
            key=lambda b: sum(q["bits"] == b for q in quantization.values()),
        )
        quantization = {"group_size": GROUP_SIZE, "bits": most_common, **quantization}
    return out, quantization


def _write_tokenizer(metadata: dict[str, Any], out_dir: Path, context_length: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"unsupported tokenizer model {kind!r} (supported: 'gpt2' byte-level BPE)"
        )
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise GGUFImportError(
            f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    style = _PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
    if style == _DIGITS_THEN_BYTES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif style == "llama3":
        from tokenizers import Regex

        split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    types = metadata.get("tokenizer.ggml.token_type")
    type_list = (
        cast(list[int], types.tolist()) if isinstance(types, mx.array) else [1] * len(tokens)
    )
    control = 3
    specials = [tokens[i] for i, t in enumerate(type_list) if t == control]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if metadata.get("tokenizer.ggml.bos_token_id") is not None and bool(
        _scalar(metadata, "tokenizer.ggml.add_bos_token", False)
    ):
        # transformers' generic fast tokenizer ignores `add_bos_token`; the
        # post-processor is what makes encode() prepend it.
        from tokenizers import processors

        bos = tokens[int(_scalar(metadata, "tokenizer.ggml.bos_token_id"))]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token_at(key: str) -> str | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return (
            None
            if value is None
            else tokens[int(_scalar(metadata, f"tokenizer.ggml.{key}_token_id"))]
        )

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("bos"),
        "eos_token": token_at("eos"),
        "unk_token": token_at("unknown"),
        "pad_token": token_at("padding"),
        "add_bos_token": bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = str(template)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
