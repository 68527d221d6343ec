"""Prefill and decode on MLX's CPU backend, with OpenBLAS and with the reference BLAS.

The embedded SmolLM2-135M as a user gets it (`[engine] dequantize = "auto"`:
float32 where OpenBLAS runs, quantized as shipped on the reference BLAS), a
~1,100-token prompt prefilled in the engine's chunks, then 128 greedy tokens
(end-of-text masked, so every run decodes all of them). Each BLAS runs in a
process of its own, since LD_PRELOAD is fixed when a process starts: one
started as the daemon starts (OpenBLAS preloaded, `openblas.reexec_with_openblas`),
one with PENSIEVE_OPENBLAS=0. Prints which BLAS and kernel each ran, the
medians, the ratios against the targets (prefill >= 5x, decode no slower) and
the load average around each (bench/args.py records it all in bench/results/).
`--model tiny` measures the tiny random model instead, in seconds.
Run: `make bench`, or `.venv/bin/python bench/blas.py [--runs N] [--model tiny|DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402

from pensieved.engine import cpu, openblas  # noqa: E402

PREFILL_TARGET = 5.0
DECODE_TARGET = 1.0


def worker(args: argparse.Namespace) -> None:
    """Measure in this process, with the BLAS it starts with; print one JSON line."""
    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    import mlx.core as mx
    from mlx_lm import stream_generate

    from pensieved.config import EngineConfig, ModelConfig
    from pensieved.engine.loading import load_weights

    load = os.getloadavg()[0]
    settings = EngineConfig()  # dequantize "auto", the engine's prefill chunk
    loaded = load_weights(ModelConfig("bench", args.worker), args.worker, settings)
    tokenizer = loaded.tokenizer
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    # About 4 characters a token: enough text, and no warning about the whole of it.
    prompt = tokenizer.encode(text[: args.prompt_tokens * 8])[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        sys.exit(f"docs/ holds only {len(prompt)} tokens of text")
    end = mx.zeros(loaded.logits_size)
    end[sorted(tokenizer.eos_token_ids)] = -mx.inf

    def no_end(tokens: Any, logits: Any) -> Any:
        return logits + end

    def run(tokens: list[int], new_tokens: int) -> tuple[float, float]:
        *_, last = stream_generate(
            loaded.model,
            tokenizer,
            tokens,
            max_tokens=new_tokens,
            logits_processors=[no_end],
            prefill_step_size=settings.prefill_chunk,
        )
        assert last.generation_tokens == new_tokens, last.generation_tokens
        return last.prompt_tps, last.generation_tps

    run(prompt[:64], 4)  # warm up
    measured = []
    for i in range(args.runs):
        measured.append(run(prompt, args.new_tokens))
        prefill, decode = measured[-1]
        print(f"  run {i + 1}: prefill {prefill:.1f}, decode {decode:.1f} tok/s", file=sys.stderr)
    blas = cpu.blas_report()
    print(
        json.dumps(
            {
                "blas": blas.health()["blas"],
                "kernel": blas.kernel,
                "describe": blas.describe(),
                "dequantized": loaded.dequantized,
                "prompt_tokens": len(prompt),
                "prefill": statistics.median(p for p, _ in measured),
                "decode": statistics.median(d for _, d in measured),
                "runs": args.runs,
                "load": [round(load, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


def measure(model_dir: Path, runs: int, args: argparse.Namespace, off: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if off:
        env[openblas.SWITCH] = "0"
        # An OpenBLAS this bench was started with must not follow into the baseline.
        kept = [p for p in env.get("LD_PRELOAD", "").split() if "libopenblas" not in p]
        env["LD_PRELOAD"] = " ".join(kept)
        env.pop(openblas.REEXEC_MARK, None)
    elif env.get(openblas.SWITCH, "").lower() in openblas.OFF:
        del env[openblas.SWITCH]
    name = "reference BLAS (PENSIEVE_OPENBLAS=0)" if off else "OpenBLAS (as pensieved starts)"
    print(f"{name}: {runs} run(s)", file=sys.stderr, flush=True)
    command = [sys.executable, __file__, "--worker", str(model_dir), "--runs", str(runs)]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    # The worker's progress goes through this process's stderr, and so into the record.
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as worker:
        assert worker.stdout is not None and worker.stderr is not None
        for line in worker.stderr:
            print(line, end="", file=sys.stderr, flush=True)
        output = worker.stdout.read()
    if worker.returncode:
        raise subprocess.CalledProcessError(worker.returncode, command)
    result: dict[str, Any] = json.loads(output.splitlines()[-1])
    return result


def table(label: str, args: argparse.Namespace, fast: dict[str, Any], slow: dict[str, Any]) -> str:
    prefill, decode = fast["prefill"] / slow["prefill"], fast["decode"] / slow["decode"]

    def verdict(ratio: float, target: float) -> str:
        return "PASS" if ratio >= target else "FAIL"

    rows = [
        f"BLAS on MLX's CPU backend: {label}, {fast['prompt_tokens']}-token prompt, "
        f"{args.new_tokens} new tokens, {os.cpu_count()} CPUs, medians",
        f"{'path':<22}{'BLAS, kernel':<54}{'weights':<10}{'prefill tok/s':>14}"
        f"{'decode tok/s':>16}{'runs':>6}  load avg",
    ]
    for path, r in (("OpenBLAS (default)", fast), ("PENSIEVE_OPENBLAS=0", slow)):
        blas = f"{r['blas']}, {r['kernel']}" if r["kernel"] else r["blas"]
        weights = "float32" if r["dequantized"] else "as shipped"
        rows.append(
            f"{path:<22}{blas:<54}{weights:<10}{r['prefill']:>14.1f}{r['decode']:>16.1f}"
            f"{r['runs']:>6}  {r['load'][0]} -> {r['load'][1]}"
        )
    rows.append(
        f"{'ratio (target)':<86}{f'{prefill:.1f}x (>= {PREFILL_TARGET:.0f}x)':>14}"
        f"{f'{decode:.2f}x (>= {DECODE_TARGET:.0f}x)':>16}"
    )
    rows.append(
        f"{'':<86}{verdict(prefill, PREFILL_TARGET):>14}{verdict(decode, DECODE_TARGET):>16}"
    )
    rows.append(f"OpenBLAS run: {fast['describe']}")
    rows.append("load avg: before -> after each process, its own ~1 included")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="builtin",
        help="builtin (the embedded SmolLM2), tiny (a random 2-layer model) or an MLX model dir",
    )
    parser.add_argument("--runs", type=int, default=3, help="OpenBLAS runs (median)")
    parser.add_argument(
        "--reference-runs",
        type=int,
        default=1,
        help="reference-BLAS runs (median; each takes minutes on a small machine)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=1100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parse(parser)
    if args.worker:
        worker(args)
        return
    if args.model not in ("builtin", "tiny") and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: builtin, tiny or a model directory")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        if args.model in ("builtin", "tiny"):
            from pensieved.models.gguf import import_gguf
            from pensieved.models.registry import builtin_gguf_path

            model_dir = import_gguf(builtin_gguf_path(), Path(workdir) / "smollm2")
            label = "smollm2-135m"
            if args.model == "tiny":
                from tests.models import build_tiny_model

                model_dir, label = build_tiny_model(Path(workdir) / "tiny", model_dir), "tiny"
        else:
            model_dir, label = Path(args.model), Path(args.model).name
        fast = measure(model_dir, args.runs, args, off=False)
        slow = measure(model_dir, args.reference_runs, args, off=True)
    report = table(label, args, fast, slow)
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{report}\n({minutes:.1f} min)")


if __name__ == "__main__":
    main()
