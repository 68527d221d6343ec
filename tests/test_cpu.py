"""The CPU-backend speed path: dequantizing keeps the model's answers."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import mlx.core as mx
import mlx_lm
import pytest

from pensieved.engine import cpu
from tests.daemon import Daemon


def test_dequantized_model_computes_the_same_logits(smollm_dir: Path) -> None:
    quantized, tokenizer = mlx_lm.load(str(smollm_dir))[:2]
    dense = mlx_lm.load(str(smollm_dir))[0]
    assert cpu.should_dequantize("always", dense)
    cpu.dequantize(dense)
    assert not cpu.should_dequantize("always", dense)  # nothing quantized is left
    assert all(p.dtype == mx.float32 for _, p in _leaves(dense.parameters()))
    tokens = mx.array([tokenizer.encode("The capital of France is")])
    expected = quantized(tokens)[0, -1].astype(mx.float32)
    got = dense(tokens)[0, -1]
    assert mx.argmax(got).item() == mx.argmax(expected).item()
    assert mx.abs(got - expected).max().item() < 0.05 * mx.abs(expected).max().item()


def test_never_means_never(smollm_dir: Path) -> None:
    model = mlx_lm.load(str(smollm_dir))[0]
    assert not cpu.should_dequantize("never", model)


def test_auto_follows_the_backend(smollm_dir: Path) -> None:
    model = mlx_lm.load(str(smollm_dir))[0]
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert cpu.should_dequantize("auto", model) == (on_cpu and cpu.openblas_active())


def test_numpys_bundled_openblas_does_not_count() -> None:
    import numpy  # maps libscipy_openblas64_, whose symbols MLX never calls

    assert numpy.__version__
    preloaded = "libopenblas" in os.environ.get("LD_PRELOAD", "")
    assert cpu.openblas_active() == preloaded


def test_daemon_preloads_the_system_openblas(tiny_daemon: Daemon) -> None:
    backend = httpx.get(f"{tiny_daemon.base_url}/health").json()["backend"]
    if cpu.openblas_library() is None or os.environ.get("PENSIEVE_OPENBLAS") == "0":
        pytest.skip("no system OpenBLAS here, or its preload is turned off")
    assert backend == {"device": "cpu", "openblas": True}


def _leaves(tree: object) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(tree))


def test_non_affine_quantization_is_left_alone() -> None:
    import mlx.nn as nn

    class Tiny(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(64, 64)

    model = Tiny()
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4")
    assert type(model.layer).__name__ == "QuantizedLinear"
    # mxfp4 has no (scales, biases) pair to undo: never dequantized, never crashes.
    assert not cpu.should_dequantize("always", model)
    cpu.dequantize(model)
    assert type(model.layer).__name__ == "QuantizedLinear"
