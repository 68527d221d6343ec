"""Where Pensieve keeps its files on this machine.

Everything is relocatable under one `PENSIEVE_HOME` (tests point it at a temp
dir). Otherwise the per-OS conventions apply: Application Support and
~/Library/Logs on macOS, the XDG directories on Linux.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "Pensieve"


@dataclass(frozen=True)
class Paths:
    config_file: Path
    data_dir: Path  # token, imported models
    log_dir: Path
    runtime_dir: Path  # control socket

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "pensieve.sock"


def default_paths() -> Paths:
    home = os.environ.get("PENSIEVE_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(root / "config.toml", root, root / "logs", root / "run")
    if sys.platform == "darwin":
        support = Path.home() / "Library" / "Application Support" / APP_NAME
        return Paths(
            support / "config.toml",
            support,
            Path.home() / "Library" / "Logs" / APP_NAME,
            support / "run",
        )
    name = APP_NAME.lower()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    data = platformdirs.user_data_path(name)
    return Paths(
        platformdirs.user_config_path(name) / "config.toml",
        data,
        platformdirs.user_log_path(name),
        Path(runtime) / name if runtime else data / "run",
    )


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 for the leaf."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path
