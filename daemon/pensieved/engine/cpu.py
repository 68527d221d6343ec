"""MLX's CPU backend (Linux), made fast where the machine allows.

Measured on a 2-core x86 machine with SmolLM2-135M (see docs/performance.md):
the `mlx[cpu]` wheel bundles the reference BLAS, and quantized matmuls on
the CPU are slow. Dequantizing to float32 gains nothing on the reference
BLAS, but with the system's OpenBLAS preloaded, prefill goes from ~8 to ~137
tok/s and decode from ~6 to ~12 tok/s. So: preload OpenBLAS when the system
has it (by re-executing the daemon with LD_PRELOAD, which must be set before
the process starts), and dequantize small models when it is active.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Set in the re-executed process so that it never re-executes again.
REEXEC_MARK = "PENSIEVE_OPENBLAS_PRELOADED"
# Dequantized float32 weights above this size stay quantized in "auto" mode.
AUTO_DEQUANTIZE_MAX_BYTES = 4 * 1024**3
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def openblas_library() -> Path | None:
    """The system's OpenBLAS shared library, if there is one."""
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    found = ctypes.util.find_library("openblas")
    return Path(found) if found and Path(found).is_absolute() else None


def reexec_with_openblas(command: list[str]) -> None:
    """Replace this process with `command`, run with OpenBLAS preloaded (Linux only).

    Returns without doing anything where that is not possible or not wanted
    (`PENSIEVE_OPENBLAS=0`).
    """
    if (
        sys.platform != "linux"
        or os.environ.get(REEXEC_MARK)
        or os.environ.get("PENSIEVE_OPENBLAS") in ("0", "false", "no")
    ):
        return
    library = openblas_library()
    if library is None:
        return
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library} {preload}".strip()
    env[REEXEC_MARK] = "1"
    os.execve(command[0], command, env)


def openblas_active() -> bool:
    """Whether a system OpenBLAS is mapped, and so serves MLX's cblas calls.

    numpy's bundled `libscipy_openblas64_` does not count: its symbols are
    prefixed, so MLX still calls the reference BLAS beside it.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(
        line.rsplit("/", 1)[-1].startswith("libopenblas")
        for line in maps.splitlines()
        if "/" in line
    )


def should_dequantize(mode: str, model: Any) -> bool:
    """Whether to turn a quantized model into float32 weights (`[engine] dequantize`)."""
    if mode == "never":
        return False
    if not any(_quantized_layers(model)):
        return False
    if mode == "always":
        return True
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu or not openblas_active():
        return False
    return _float32_bytes(model) <= AUTO_DEQUANTIZE_MAX_BYTES


def dequantize(model: Any) -> None:
    """Replace every quantized layer of `model` with its float32 equivalent, in place."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    nn = _nn()

    replacements = []
    for path, layer in _quantized_layers(model):
        weight = mx.dequantize(
            layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits
        ).astype(mx.float32)
        if isinstance(layer, nn.QuantizedEmbedding):
            dense: Any = nn.Embedding(weight.shape[0], weight.shape[1])
        else:
            has_bias = "bias" in layer
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
            if has_bias:
                dense.bias = layer.bias.astype(mx.float32)
        dense.weight = weight
        replacements.append((path, dense))
    model.update_modules(tree_unflatten(replacements))
    # Norms and other float parameters follow, so no op mixes precisions.
    model.apply(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p)
    mx.eval(model.parameters())


def _nn() -> Any:
    import mlx.nn  # its stubs lack the layer classes

    return mlx.nn


def _quantized_layers(model: Any) -> list[tuple[str, Any]]:
    nn = _nn()
    # Only affine quantization has (scales, biases) to undo; mxfp4/nvfp4 stay as they are.
    return [
        (path, layer)
        for path, layer in model.named_modules()
        if isinstance(layer, nn.QuantizedLinear | nn.QuantizedEmbedding)
        and getattr(layer, "mode", "affine") == "affine"
    ]


def _float32_bytes(model: Any) -> int:
    total = 0
    for _, layer in _quantized_layers(model):
        rows = layer.weight.shape[0]
        columns = layer.weight.shape[1] * 32 // layer.bits
        total += rows * columns * 4
    return total
