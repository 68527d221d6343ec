"""Claude Code's user settings: Pensieve's address, token and model tiers in its `env`.

Claude Code reads `~/.claude/settings.json` (`$CLAUDE_CONFIG_DIR/settings.json`
when set); variables in its `env` object apply to every session. The file
may hold the user's own settings, so it is backed up byte for byte before the
first change, and `undo` puts that copy back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pensieved.config import Config, ModelConfig
from pensieved.models.registry import CLAUDE_TIERS, ModelRegistry, local_model_dir
from pensieved.wire.errors import NotFound

# One representative client name per tier, resolved like any request.
TIER_NAMES = {
    f"ANTHROPIC_DEFAULT_{tier.upper()}_MODEL": name for tier, name in CLAUDE_TIERS.items()
}
# Claude Code's prompt (system text + ~15k tokens of tool schemas), rendered
# through a small model's template: ~20-25k tokens. `pensievectl doctor` measures it.
CLAUDE_CODE_PROMPT_TOKENS = 24_000
# What a turn needs beyond the prompt: Claude Code's reply and a few tool results.
REPLY_ROOM = 8_192
# Claude Code 2.1 clamps CLAUDE_CODE_AUTO_COMPACT_WINDOW to [100k, 1M] and then
# to the model's window (200k for a name it does not know); it compacts at
# min(window * CLAUDE_AUTOCOMPACT_PCT_OVERRIDE / 100, window - 13k).
COMPACT_WINDOW_MIN, COMPACT_WINDOW_MAX = 100_000, 1_000_000
COMPACT_SUMMARY_ROOM = 13_000
BACKUP_SUFFIX = ".pensieve-backup"
# Left instead of a backup when there was no settings file: undo removes it.
ABSENT_SUFFIX = ".pensieve-absent"


class SettingsError(Exception):
    pass


def model_tiers(config: Config) -> dict[str, str]:
    """ANTHROPIC_DEFAULT_*_MODEL and ANTHROPIC_MODEL → the local model serving that tier.

    A tier that resolves to no model (no alias and no default) is left out.
    ANTHROPIC_MODEL, the main model, is the opus tier's (else sonnet's).
    """
    registry = ModelRegistry(config)
    tiers = {}
    for variable, client_name in TIER_NAMES.items():
        try:
            tiers[variable] = registry.resolve(client_name).name
        except NotFound:
            continue
    main = tiers.get("ANTHROPIC_DEFAULT_OPUS_MODEL") or tiers.get("ANTHROPIC_DEFAULT_SONNET_MODEL")
    if main:
        tiers["ANTHROPIC_MODEL"] = main
        context = model_context(config, registry.get(main))
        if context is not None:
            tiers.update(compact_at(context))
    return tiers


def model_context(config: Config, model: ModelConfig) -> int | None:
    """The model's context without loading it: its config, else its config.json; None if unknown.

    Reads what the daemon reads (`context_length`, else `max_position_embeddings`).
    """
    if model.context_length is not None:
        return model.context_length
    folder = local_model_dir(model, config.paths.models_dir)
    files = [folder / "config.json"] if folder is not None else []
    if folder is None:
        from pensievectl import hub

        for cached in hub.cached_models():
            if cached.repo_id == model.source:
                files = sorted(cached.path.glob("snapshots/*/config.json"))
    try:
        declared = json.loads(files[-1].read_text())["max_position_embeddings"]
    except (IndexError, OSError, ValueError, KeyError):
        return None
    return declared if isinstance(declared, int) and declared > 0 else None


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


def settings_file() -> Path:
    configured = os.environ.get("CLAUDE_CONFIG_DIR")
    folder = Path(configured).expanduser() if configured else Path.home() / ".claude"
    return folder / "settings.json"


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def install(path: Path, variables: dict[str, str]) -> Path | None:
    """Merge `variables` into the file's `env`; return the backup made (None if one existed)."""
    original = path.read_bytes() if path.exists() else None
    settings = _parse(path, original)
    env = settings.setdefault("env", {})
    if not isinstance(env, dict):
        raise SettingsError(f"{path}: `env` is not an object; not changed")
    env.update(variables)

    # Keep the first backup: a second run must not replace the user's
    # original with the file this command already changed.
    backup, absent = _sidecar(path, BACKUP_SUFFIX), _sidecar(path, ABSENT_SUFFIX)
    made: Path | None = None
    if not backup.exists() and not absent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if original is None:
            absent.write_bytes(b"")
            made = absent
        else:
            backup.write_bytes(original)
            backup.chmod(path.stat().st_mode & 0o777)
            made = backup
    _write(path, (json.dumps(settings, indent=2) + "\n").encode())
    return made


def undo(path: Path) -> str:
    """Put the file back as it was before the first `install`; say what was done."""
    backup, absent = _sidecar(path, BACKUP_SUFFIX), _sidecar(path, ABSENT_SUFFIX)
    if backup.exists():
        _write(path, backup.read_bytes(), mode=backup.stat().st_mode & 0o777)
        backup.unlink()
        return f"restored {path} from {backup.name}"
    if absent.exists():
        path.unlink(missing_ok=True)
        absent.unlink()
        return f"removed {path} (there was none before)"
    raise SettingsError(f"nothing to undo: no {backup.name} next to {path}")


def _parse(path: Path, data: bytes | None) -> dict[str, object]:
    if data is None or not data.strip():
        return {}
    try:
        settings = json.loads(data)
    except ValueError as exc:
        raise SettingsError(f"{path}: not valid JSON ({exc}); not changed") from exc
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: not a JSON object; not changed")
    return settings


def _write(path: Path, data: bytes, mode: int | None = None) -> None:
    # The token goes in here: a new file is private. Write-then-rename so a
    # crash never leaves Claude Code a half-written file.
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sidecar(path, ".pensieve-tmp")
    temporary.write_bytes(data)
    temporary.chmod(mode)
    temporary.replace(path)
