"""Grammar-constrained tool calls: llguidance vs xgrammar vs outlines-core on SmolLM2's tokenizer.

Output: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, once ("single"), repeated
with "\\n" ("parallel"), or after free text, lazily triggered by `<tool_call>` ("auto"). Measures
compile time, per-token mask fill / matcher advance while walking a valid output, correctness, and
the cost of applying the packed bitmask to MLX logits. Run: .venv/bin/python bench/grammar_libs.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench.args import parse  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

DEFAULT_MODEL = Path.home() / ".local/share/pensieve/models/smollm2-135m-instruct"
PRE, POST = "<tool_call>\n", "\n</tool_call>"
STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}  # fmt: skip


TOOLS: dict[str, dict[str, Any]] = {
    "Bash": _obj({"command": STR, "timeout": INT, "description": STR}, ["command"]),
    "Read": _obj({"file_path": STR, "offset": INT, "limit": INT}, ["file_path"]),
    "Edit": _obj({"file_path": STR, "old_string": STR, "new_string": STR, "replace_all": BOOL},
                 ["file_path", "old_string", "new_string"]),
}  # fmt: skip


def call(name: str, args: dict[str, Any]) -> str:
    return PRE + json.dumps({"name": name, "arguments": args}) + POST


BASH = call("Bash", {"command": 'grep -rn "TODO" src/ | head -20', "timeout": 120000,
                     "description": "Find TODO markers"})  # fmt: skip
EDIT = call("Edit", {"file_path": "/work/app/main.py", "old_string": "def main():\n    run()\n",
                     "new_string": "def main() -> None:\n    run(verbose=True)\n"})  # fmt: skip
VALID = {"single": EDIT, "parallel": BASH + "\n" + EDIT,
         "auto": "I'll search first, then edit.\n" + BASH + "\nNow the fix:\n" + EDIT}  # fmt: skip
INVALID = {
    "wrong name": call("Delete", {"file_path": "x"}),
    "missing required": call("Read", {}),
    "wrong type": call("Bash", {"command": "ls", "timeout": "5"}),
    "extra key": call("Read", {"file_path": "a", "mode": "r"}),
    "text first": "Sure.\n" + BASH,  # only rejected where free text is not allowed
}
Fns = tuple[Callable[[np.ndarray], object], Callable[[int], object]]  # (fill mask, consume)


class LLGuidance:
    def __init__(self, hf: Any) -> None:
        import llguidance.hf
        import llguidance.numpy

        self.llg, self.tok = llguidance, llguidance.hf.from_tokenizer(hf)

    def compile(self, variant: str) -> Any:
        q = json.dumps  # a Lark string literal is a JSON string
        guide = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        rules = [
            f"tool_{i}: {q(q(n) + ', ' + q('arguments') + ': ')} "
            f"%json {json.dumps(schema | {'x-guidance': guide})}"
            for i, (n, schema) in enumerate(TOOLS.items())
        ]
        alts = " | ".join(f"tool_{i}" for i in range(len(TOOLS)))
        body = f"{q(chr(10) + '{' + q('name') + ': ')} ({alts}) {q('}' + POST)}"
        start = {
            "single": "start: call",
            "parallel": f"start: call ({q(chr(10))} call)*",
            # lazy lexeme: free text until "<tool_call>", then a call (as llguidance.StructTag)
            "auto": "start: tc* TEXT\nTEXT: /(.|\\n)*/\n"
            f"tc_trig[lazy]: TEXT {q('<tool_call>')}\ntc: tc_trig {body}",
        }[variant]
        grammar = "\n".join(["%llguidance {}", start, f"call: {q('<tool_call>')} {body}", *rules])
        m = self.llg.LLMatcher(self.tok, grammar, log_level=1)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled: Any) -> Fns:
        m = compiled.deep_copy()
        return (lambda bm: self.llg.numpy.fill_next_token_bitmask(m, bm)), m.consume_token


class XGrammar:
    def __init__(self, hf: Any) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=len(hf), stop_token_ids=[hf.eos_token_id]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)

    def compile(self, variant: str) -> Any:
        st = self.xgr.structural_tag
        tags = [
            st.TagFormat(begin=f'{PRE}{{"name": "{n}", "arguments": ', end="}" + POST,
                         content=st.JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=1))
            for n, schema in TOOLS.items()
        ]  # fmt: skip
        fmt: Any = (
            st.TriggeredTagsFormat(triggers=["<tool_call>"], tags=tags)
            if variant == "auto"
            else st.TagsWithSeparatorFormat(
                tags=tags, separator="\n", at_least_one=True, stop_after_first=variant == "single"
            )
        )
        return self.compiler.compile_structural_tag(st.StructuralTag(format=fmt))

    def matcher(self, compiled: Any) -> Fns:
        m = self.xgr.GrammarMatcher(compiled)
        return m.fill_next_token_bitmask, m.accept_token


def _lit(text: str) -> str:
    """Escape regex metacharacters in literal text (Rust regex syntax)."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in text)


class OutlinesCore:
    def __init__(self, hf: Any) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.to_regex = outlines_core, build_regex_from_schema
        bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 byte-level alphabet
        cs = bs + [256 + n for n in range(256 - len(bs))]
        bs += [b for b in range(256) if b not in bs]
        dec = {chr(c): b for b, c in zip(bs, cs, strict=True)}
        vocab: dict[bytes, list[int]] = {}
        for text, i in hf.get_vocab().items():
            if i not in hf.added_tokens_decoder:  # special tokens: never allowed
                vocab.setdefault(bytes(dec[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(hf.eos_token_id, vocab)

    def compile(self, variant: str) -> Any:
        if variant == "auto":
            raise NotImplementedError("regex only: no lazy/trigger mode")
        one = "|".join(
            _lit(f'{PRE}{{"name": "{n}", "arguments": ') + self.to_regex(json.dumps(schema), " ?")
            + _lit("}" + POST) for n, schema in TOOLS.items()
        )  # fmt: skip
        regex = f"({one})" if variant == "single" else f"({one})(\n({one}))*"
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Fns:
        g = self.oc.Guide(compiled)
        return (lambda bm: g.write_mask_into(bm.ctypes.data, bm.size, 4)), (
            lambda t: g.advance(t, return_tokens=False)
        )


BACKENDS: dict[str, Any] = {"llguidance": LLGuidance, "xgrammar": XGrammar,
                            "outlines_core": OutlinesCore}  # fmt: skip


def allowed(bm: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")).tolist())


def walk(fns: Fns, ids: list[int], bm: np.ndarray, times: list[list[int]] | None = None) -> int:
    """Feed ids one by one, filling the mask before each; return how many were allowed."""
    fill, consume = fns
    for n, t in enumerate(ids):
        t0 = time.perf_counter_ns()
        fill(bm)
        t1 = time.perf_counter_ns()
        if not (int(bm[0, t >> 5]) >> (t & 31)) & 1:
            return n
        consume(t)
        if times is not None:
            times[0].append(t1 - t0)
            times[1].append(time.perf_counter_ns() - t1)
    fill(bm)  # leaves the mask after the last token in bm
    return len(ids)


def pct(xs: list[int], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] / 1e3 if xs else float("nan")


def import_cost(module: str) -> str:
    code = (f"import time,psutil;p=psutil.Process();r=p.memory_info().rss;t=time.perf_counter();"
            f"import {module};print(f'{{(time.perf_counter()-t)*1e3:.0f}}ms "
            f"+{{(p.memory_info().rss-r)>>20}}MB')")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout


def bench_lib(name: str, hf: Any, repeats: int) -> list[str]:
    importlib.import_module(name)
    t0 = time.perf_counter()
    lib = BACKENDS[name](hf)
    setup = f"tokenizer setup {(time.perf_counter() - t0) * 1e3:.0f}ms"
    rows = [f"{name}: import {import_cost(name).strip()} (fresh process), {setup}"]
    eos, bm = hf.eos_token_id, np.full((1, (len(hf) + 31) // 32), -1, dtype=np.int32)
    for variant in ("single", "parallel", "auto"):
        try:
            t0 = time.perf_counter()
            compiled = lib.compile(variant)
            compile_ms = (time.perf_counter() - t0) * 1e3
        except NotImplementedError as e:
            rows.append(f"  {variant:9}skipped: {e}")
            continue
        t0 = time.perf_counter()
        if name == "xgrammar":
            compiled = lib.compile(variant)  # per request: compiler-cache hit + new matcher
        lib.matcher(compiled)  # llguidance: deep_copy of a compiled matcher; outlines: Guide(index)
        cached_ms = (time.perf_counter() - t0) * 1e3
        ids = hf.encode(VALID[variant], add_special_tokens=False)
        times: list[list[int]] = [[], []]
        done = min(walk(lib.matcher(compiled), ids, bm, times) for _ in range(repeats))
        if done == len(ids):
            end = allowed(bm)  # after the last call: EOS (parallel: also "\n" towards a next call)
            ok = eos in end and all(
                t == eos or variant == "auto"
                or (variant == "parallel" and "\n<tool_call>".startswith(hf.decode([t])))
                for t in end
            )  # fmt: skip
            checks = f"valid ok, end {'ok' if ok else 'BAD'} ({len(end)} allowed)"
        else:
            checks = f"VALID TEXT REJECTED at token {done}/{len(ids)} {hf.decode(ids[done:][:2])!r}"
        cases = [v for k, v in INVALID.items() if variant != "auto" or k != "text first"]
        rejected = 0
        for text in cases:
            text = "Hmm.\n" + text if variant == "auto" else text
            toks = hf.encode(text, add_special_tokens=False)
            rejected += walk(lib.matcher(compiled), toks, bm) < len(toks) or eos not in allowed(bm)
        rows.append(
            f"  {variant:9}{compile_ms:9.1f}{cached_ms:8.2f}{pct(times[0], 0.5):8.1f}"
            f"{pct(times[0], 0.95):8.1f}{pct(times[1], 0.5):8.1f}{pct(times[1], 0.95):8.1f}"
            f"{len(ids):5}  {checks}, invalid rejected {rejected}/{len(cases)}"
        )
    return rows


# ---- applying a packed int32 bitmask (bit i of word w = token 32*w+i, as all three write it)
_SHIFTS = mx.arange(32, dtype=mx.uint32)


@mx.compile
def _apply(bits: mx.array, logits: mx.array) -> mx.array:
    on = ((bits.view(mx.uint32)[..., None] >> _SHIFTS) & 1).reshape(logits.shape[0], -1)
    return mx.where(on[:, : logits.shape[-1]].astype(mx.bool_), logits, -mx.inf)


def apply_mx_shift_compiled(bm: np.ndarray, logits: mx.array) -> mx.array:
    return _apply(mx.array(bm), logits)


def apply_np_unpackbits(bm: np.ndarray, logits: mx.array) -> mx.array:
    on = np.unpackbits(bm.view(np.uint8), axis=-1, bitorder="little")[:, : logits.shape[-1]]
    return mx.where(mx.array(on.view(np.bool_)), logits, -mx.inf)


def bench_apply(vocab: int, n: int = 2000) -> list[str]:
    rng = np.random.default_rng(0)
    bm = rng.integers(-(2**31), 2**31, size=(1, (vocab + 31) // 32)).astype(np.int32)
    logits = mx.random.normal((1, vocab))
    mx.eval(logits)
    bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[:vocab].astype(bool)
    want = np.where(bits, np.array(logits)[0], -np.inf)
    rows = []
    for fn in (apply_mx_shift_compiled, apply_np_unpackbits):
        assert np.array_equal(np.array(fn(bm, logits))[0], want), fn.__name__
        ts = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            mx.eval(fn(bm, logits))
            ts.append(time.perf_counter_ns() - t0)
        rows.append(f"  {fn.__name__:24}{pct(ts, 0.5):8.1f}{pct(ts, 0.95):8.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=20)
    args = parse(ap)
    hf = AutoTokenizer.from_pretrained(args.model_dir)
    print(f"tokenizer {args.model_dir.name}: vocab {len(hf)}, eos {hf.eos_token_id}; µs per token")
    print(f"  {'variant':9}{'compile':>9}{'cached':>8}{'mask50':>8}{'mask95':>8}"
          f"{'step50':>8}{'step95':>8}{'toks':>5}  checks\n  {'':9}{'ms':>9}{'ms':>8}")  # fmt: skip
    for name in BACKENDS:
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped")
            continue
        print("\n".join(bench_lib(name, hf, args.repeats)))
    print(f"apply bitmask to (1, {len(hf)}) float32 logits on {mx.default_device()}, incl. eval")
    print(f"  {'method':24}{'p50 µs':>8}{'p95 µs':>8}")
    print("\n".join(bench_apply(len(hf))))


if __name__ == "__main__":
    main()
