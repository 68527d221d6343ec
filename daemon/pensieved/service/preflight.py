"""Can this machine run Pensieve? One sentence when it cannot.

MLX 0.32's wheels exist only for Apple silicon, a native arm64 Python and
macOS 14 or later (its install page; pip resolves nothing for an x86_64 Mac
or for macOS 13). pip's own answer there, "No matching distribution found
for mlx", names none of the three. `make` runs this file with each Python it
considers (tools/venv.sh), before pip; `pensieved` calls `unsupported` at
start. It imports only the standard library, so it runs before anything is
installed: `python3 -I daemon/pensieved/service/preflight.py` exits 1 with
the sentence on stderr.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

MACOS_MINIMUM = (14, 0)
REQUIREMENT = "Pensieve needs a Mac with Apple silicon, a native arm64 Python and macOS 14 or later"


@dataclass(frozen=True)
class Host:
    """The facts that decide it, as this Python process sees them."""

    system: str  # sys.platform
    machine: str  # platform.machine() of this interpreter: arm64, x86_64
    macos: str = ""  # the macOS version, "14.5"; "" elsewhere or when unknown
    translated: bool = False  # this process runs under Rosetta (sysctl.proc_translated)


def unsupported(host: Host) -> str | None:
    """Why MLX cannot run here, as one sentence; None when it can (any non-Mac too)."""
    if host.system != "darwin":
        return None
    if host.translated:
        # An x86_64 Python on an Apple-silicon Mac: Intel Homebrew under
        # /usr/local, or a Terminal opened with "Open using Rosetta".
        why = (
            "this Python is an x86_64 build running under Rosetta; use a native one, "
            "e.g. make PYTHON=/opt/homebrew/bin/python3.13"
        )
    elif host.machine != "arm64":
        why = f"this is an Intel Mac ({host.machine}), for which MLX has no build"
    elif host.macos and _version(host.macos) < MACOS_MINIMUM:
        why = f"this Mac runs macOS {host.macos}, for which MLX 0.32 has no build"
    else:
        return None
    return f"{REQUIREMENT}: {why}."


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def this_host() -> Host:
    if sys.platform != "darwin":
        return Host(sys.platform, platform.machine())
    return Host(
        "darwin",
        platform.machine(),
        _macos_version(),
        _sysctl_int(b"sysctl.proc_translated") == 1,
    )


def _macos_version() -> str:
    version = platform.mac_ver()[0]
    if version.startswith("10.16"):
        # A Python built against an old SDK is told "10.16" for any macOS
        # from 11 on; sw_vers says the truth when asked without the shim.
        try:
            answer = subprocess.run(
                ["/usr/bin/sw_vers", "-productVersion"],
                capture_output=True,
                text=True,
                env={**os.environ, "SYSTEM_VERSION_COMPAT": "0"},
                check=True,
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return answer.stdout.strip()
    return version


def _sysctl_int(name: bytes) -> int | None:
    """One integer sysctl read in-process; None when the name does not exist."""
    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    libc = ctypes.CDLL(None)
    if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None  # e.g. proc_translated on an Intel Mac
    return value.value


if __name__ == "__main__":
    problem = unsupported(this_host())
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(1)
