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
from pathlib import Path
from typing import Any

import httpx

from pensievectl.claude_env import (
    MINIMAL_MODE,
    ClaudeSetup,
    ModelFit,
    claude_setup,
    model_context,
)
from pensievectl.launcher import find_claude
from pensieved.config import Config, ConfigError
from pensieved.models.facts import facts_of, kv_bytes_per_token
from pensieved.models.registry import CLAUDE_TIERS, ModelRegistry, local_model_dir
from pensieved.paths import GB
from pensieved.wire.claude_code import (
    ESTIMATED_PROMPT_TOKENS,
    REPLY_ROOM,
    captured_request,
    fits,
)

OK, WARN, FAIL = "ok", "warn", "fail"
# The two-tier configs of docs/models.md, biggest first: (Mac memory in GB, repo).
RECOMMENDED = (
    (64, "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"),
    (16, "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"),
    (0, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
)
# On MLX's CPU backend (Linux) a 7B model decodes a token or two a second and
# prefills Claude Code's ~20k-token prompt in hours: the smallest coders with
# its 32k window and tool calls, dequantized to float32 (`dequantize = "auto"`
# does that up to 4 GB). docs/models.md, "A bigger model on Linux".
RECOMMENDED_CPU = (
    (16, "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit"),
    (0, "mlx-community/Qwen2.5-Coder-0.5B-Instruct-4bit"),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn or fail
    detail: str
    fix: str = ""
    pull: str = ""  # the repo id the fix downloads, offered by `offer_pulls`


def recommended_model(total_gb: float, device: str = "gpu") -> str:
    """The main model to suggest for a machine with `total_gb` of memory and MLX on `device`."""
    choices = RECOMMENDED_CPU if device == "cpu" else RECOMMENDED
    return next(repo for least, repo in choices if total_gb >= least)


def run_checks(config: Config, environ: Mapping[str, str] | None = None) -> list[Check]:
    environ = os.environ if environ is None else environ
    try:
        setup = claude_setup(config)
    except ConfigError as exc:
        unreadable = Check("daemon", FAIL, f"token not readable: {exc}", "check PENSIEVE_HOME")
        return [unreadable, _claude_installed()]
    checks = [_claude_installed(), _shell_env(setup, environ)]
    with httpx.Client(
        base_url=setup.base_url,
        headers={"x-api-key": setup.token, "anthropic-version": "2023-06-01"},
        timeout=600,
    ) as http:
        try:
            health = http.get("/health").json()
        except (httpx.HTTPError, ValueError) as exc:
            down = Check(
                "daemon",
                FAIL,
                f"not answering on {setup.base_url} ({type(exc).__name__}); "
                "the model checks were skipped",
                "start it: make run (or pensievectl service install)",
            )
            return [down, *checks]
        if health["status"] == "degraded":
            reason = health.get("reason") or "the default model cannot serve"
            fix = "fix its [models] table, then pensievectl reload"
            checks.insert(0, Check("daemon", FAIL, f"degraded on {setup.base_url}: {reason}", fix))
            return checks
        checks.insert(0, Check("daemon", OK, f"{health['status']} on {setup.base_url}"))
        checks.extend(_tier_checks(config, setup, http))
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


def _shell_env(setup: ClaudeSetup, environ: Mapping[str, str]) -> Check:
    wanted = setup.variables()
    wrong = [name for name, value in wanted.items() if environ.get(name) != value]
    if environ.get("ANTHROPIC_API_KEY"):
        wrong.append("ANTHROPIC_API_KEY (set: it wins over the token)")
    if not setup.minimal and environ.get(MINIMAL_MODE):
        wrong.append(f"{MINIMAL_MODE} (set: Claude Code runs in minimal mode)")
    if not wrong:
        return Check("shell env", OK, "matches `pensievectl env`")
    return Check(
        "shell env",
        WARN,
        "differs from `pensievectl env`: " + ", ".join(wrong),
        'eval "$(pensievectl env)", or use claude-local / setup-claude',
    )


def _tier_checks(config: Config, setup: ClaudeSetup, http: httpx.Client) -> list[Check]:
    requests = {False: captured_request(), True: captured_request(minimal=True)}
    checks: list[Check] = []
    seen: set[str] = set()
    for tier, client_name in CLAUDE_TIERS.items():
        name = setup.tiers.get(tier)
        if name is None:
            checks.append(
                Check(f"{tier} tier", FAIL, f"{client_name} resolves to no model", "add an alias")
            )
            continue
        if name in seen:
            checks.append(Check(f"{tier} tier", OK, f"{name} (checked above)"))
            continue
        seen.add(name)
        checks.extend(_model_checks(config, setup, http, tier, name, requests))
    return checks


def _model_checks(
    config: Config,
    setup: ClaudeSetup,
    http: httpx.Client,
    tier: str,
    name: str,
    requests: dict[bool, dict[str, Any]],
) -> list[Check]:
    label = f"{tier} {name}"
    prompts = {}
    for minimal, request in requests.items():
        counted = http.post("/v1/messages/count_tokens", json={**request, "model": name})
        if counted.status_code != 200:
            return [
                Check(label, FAIL, f"count_tokens answered {counted.status_code}: {counted.text}")
            ]
        prompts[minimal] = int(counted.json()["input_tokens"])
    prompt, minimal_prompt = prompts[False], prompts[True]
    health = http.get("/health").json()
    entry = next(m for m in health["models"] if m["name"] == name)
    fit = setup.fits.get(name)
    context = entry["context_length"] or (fit.context if fit else None)
    if context is None:
        context = model_context(config, registry_model(config, name))
    checks = [_context_check(label, context, prompt, minimal_prompt, health, main=tier == "opus")]
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
    checks.append(_images_check(label, entry.get("images")))
    needed = prompt + REPLY_ROOM
    checks.append(_memory_check(config, health, entry, label, name, needed))
    return checks


def _images_check(label: str, images: str | None) -> Check:
    """Whether a screenshot pasted into Claude Code reaches the model."""
    if images == "vision":
        return Check(f"{label} images", OK, "a vision model: pasted screenshots reach it")
    shown = "refused (400)" if images == "reject" else "shown as a placeholder line"
    return Check(
        f"{label} images",
        OK,
        f"text-only: a pasted screenshot is {shown}",
        "for images, a Qwen2-VL or Qwen2.5-VL model (docs/models.md#vision-models)",
    )


def _context_check(
    label: str,
    context: int | None,
    prompt: int,
    minimal_prompt: int,
    health: dict[str, Any],
    main: bool,
) -> Check:
    """The model's context against Claude Code's full prompt, then against its minimal one."""
    name = f"{label} context"
    if context is None:
        return Check(name, WARN, f"unknown; Claude Code's prompt is {prompt}")
    if fits(context, prompt):
        return Check(name, OK, f"{context} tokens; Claude Code's prompt is {prompt}")
    repo = recommended_model(health["memory"]["total_gb"], health["backend"]["device"])
    fix = f"full tool set: pensievectl pull {repo}, then make it the default (docs/models.md)"
    too_small = (
        f"{context} tokens: too small for Claude Code's full prompt, {prompt} tokens here "
        f"(+{REPLY_ROOM} for a reply)"
    )
    if fits(context, minimal_prompt, minimal=True):
        mode = "minimal mode" if main else "minimal mode, when it is the main model"
        detail = f"{too_small}; its {mode} ({MINIMAL_MODE}=1, {minimal_prompt} tokens) fits"
        return Check(name, WARN, detail, fix, pull=repo)
    return Check(
        name, FAIL, f"{too_small}, and its minimal mode's {minimal_prompt}", fix, pull=repo
    )


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
            "the second turn read nothing from the prompt cache",
            "see pensievectl status (prompt cache budget) and the log",
        )
    return Check(f"{label} cache", OK, f"second turn read {read} of {total} tokens from the cache")


def _kv_bytes_per_token(config: Config, name: str) -> int | None:
    folder = local_model_dir(registry_model(config, name), config.paths.models_dir)
    try:
        spec = json.loads((folder / "config.json").read_text())  # type: ignore[operator]
    except (TypeError, OSError, ValueError):
        return None
    model = registry_model(config, name)
    # As the daemon counts it (models/facts.py), at float16, packed for `kv_bits`.
    return kv_bytes_per_token(facts_of(spec), 2, (model.kv_bits, model.kv_group_size))


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
    """What `make run` says before starting when Claude Code will need its minimal mode."""
    fit = ModelFit(
        config.default_model.name,
        model_context(config, config.default_model),
        ESTIMATED_PROMPT_TOKENS,
    )
    if not fit.too_small:
        return None
    setup = ClaudeSetup(config.base_url, "", {"opus": fit.name}, {fit.name: fit})
    return f"note: {setup.minimal_reason()}"


if __name__ == "__main__":  # `make run` prints this before starting the daemon
    from pensieved.config import ConfigError, load_config

    try:
        note = startup_note(load_config())
    except (ConfigError, OSError, ValueError):
        note = None  # pensieved itself reports a config it cannot use
    if note:
        print(note)
