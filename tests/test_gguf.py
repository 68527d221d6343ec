"""The GGUF importer: exact weights, the tokenizer, clear errors, and a model that answers."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from pensievectl.cli import main as ctl
from pensieved.models.gguf import GGUFImportError, import_gguf
from pensieved.models.registry import builtin_gguf_path
from tests.ggufs import TOKENS, write_llama_gguf


@pytest.mark.parametrize("f16", [False, True])
def test_weights_come_back_in_hugging_face_order(tmp_path: Path, f16: bool) -> None:
    original = write_llama_gguf(tmp_path / "m.gguf", f16=f16)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    weights = mx.load(str(out / "model.safetensors"))
    tolerance = 1e-2 if f16 else 0
    for gguf_name, mlx_name in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ]:
        got = np.array(weights[mlx_name].astype(mx.float32))
        np.testing.assert_allclose(got, original[gguf_name], atol=tolerance)
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True
    assert "quantization" not in config


def test_tokenizer_is_built_from_gguf_metadata(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "m.gguf")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(out)
    # Merges apply by rank: "Ġ a" before "a b".
    assert tokenizer.encode(" ab", add_special_tokens=False) == [
        TOKENS.index("Ġa"),
        TOKENS.index("b"),
    ]
    assert tokenizer.encode("ab", add_special_tokens=False) == [TOKENS.index("ab")]
    assert tokenizer.decode(tokenizer.encode(" abc", add_special_tokens=False)) == " abc"
    assert tokenizer.eos_token_ids == {2}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]


@pytest.mark.parametrize("add_bos", [False, True])
def test_add_bos_token_is_honoured(tmp_path: Path, add_bos: bool) -> None:
    write_llama_gguf(tmp_path / "m.gguf", add_bos=add_bos)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(import_gguf(tmp_path / "m.gguf", tmp_path / "model"))
    expected = [TOKENS.index("ab")]
    assert tokenizer.encode("ab") == ([1, *expected] if add_bos else expected)
    assert tokenizer.encode("ab", add_special_tokens=False) == expected


def test_embedded_smollm2_import_is_right(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["max_position_embeddings"] == 8192
    quantization = config["quantization"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 32
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quantization["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}

    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smollm_dir))
    # SmolLM2's pre-tokenizer splits digits one by one.
    assert len(tokenizer.encode("2024", add_special_tokens=False)) == 4
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert "Paris" in answer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "qwen2"}, "unsupported architecture 'qwen2'"),
        ({"tokenizer_model": "llama"}, "unsupported tokenizer model 'llama'"),
        ({"pre": "mystery"}, "unsupported pre-tokenizer 'mystery'"),
        ({"odd_tensor_type": GGMLQuantizationType.Q4_K}, "blk.0.ffn_up.weight has type Q4_K"),
    ],
)
def test_unsupported_input_is_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    write_llama_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(GGUFImportError, match=message):
        import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    # Nothing half-written is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not gguf at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(bogus, tmp_path / "model")


def test_pensievectl_import(pensieve_home: Path, tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "m.gguf")
    result = CliRunner().invoke(ctl, ["import", str(tmp_path / "m.gguf"), "--name", "little"])
    assert result.exit_code == 0, result.output
    target = pensieve_home / "models" / "little"
    assert result.output.strip() == str(target)
    assert {p.name for p in target.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_pensievectl_import_error_is_one_line(tmp_path: Path) -> None:
    write_llama_gguf(tmp_path / "m.gguf", arch="qwen2")
    result = CliRunner().invoke(ctl, ["import", str(tmp_path / "m.gguf"), "--name", "x"])
    assert result.exit_code == 1
    assert "unsupported architecture 'qwen2'" in result.output
    assert "Traceback" not in result.output


def test_builtin_gguf_ships_with_the_package() -> None:
    path = builtin_gguf_path()
    assert path.is_file() and path.stat().st_size > 50_000_000
