"""`pensievectl doctor`: what makes Claude Code work on Pensieve, or fail, checked for real.

Each check asks the running daemon or this machine, never guesses: Claude
Code's prompt is measured by rendering a captured Claude Code request
(`claude_code_request.json`, its first main turn) through each tier's model
with `/v1/messages/count_tokens`. A check that names a model to pull carries
its repo id, and `offer_pulls` offers (in a terminal) to download it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from pensievectl import claude_settings
from pensievectl.launcher import find_claude
from pensieved.config import Config, ConfigError, ensure_token
from pensieved.models.registry import CLAUDE_TIERS, ModelRegistry, local_model_dir
from pensieved.wire.errors import NotFound

OK, WARN, FAIL = "ok", "warn", "fail"
GB = 1024**3
# The two-tier configs of docs/models.md, biggest first: (Mac memory in GB, repo).
RECOMMENDED = (
    (64, "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"),
    (16, "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"),
    (0, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn or fail
    detail: str
    fix: str = ""
    pull: str = ""  # the repo id the fix downloads, offered by `offer_pulls`


def captured_request() -> dict[str, Any]:
    """Claude Code 2.1's first main request (system, 24 tools, the task), metadata stripped."""
    text = resources.files("pensievectl").joinpath("claude_code_request.json").read_text()
    request: dict[str, Any] = json.loads(text)
    return request


def recommended_model(total_gb: float) -> str:
    """The two-tier config's main model sized for a machine with `total_gb` of memory."""
    return next(repo for least, repo in RECOMMENDED if total_gb >= least)


def run_checks(config: Config, environ: Mapping[str, str] | None = None) -> list[Check]:
    environ = os.environ if environ is None else environ
    checks = [_claude_installed(), *_shell_env(config, environ)]
    try:
        token = ensure_token(config)
    except ConfigError as exc:
        return [Check("daemon", FAIL, f"token not readable: {exc}", "check PENSIEVE_HOME"), *checks]
    with httpx.Client(
        base_url=config.base_url,
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        timeout=600,
    ) as http:
        try:
            health = http.get("/health").json()
        except (httpx.HTTPError, ValueError) as exc:
            down = Check(
                "daemon",
                FAIL,
                f"not answering on {config.base_url} ({type(exc).__name__}); "
                "the model checks were skipped",
                "start it: make run (or pensievectl service install)",
            )
            return [down, *checks]
        checks.insert(0, Check("daemon", OK, f"{health['status']} on {config.base_url}"))
        checks.extend(_tier_checks(config, http))
    return checks


def cannot_work(checks: list[Check]) -> bool:
    return any(check.status == FAIL for check in checks)


def table(checks: list[Check]) -> str:
    rows = [("check", "status", "detail", "fix")]
    rows += [(c.name, c.status, c.detail, c.fix) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + (f"  {row[3]}" if row[3] else "")
        for row in rows
    )


def _claude_installed() -> Check:
    claude = find_claude()
    if claude is None:
        return Check(
            "claude code",
            FAIL,
            "`claude` is not on PATH nor where its installers put it",
            "curl -fsSL https://claude.ai/install.sh | bash",
        )
    try:
        version = subprocess.run(
            [claude, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("claude code", WARN, f"{claude} did not run: {exc}")
    return Check("claude code", OK, f"{version or 'unknown version'} ({claude})")


def _shell_env(config: Config, environ: Mapping[str, str]) -> list[Check]:
    from pensievectl.claude_settings import model_tiers

    wanted = {"ANTHROPIC_BASE_URL": config.base_url, **model_tiers(config)}
    wrong = [name for name, value in wanted.items() if environ.get(name) != value]
    if environ.get("ANTHROPIC_API_KEY"):
        wrong.append("ANTHROPIC_API_KEY (set: it wins over the token)")
    token = environ.get("ANTHROPIC_AUTH_TOKEN")
    try:
        token_ok = token == ensure_token(config)
    except ConfigError:
        token_ok = False
    if not token_ok:
        wrong.append("ANTHROPIC_AUTH_TOKEN")
    if not wrong:
        return [Check("shell env", OK, "matches `pensievectl env --model-tiers`")]
    return [
        Check(
            "shell env",
            WARN,
            "differs from `pensievectl env --model-tiers`: " + ", ".join(wrong),
            'eval "$(pensievectl env --model-tiers)", or use claude-local / setup-claude',
        )
    ]


def _tier_checks(config: Config, http: httpx.Client) -> list[Check]:
    registry = ModelRegistry(config)
    request = captured_request()
    checks: list[Check] = []
    seen: set[str] = set()
    for tier, client_name in CLAUDE_TIERS.items():
        try:
            model = registry.resolve(client_name)
        except NotFound:
            checks.append(
                Check(f"{tier} tier", FAIL, f"{client_name} resolves to no model", "add an alias")
            )
            continue
        if model.name in seen:
            checks.append(Check(f"{tier} tier", OK, f"{model.name} (checked above)"))
            continue
        seen.add(model.name)
        checks.extend(_model_checks(config, http, tier, model.name, request))
    return checks


def _model_checks(
    config: Config, http: httpx.Client, tier: str, name: str, request: dict[str, Any]
) -> list[Check]:
    label = f"{tier} {name}"
    counted = http.post("/v1/messages/count_tokens", json={**request, "model": name})
    if counted.status_code != 200:
        return [Check(label, FAIL, f"count_tokens answered {counted.status_code}: {counted.text}")]
    prompt = int(counted.json()["input_tokens"])
    health = http.get("/health").json()
    entry = next(m for m in health["models"] if m["name"] == name)
    context = entry["context_length"] or claude_settings.model_context(
        config, registry_model(config, name)
    )
    needed = prompt + claude_settings.REPLY_ROOM
    checks = []
    if context is None:
        checks.append(Check(f"{label} context", WARN, f"unknown; Claude Code's prompt is {prompt}"))
    elif context < needed:
        repo = recommended_model(health["memory"]["total_gb"])
        checks.append(
            Check(
                f"{label} context",
                FAIL,
                f"{context} tokens: too small for Claude Code, whose prompt is {prompt} "
                f"tokens here (+{claude_settings.REPLY_ROOM} for a reply)",
                f"pensievectl pull {repo}, then make it the default model "
                "(docs/models.md, two tiers on a Mac)",
                pull=repo,
            )
        )
    else:
        checks.append(
            Check(f"{label} context", OK, f"{context} tokens; Claude Code's prompt is {prompt}")
        )
    checks.append(_structured_output(http, label, name))
    checks.append(_cache_check(http, label, name))
    # Read after the requests above: they loaded the model.
    health = http.get("/health").json()
    entry = next(m for m in health["models"] if m["name"] == name)
    form = entry["tool_format"]
    checks.append(
        Check(
            f"{label} tools",
            OK if form == "native" else WARN,
            f"{form} tool-call format"
            + ("" if form == "native" else " (Pensieve's, taught in the prompt)"),
        )
    )
    checks.append(_memory_check(config, health, entry, label, name, needed))
    return checks


def registry_model(config: Config, name: str) -> Any:
    return ModelRegistry(config).get(name)


def _structured_output(http: httpx.Client, label: str, name: str) -> Check:
    body = {
        "model": name,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Answer with a JSON object."}],
        "output_config": {
            "format": {
                "type": "json_schema",
                "schema": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}},
                    "required": ["ok"],
                    "additionalProperties": False,
                },
            }
        },
    }
    reply = http.post("/v1/messages", json=body)
    if reply.status_code != 200:
        return Check(f"{label} json", FAIL, f"answered {reply.status_code}: {reply.text[:200]}")
    text = "".join(b.get("text", "") for b in reply.json()["content"])
    try:
        json.loads(text)
    except ValueError:
        return Check(f"{label} json", WARN, f"reply does not parse (cut at 32 tokens?): {text!r}")
    return Check(f"{label} json", OK, "structured output parses")


def _cache_check(http: httpx.Client, label: str, name: str) -> Check:
    system = "You are a careful assistant. " * 16  # ~100 tokens: fits any model
    body = {
        "model": name,
        "max_tokens": 1,
        "system": system,
        "messages": [{"role": "user", "content": "Say yes."}],
    }
    usages = []
    for _ in range(2):
        reply = http.post("/v1/messages", json=body)
        if reply.status_code != 200:
            return Check(f"{label} cache", FAIL, f"answered {reply.status_code}")
        usages.append(reply.json()["usage"])
    read = usages[1].get("cache_read_input_tokens") or 0
    total = read + usages[1]["input_tokens"] + (usages[1].get("cache_creation_input_tokens") or 0)
    if read == 0:
        return Check(
            f"{label} cache",
            WARN,
            "the second turn read nothing from the prefix cache",
            "see pensievectl status (prompt cache budget) and the log",
        )
    return Check(f"{label} cache", OK, f"second turn read {read} of {total} tokens from the cache")


def _kv_bytes_per_token(config: Config, name: str) -> int | None:
    folder = local_model_dir(registry_model(config, name), config.paths.models_dir)
    try:
        spec = json.loads((folder / "config.json").read_text())  # type: ignore[operator]
        heads = spec["num_attention_heads"]
        head_dim = spec.get("head_dim") or spec["hidden_size"] // heads
        kv_heads = spec.get("num_key_value_heads", heads)
        return int(2 * spec["num_hidden_layers"] * kv_heads * head_dim * 2)  # K and V, fp16
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _memory_check(
    config: Config,
    health: dict[str, Any],
    entry: dict[str, Any],
    label: str,
    name: str,
    tokens: int,
) -> Check:
    memory = health["memory"]
    weights = entry["memory_gb"] or 0.0
    per_token = _kv_bytes_per_token(config, name)
    if per_token is None:
        return Check(f"{label} memory", WARN, f"{weights:.2f} GB of weights; KV size unknown")
    kv = per_token * tokens / GB
    need = f"{weights:.2f} GB weights + {kv:.2f} GB KV for {tokens} tokens"
    if memory.get("budget_gb"):
        fits, room = weights + kv <= memory["budget_gb"], f"budget {memory['budget_gb']:g} GB"
    else:
        spare = memory["available_gb"] - memory["reject_below_gb"]
        fits, room = kv <= spare, f"{spare:.1f} GB available above the reject line"
    if fits:
        return Check(f"{label} memory", OK, f"{need}; {room}")
    repo = recommended_model(memory["total_gb"])
    return Check(
        f"{label} memory",
        FAIL,
        f"{need} do not fit: {room}",
        f"a smaller model, e.g. pensievectl pull {repo}",
        pull=repo,
    )


def offer_pulls(
    checks: list[Check],
    *,
    pull: bool | None,
    interactive: bool,
    confirm: Callable[[str], bool],
    download: Callable[[str], Path],
    echo: Callable[[str], None],
) -> list[str]:
    """Download the models the checks recommend, asking first; the repo ids pulled.

    `pull` True pulls without asking, False never; None asks, and only when
    `interactive` (stdin and stdout a terminal): a script never waits on a
    question. `download` is `pensievectl pull`'s (`hub.pull`), which shows
    progress bars and resumes an interrupted download.
    """
    from pensievectl.hub import PullError
    from pensievectl.model_commands import serving_snippet

    if pull is False or (pull is None and not interactive):
        return []
    pulled = []
    for repo in dict.fromkeys(c.pull for c in checks if c.pull):
        if pull is None and not confirm(f"Pull {repo} now?"):
            continue
        try:
            path = download(repo)
        except PullError as exc:
            echo(f"pull failed: {exc}")
            continue
        pulled.append(repo)
        echo(str(path))
        echo("\nTo make it the default model, put this in the config (`pensievectl config path`),")
        echo("take `default = true` and the claude-* aliases off the model that has them,")
        echo("then run `pensievectl reload` (docs/models.md has two-tier configs):\n")
        echo(serving_snippet(repo, aliases=["claude-*"], default=True))
    return pulled


def startup_note(config: Config) -> str | None:
    """One line when the default model's context cannot hold Claude Code's prompt, else None."""
    context = claude_settings.model_context(config, config.default_model)
    needed = claude_settings.CLAUDE_CODE_PROMPT_TOKENS + claude_settings.REPLY_ROOM
    if context is None or context >= needed:
        return None
    return (
        f"note: {config.default_model.name}'s {context}-token context is too small for Claude "
        f"Code (~{needed} tokens needed); run `pensievectl doctor` for what to do"
    )


if __name__ == "__main__":  # `make run` prints this before starting the daemon
    from pensieved.config import ConfigError, load_config

    try:
        note = startup_note(load_config())
    except (ConfigError, OSError, ValueError):
        note = None  # pensieved itself reports a config it cannot use
    if note:
        print(note)
