"""Prefill and decode speed of the CPU configurations (quantized vs float32, BLAS).

Run it twice to compare BLAS libraries, since LD_PRELOAD is fixed at start:
    .venv/bin/python bench/cpu_paths.py                       # OpenBLAS, as pensieved preloads it
    PENSIEVE_OPENBLAS=0 .venv/bin/python bench/cpu_paths.py   # the wheel's reference BLAS
Each run measures the model as shipped (quantized) and dequantized to float32
with mlx-lm's own `stream_generate`, on a 1000-token prompt. The two records
are bench/results/cpu-paths-MODEL-openblas.txt and ...-reference-blas.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx_lm  # noqa: E402
from bench.args import parse  # noqa: E402

from pensieved.engine import cpu, openblas  # noqa: E402


def measure(
    model_dir: str, dequantize: bool, prompt_tokens: int, new_tokens: int
) -> tuple[float, float]:
    model, tokenizer = mlx_lm.load(model_dir)[:2]
    if dequantize:
        cpu.dequantize(model)
    prompt = tokenizer.encode("word " * prompt_tokens)[:prompt_tokens]
    *_, last = mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=new_tokens)
    return last.prompt_tps, last.generation_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX model directory (default: the embedded SmolLM2)")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=40)
    off = os.environ.get(openblas.SWITCH, "").lower() in openblas.OFF
    args = parse(parser, variant="reference-blas" if off else "openblas")
    # OpenBLAS as the daemon preloads it, unless PENSIEVE_OPENBLAS=0.
    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    blas = "OpenBLAS" if openblas.openblas_active() else "reference BLAS"
    model_dir = args.model
    if model_dir is None:
        from pensieved.config import Config
        from pensieved.models.registry import materialize

        model_dir = materialize(Config().default_model, Path(tempfile.mkdtemp()) / "models")
    print(f"{'configuration':36}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for dequantize in (False, True):
        prefill, decode = measure(model_dir, dequantize, args.prompt_tokens, args.new_tokens)
        name = f"{'float32' if dequantize else 'as shipped'}, {blas}"
        print(f"{name:36}{prefill:15.1f}{decode:14.1f}")


if __name__ == "__main__":
    main()
