"""What points Claude Code at Pensieve: the address, the token, the model tiers, and its mode.

`pensievectl env`, `setup-claude`, `claude-local` and `doctor` all take it
from `claude_setup`, which asks the running daemon (where it listens, its
token, which local model serves each Claude tier, and how many tokens Claude
Code's captured prompt renders to through that model) and reads the config
file only when no daemon answers.

When the main tier's model cannot hold Claude Code's full prompt and a
reply, Claude Code runs in its minimal mode (`CLAUDE_CODE_SIMPLE=1`, what
`claude --bare` sets): a system prompt of a few lines and the Bash, Read and
Edit tools, ~1.1k tokens instead of ~20k, so that a small model answers
instead of refusing every turn as too long. Checked with Claude Code 2.1.197
and 2.1.337: in that mode it still sends ANTHROPIC_AUTH_TOKEN (as a Bearer
token), and reads CLAUDE_CODE_SIMPLE from its settings file's `env` too. It
is not told ANTHROPIC_API_KEY: an interactive session would then stop to
ask whether to use "a custom API key", with No as the suggested answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pensieved.config import Config, ModelConfig, ensure_token
from pensieved.models.facts import facts_of
from pensieved.models.registry import (
    CLAUDE_TIERS,
    HUB_PREFIX,
    ModelRegistry,
    builtin_gguf_path,
    is_builtin,
    local_model_dir,
)
from pensieved.service import control
from pensieved.wire.claude_code import ESTIMATED_PROMPT_TOKENS, REPLY_ROOM, fits

# Claude Code's variable for the model it sends for each tier.
TIER_VARIABLES = {tier: f"ANTHROPIC_DEFAULT_{tier.upper()}_MODEL" for tier in CLAUDE_TIERS}
MINIMAL_MODE = "CLAUDE_CODE_SIMPLE"
# Claude Code 2.1 clamps CLAUDE_CODE_AUTO_COMPACT_WINDOW to [100k, 1M] and then
# to the model's window (200k for a name it does not know); it compacts at
# min(window * CLAUDE_AUTOCOMPACT_PCT_OVERRIDE / 100, window - 13k).
COMPACT_WINDOW_MIN, COMPACT_WINDOW_MAX = 100_000, 1_000_000
COMPACT_SUMMARY_ROOM = 13_000


@dataclass(frozen=True)
class ModelFit:
    """A model's context against Claude Code's prompts through its template (None: unknown)."""

    name: str
    context: int | None
    prompt_tokens: int | None
    minimal_prompt_tokens: int | None = None
    measured: bool = False  # rendered by the running daemon; else `prompt_tokens` is an estimate

    @property
    def too_small(self) -> bool:
        """Known not to hold Claude Code's full prompt and a reply."""
        if self.context is None or self.prompt_tokens is None:
            return False
        return not fits(self.context, self.prompt_tokens)


@dataclass(frozen=True)
class ClaudeSetup:
    base_url: str
    token: str
    tiers: dict[str, str]  # tier (opus, sonnet, haiku) → the local model serving it
    fits: dict[str, ModelFit] = field(default_factory=dict)  # by model name

    @property
    def main_model(self) -> str | None:
        """The model of the main conversation (ANTHROPIC_MODEL): the opus tier's, else sonnet's."""
        return self.tiers.get("opus") or self.tiers.get("sonnet")

    @property
    def main_fit(self) -> ModelFit | None:
        main = self.main_model
        return None if main is None else self.fits.get(main)

    @property
    def minimal(self) -> bool:
        """Whether Claude Code must run in its minimal mode to fit the main model."""
        fit = self.main_fit
        return fit is not None and fit.too_small

    def variables(self) -> dict[str, str]:
        """The environment that points Claude Code at Pensieve, as `pensievectl env` prints it."""
        variables = {"ANTHROPIC_BASE_URL": self.base_url, "ANTHROPIC_AUTH_TOKEN": self.token}
        variables.update({TIER_VARIABLES[t]: m for t, m in self.tiers.items()})
        main = self.main_model
        if main is not None:
            # Pinned, so that every process renders the same model line (prompt cache).
            variables["ANTHROPIC_MODEL"] = main
            fit = self.main_fit
            if fit is not None and fit.context is not None:
                variables.update(compact_at(fit.context))
        if self.minimal:
            variables[MINIMAL_MODE] = "1"
        return variables

    def minimal_reason(self) -> str:
        """Why Claude Code runs in its minimal mode, and how to get the full tool set."""
        fit = self.main_fit
        assert fit is not None and fit.context is not None and fit.prompt_tokens is not None
        prompt = f"{fit.prompt_tokens}" if fit.measured else f"~{fit.prompt_tokens}"
        return (
            f"{fit.name}'s {fit.context}-token context cannot hold Claude Code's full prompt "
            f"({prompt} tokens + {REPLY_ROOM} for a reply), so Claude Code runs in its minimal "
            f"mode ({MINIMAL_MODE}=1, as `claude --bare`: the Bash, Read and Edit tools, no "
            "CLAUDE.md, hooks or MCP servers). For the full tool set, serve a bigger model: "
            "`pensievectl doctor` names one."
        )


def claude_setup(config: Config) -> ClaudeSetup:
    """What the running daemon serves; the config file's word when no daemon answers.

    Raises `ConfigError` when the token cannot be read (daemon down, file not private).
    """
    try:
        answer = control.call(config.paths.control_socket, "clients", timeout=120)
    except (OSError, ValueError):
        answer = {}
    if answer.get("ok"):
        return _from_daemon(answer)
    return _from_config(config)


def _from_daemon(answer: dict[str, Any]) -> ClaudeSetup:
    fits = {
        name: ModelFit(
            name,
            model.get("context_length"),
            model.get("claude_code_prompt_tokens"),
            model.get("minimal_prompt_tokens"),
            measured=True,
        )
        for name, model in answer["models"].items()
    }
    return ClaudeSetup(answer["base_url"], answer["token"], dict(answer["tiers"]), fits)


def _from_config(config: Config) -> ClaudeSetup:
    registry = ModelRegistry(config)
    tiers = {}
    for tier in CLAUDE_TIERS:
        model = registry.tier(tier)
        if model is not None:
            tiers[tier] = model.name
    fits = {
        name: ModelFit(name, model_context(config, registry.get(name)), ESTIMATED_PROMPT_TOKENS)
        for name in dict.fromkeys(tiers.values())
    }
    return ClaudeSetup(config.base_url, ensure_token(config), tiers, fits)


def model_context(config: Config, model: ModelConfig) -> int | None:
    """The model's context without loading it: its config, else its config.json; None if unknown.

    Reads what the daemon reads (`context_length`, else the declared window as
    models/facts.py reads it; the daemon falls back on the tokenizer's limit).
    """
    if model.context_length is not None:
        return model.context_length
    folder = local_model_dir(model, config.paths.models_dir)
    files = [folder / "config.json"] if folder is not None else []
    if folder is None and (is_builtin(model.source) or model.source.lower().endswith(".gguf")):
        return _gguf_context(model)  # not imported yet: the file says
    if folder is None:
        from pensievectl import hub

        for cached in hub.cached_models():
            if cached.repo_id == model.source.removeprefix(HUB_PREFIX):
                files = sorted(cached.path.glob("snapshots/*/config.json"))
    try:
        return facts_of(json.loads(files[-1].read_text())).declared_context
    except (IndexError, OSError, ValueError, AttributeError):
        return None


def _gguf_context(model: ModelConfig) -> int | None:
    """The context a GGUF file declares (`<arch>.context_length`), read without MLX."""
    from gguf import GGUFReader

    path = builtin_gguf_path() if is_builtin(model.source) else Path(model.source).expanduser()
    try:
        fields = GGUFReader(str(path)).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        declared = int(fields[f"{arch}.context_length"].parts[-1][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return declared if declared > 0 else None


def compact_at(context: int) -> dict[str, str]:
    """The variables that make Claude Code compact before `context` tokens, not at its 200k.

    The window cannot go below 100k, so a smaller model gets a 100k window and
    a percentage of it that lands where the model's context, less room for the
    summary, ends.
    """
    window = max(COMPACT_WINDOW_MIN, min(context, COMPACT_WINDOW_MAX))
    threshold = context - min(COMPACT_SUMMARY_ROOM, context // 4)
    percent = max(1, min(100, threshold * 100 // window))
    return {
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(window),
        "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE": str(percent),
    }


def shell_lines(setup: ClaudeSetup, shell: str, environ: dict[str, str] | None = None) -> list[str]:
    """`pensievectl env`'s output: a comment when in minimal mode, then one line per variable.

    A shell that an earlier `env` put in minimal mode is taken out of it once
    the model is big enough.
    """
    environ = dict(os.environ) if environ is None else environ
    lines = [f"# pensieve: {setup.minimal_reason()}"] if setup.minimal else []
    for name, value in setup.variables().items():
        lines.append(_assign(shell, name, value))
    if not setup.minimal and environ.get(MINIMAL_MODE):
        lines.append(f"# pensieve: {setup.main_model} holds Claude Code's full prompt")
        lines.append(f"set -e {MINIMAL_MODE}" if shell == "fish" else f"unset {MINIMAL_MODE}")
    return lines


def _assign(shell: str, name: str, value: str) -> str:
    import shlex

    if shell == "fish":
        return f"set -gx {name} {shlex.quote(value)}"
    return f"export {name}={shlex.quote(value)}"
