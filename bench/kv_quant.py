"""KV-cache quantization of prompt-cache entries (`kv_bits`): bytes kept and answers changed.

For each model, a 4096-token context (Pensieve's own docs, as text) is
prefilled once; its KV cache is stored through the real `PromptCache` at full
precision, at 8 bits and at 4 bits (`kv_group_size` 64), and fetched back as
the model's batch takes it (still quantized). From each, 64 tokens are
decoded greedily, their keys and values quantized as they are written;
the table gives the bytes the budget counts for the entry, their ratio to
full precision, the tokens identical to the full-precision run's, and the
store and fetch times. One run covers both models (`--model` one of them):

- the embedded SmolLM2-135M, dequantized to float32 as the daemon runs it on
  MLX's CPU backend with OpenBLAS (keys and values in float32);
- a tiny random 2-layer model with 64-value heads (the default tiny model's
  16-value heads are smaller than any group size MLX quantizes in).

Target (issue #18): 8 bits at <= 0.55x the bytes with >= 60 of 64 tokens the same.
Run: `.venv/bin/python bench/kv_quant.py` (`--tokens`, `--decode`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402

from pensieved.config import ModelConfig  # noqa: E402
from pensieved.engine.prompt_cache import PromptCache  # noqa: E402

SETTINGS = (None, 8, 4)
GROUP_SIZE = 64
PREFILL_CHUNK = 512


def context_tokens(tokenizer: Any, count: int) -> list[int]:
    """`count` tokens of real English and Markdown: the docs, repeated if need be."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    # A few characters a token: encode no more than needed (and no tokenizer warning).
    tokens: list[int] = tokenizer.encode(text[: count * 2])
    while len(tokens) < count:
        tokens += tokens
    return tokens[:count]


def prefill(model: Any, tokens: list[int]) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), PREFILL_CHUNK):
        model(mx.array(tokens[start : start + PREFILL_CHUNK])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def decode(model: Any, cache: list[Any], last: int, count: int) -> list[int]:
    """`count` greedy tokens after `last`, from `cache`."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array([last]), model, prompt_cache=cache, max_tokens=count)
    return [int(token) for token, _ in steps]


def measure(label: str, model_dir: str, tokens: int, count: int) -> list[dict[str, Any]]:
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(model_dir)[:2]
    context = context_tokens(tokenizer, tokens + 1)
    started = time.perf_counter()
    full = prefill(model, context[:-1])
    print(f"{label}: prefilled {tokens} tokens in {time.perf_counter() - started:.1f}s", flush=True)
    rows = []
    reference: list[int] = []
    for bits in SETTINGS:
        config = ModelConfig(label, model_dir, kv_bits=bits, kv_group_size=GROUP_SIZE)
        cache = PromptCache(1 << 40)
        started = time.perf_counter()
        cache.store(config, context[:-1], copy.deepcopy(full))
        stored_s = time.perf_counter() - started
        started = time.perf_counter()
        hit, cached = cache.fetch(config, context)
        assert hit is not None and cached == tokens
        mx.eval([c.state for c in hit])
        fetched_s = time.perf_counter() - started
        started = time.perf_counter()
        out = decode(model, hit, context[-1], count)
        decode_s = time.perf_counter() - started
        if bits is None:
            reference = out
        same = sum(a == b for a, b in zip(out, reference, strict=True))
        rows.append(
            {
                "model": label,
                "setting": "full" if bits is None else f"{bits}-bit",
                "bytes": cache.nbytes,
                "same": same,
                "store_ms": stored_s * 1000,
                "fetch_ms": fetched_s * 1000,
                "decode_tps": count / decode_s,
            }
        )
        del cache, hit
    for row in rows:
        row["ratio"] = row["bytes"] / rows[0]["bytes"]
    del model, full
    mx.clear_cache()
    return rows


def prepare(workdir: Path, choice: str) -> list[tuple[str, str]]:
    """(label, model directory) of each model `--model` names, run as the daemon runs it here."""
    from bench.speed import prepare_model
    from tests.models import build_tiny_model

    from pensieved.models.gguf import import_gguf
    from pensieved.models.registry import builtin_gguf_path

    models = []
    if choice not in ("tiny", "both"):  # builtin, or a model directory
        model_dir, label = prepare_model(choice, workdir)
        return [(label, model_dir)]
    if choice == "both":
        model_dir, label = prepare_model("builtin", workdir)  # imports workdir/smollm2 too
        models.append((label, model_dir))
    else:
        import_gguf(builtin_gguf_path(), workdir / "smollm2")  # the tiny model's tokenizer
    tiny = build_tiny_model(
        workdir / "tiny64",
        workdir / "smollm2",
        context=8192,
        hidden_size=128,
        heads=2,
        kv_heads=2,
        head_dim=64,
    )
    models.append(("tiny (64-value heads)", str(tiny)))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", help="builtin, tiny, both, or an MLX dir")
    parser.add_argument("--tokens", type=int, default=4096, help="context length (tokens)")
    parser.add_argument("--decode", type=int, default=64, help="greedy tokens compared")
    args = parse(parser)
    from pensieved.engine import openblas

    # The same BLAS as the daemon, which preloads the system OpenBLAS too.
    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    import mlx.core as mx

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, model_dir in prepare(Path(workdir), args.model):
            rows += measure(label, model_dir, args.tokens, args.decode)
    blas = "OpenBLAS" if openblas.openblas_active() else "reference BLAS"
    print(
        f"\nKV-cache quantization of a {args.tokens}-token prompt-cache entry, "
        f"group size {GROUP_SIZE}; MLX {mx.__version__} {mx.default_device()}, {blas}"
    )
    header = (
        f"{'model':<30} {'setting':<8} {'entry bytes':>12} {'x full':>7} "
        f"{'same of ' + str(args.decode):>10} {'store ms':>9} {'fetch ms':>9} {'decode tok/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<30} {r['setting']:<8} {r['bytes']:>12,} {r['ratio']:>7.3f} "
            f"{r['same']:>10} {r['store_ms']:>9.1f} {r['fetch_ms']:>9.1f} {r['decode_tps']:>13.1f}"
        )
    eight = [r for r in rows if r["setting"] == "8-bit"]
    met = all(r["ratio"] <= 0.55 and r["same"] >= args.decode * 60 // 64 for r in eight)
    print(f"\ntarget (8-bit <= 0.55x bytes, >= 60 of 64 the same): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
