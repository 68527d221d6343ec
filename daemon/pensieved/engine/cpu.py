"""MLX's CPU backend (Linux): which BLAS runs, and quantized models made fast.

Measured on a 2-core x86 machine with SmolLM2-135M (see docs/performance.md):
the `mlx[cpu]` wheel bundles the reference BLAS, and quantized matmuls on
the CPU are slow. Dequantizing to float32 gains nothing on the reference
BLAS, but with OpenBLAS preloaded (engine/openblas.py), prefill runs an
order of magnitude faster and decode about twice as fast. So small models
are dequantized when OpenBLAS is active.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieved.engine import openblas
from pensieved.paths import GB

log = logging.getLogger(__name__)

# Dequantized float32 weights above this size stay quantized in "auto" mode.
AUTO_DEQUANTIZE_MAX_BYTES = 4 * GB


@dataclass(frozen=True)
class BlasReport:
    """Which BLAS serves MLX's CPU matmuls: for /health, the startup log and the bench."""

    name: str  # "OpenBLAS 0.3.33", "reference BLAS" or "Accelerate"
    source: str  # where it comes from: "ngsolve-openblas wheel", "system", "mlx-cpu wheel", ...
    library: str | None = None
    kernel: str | None = None  # OpenBLAS's kernel for this CPU (openblas_get_corename)
    threads: int | None = None
    coretype: str | None = None  # OPENBLAS_CORETYPE, where the environment sets it
    dynamic: bool = False  # a DYNAMIC_ARCH build, which OPENBLAS_CORETYPE can steer
    fallback: str | None = None  # why the reference BLAS runs on Linux

    @property
    def openblas(self) -> bool:
        return self.name.startswith("OpenBLAS")

    @property
    def title(self) -> str:
        """e.g. "OpenBLAS 0.3.33 (ngsolve-openblas wheel)", "reference BLAS (mlx-cpu wheel)"."""
        return f"{self.name} ({self.source})"

    @property
    def level(self) -> int:
        """The startup log line's level: a warning where OpenBLAS was wanted but failed."""
        if self.fallback is None or self.fallback.startswith("turned off"):
            return logging.INFO
        return logging.WARNING

    def health(self) -> dict[str, Any]:
        """The keys /health adds to its `backend` object."""
        return {
            "blas": self.title,
            "blas_kernel": self.kernel,
            "blas_threads": self.threads,
            "blas_coretype": self.coretype,
            "blas_fallback": self.fallback,
        }

    def describe(self) -> str:
        """One line for the log: what runs, with which kernel, and why."""
        if not self.openblas:
            return f"{self.title}: {self.fallback}" if self.fallback else self.title
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        set_by = [
            f"{name}={os.environ[name]}" for name in openblas.THREAD_VARIABLES if name in os.environ
        ]
        if set_by:
            threads += f" ({set_by[0]})"
        line = f"{self.title}, kernel {self.kernel}, {threads}"
        coretype = openblas.CORETYPE
        if self.coretype is not None:
            if (self.kernel or "").lower() == self.coretype.lower():
                line += f" (forced by {coretype}={self.coretype})"
            elif not self.dynamic:
                line += f" ({coretype}={self.coretype} has no effect: built for one kernel)"
            else:
                line += f" ({coretype}={self.coretype} is set but not a kernel this one knows)"
        return f"{line}: {self.library}"


@functools.cache
def blas_report() -> BlasReport:
    """Which BLAS this process's MLX uses, and why (the one place that says so).

    Read once: what a process has mapped stays mapped (/health asks each call).
    """
    if sys.platform == "darwin":
        return BlasReport("Accelerate", "macOS")
    library = openblas.mapped_openblas()
    if library is None:
        return BlasReport("reference BLAS", "mlx-cpu wheel", fallback=_why_reference())
    config = corename = None
    threads = None
    try:
        handle = ctypes.CDLL(str(library))  # already mapped: the same handle, no second copy
        handle.openblas_get_config.restype = ctypes.c_char_p
        handle.openblas_get_corename.restype = ctypes.c_char_p
        config = handle.openblas_get_config().decode()
        corename = handle.openblas_get_corename().decode()
        threads = int(handle.openblas_get_num_threads())
    except (OSError, AttributeError, UnicodeDecodeError):
        pass  # an OpenBLAS too old to say: still OpenBLAS
    words = (config or "OpenBLAS").split()
    return BlasReport(
        " ".join(words[:2]),
        _source(library),
        str(library),
        corename,
        threads,
        os.environ.get(openblas.CORETYPE) or None,
        "DYNAMIC_ARCH" in words,
    )


def _why_reference() -> str:
    if (reason := openblas.fallback_reason()) is not None:
        return reason
    if marked := os.environ.get(openblas.REEXEC_MARK):
        return f"the preload of {marked} did not take (the loader's message is above)"
    if os.environ.get(openblas.SWITCH, "").lower() in openblas.OFF:
        return f"turned off by {openblas.SWITCH}={os.environ[openblas.SWITCH]}"
    return "OpenBLAS is not preloaded into this process"


def _source(library: Path) -> str:
    real = library.resolve()
    wheel = openblas.wheel_openblas()
    if wheel is not None and wheel[0].resolve() == real:
        return f"{wheel[1]} wheel"
    named = os.environ.get(openblas.SWITCH, "")
    if "/" in named and Path(named).resolve() == real:
        return openblas.SWITCH
    system = openblas.system_openblas()
    if system is not None and system.resolve() == real:
        return "system"
    return "LD_PRELOAD"


def dequantizes(mode: str, float32_bytes: int) -> bool:
    """Whether a quantized model that takes `float32_bytes` as float32 is dequantized.

    `[engine] dequantize`: the one rule, asked before a load (to size it) and at it.
    """
    if mode != "auto":
        return mode == "always"
    import mlx.core as mx

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    return on_cpu and openblas.openblas_active() and float32_bytes <= AUTO_DEQUANTIZE_MAX_BYTES


def should_dequantize(mode: str, model: Any) -> bool:
    """Whether to turn loaded `model`'s quantized layers into float32 weights."""
    if mode == "never" or not any(_quantized_layers(model)):
        return False
    return dequantizes(mode, _float32_bytes(model))


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
