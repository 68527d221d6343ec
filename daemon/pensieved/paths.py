"""Where Pensieve keeps its files on this machine.

Everything is relocatable under one `PENSIEVE_HOME` (tests point it at a temp
dir). Otherwise the per-OS conventions apply: Application Support and
~/Library/Logs on macOS, the XDG directories on Linux. On macOS, models and
saved prompt caches go to ~/Library/Caches, which Time Machine skips: they
are gigabytes, rewritten often, and can be made again from their sources.

The control socket's directory must be short: a Unix socket's path has to
fit in `sun_path` (104 bytes on macOS, 108 on Linux, with the final NUL).
pytest's temp dirs on a Mac and deep `PENSIEVE_HOME`s are longer, so a
directory whose socket path would not fit is swapped for a short private one
under /tmp.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "Pensieve"
# Sizes in config and reports are GiB; one constant for every layer and pensievectl.
GB = 1024**3
SOCKET_NAME = "pensieve.sock"
# sizeof(sockaddr_un.sun_path): 108 on Linux, 104 on macOS and the BSDs.
SUN_PATH_SIZE = {"linux": 108}
DEFAULT_SUN_PATH_SIZE = 104
# Where a too-long runtime dir is moved to. Not $TMPDIR: the daemon (under
# launchd) and `pensievectl` (in a shell) must agree on the socket's path
# without sharing an environment, and /tmp is the same for both.
SHORT_RUNTIME_ROOT = Path("/tmp")


@dataclass(frozen=True)
class Paths:
    config_file: Path
    data_dir: Path  # token, and imported models unless `cache_dir` is set
    log_dir: Path
    runtime_dir: Path  # control socket
    cache_dir: Path | None = None  # models and saved prompt caches (macOS: ~/Library/Caches)

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def models_dir(self) -> Path:
        return (self.cache_dir or self.data_dir) / "models"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME


def default_paths(platform: str = sys.platform) -> Paths:
    home = os.environ.get("PENSIEVE_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(root / "config.toml", root, root / "logs", runtime_dir(root / "run", platform))
    if platform == "darwin":
        library = Path.home() / "Library"
        support = library / "Application Support" / APP_NAME
        return Paths(
            support / "config.toml",
            support,
            library / "Logs" / APP_NAME,
            runtime_dir(support / "run", platform),
            cache_dir=library / "Caches" / APP_NAME,
        )
    name = APP_NAME.lower()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    data = platformdirs.user_data_path(name)
    return Paths(
        platformdirs.user_config_path(name) / "config.toml",
        data,
        platformdirs.user_log_path(name),
        runtime_dir(Path(runtime) / name if runtime else data / "run", platform),
    )


def max_socket_path(platform: str = sys.platform) -> int:
    """The longest Unix socket path, in bytes, that `platform` can bind (the NUL excluded)."""
    return SUN_PATH_SIZE.get(platform, DEFAULT_SUN_PATH_SIZE) - 1


def socket_path_fits(path: Path, platform: str = sys.platform) -> bool:
    return len(os.fsencode(path)) <= max_socket_path(platform)


def runtime_dir(preferred: Path, platform: str = sys.platform) -> Path:
    """`preferred`, or a short stand-in under /tmp when its socket path would not fit.

    The stand-in is named after the user and a hash of `preferred`, so that
    every daemon home keeps its own socket and the daemon and its clients
    find the same one. `private_dir` creates it 0700 and checks its owner
    (anyone may create names in /tmp).
    """
    if socket_path_fits(preferred / SOCKET_NAME, platform):
        return preferred
    digest = hashlib.sha256(os.fsencode(os.path.abspath(preferred))).hexdigest()[:12]
    return SHORT_RUNTIME_ROOT / f"pensieve-{os.getuid()}-{digest}"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 for the leaf, which must be this user's.

    A leaf owned by someone else (a directory, or a symlink, planted in a
    shared place such as /tmp) raises `PermissionError` instead of being used.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    uid = os.getuid()
    for info in (path.lstat(), path.stat()):
        if info.st_uid != uid:
            raise PermissionError(
                f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid}); "
                "remove it or point PENSIEVE_HOME elsewhere"
            )
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `path` 0600 through a temporary file renamed over it (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # a leftover partial file keeps its old mode
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
