"""Claude Code's user settings: what points it at Pensieve (claude_env.py), in its `env`.

Claude Code reads `~/.claude/settings.json` (`$CLAUDE_CONFIG_DIR/settings.json`
when set); variables in its `env` object apply to every session. The file
may hold the user's own settings, so it is backed up byte for byte before the
first change, and `undo` puts that copy back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pensieved.paths import write_private

BACKUP_SUFFIX = ".pensieve-backup"
# Left instead of a backup when there was no settings file: undo removes it.
ABSENT_SUFFIX = ".pensieve-absent"


class SettingsError(Exception):
    pass


def settings_file() -> Path:
    configured = os.environ.get("CLAUDE_CONFIG_DIR")
    folder = Path(configured).expanduser() if configured else Path.home() / ".claude"
    return folder / "settings.json"


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def install(path: Path, variables: dict[str, str], remove: tuple[str, ...] = ()) -> Path | None:
    """Merge `variables` into the file's `env`, taking `remove` out of it.

    Returns the backup made (None if one existed).
    """
    original = path.read_bytes() if path.exists() else None
    settings = _parse(path, original)
    env = settings.setdefault("env", {})
    if not isinstance(env, dict):
        raise SettingsError(f"{path}: `env` is not an object; not changed")
    env.update(variables)
    for name in remove:
        env.pop(name, None)

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
    """Write-then-rename, so a crash never leaves Claude Code a half-written file.

    Written 0600: the token goes in here (undo puts the backup's mode back).
    """
    write_private(path, data)
    if mode is not None:
        path.chmod(mode)
