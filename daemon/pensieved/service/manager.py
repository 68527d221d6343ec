"""Installing and removing the login service: `ServiceManager` drives `launchctl`/`systemctl`.

It writes the service file that units.py renders (with an exact mode),
boots an old job out and waits for it to be gone, and refuses up front to
install where macOS's privacy protection (TCC) would keep the daemon out.
Every command goes through one injectable runner, so the argument lists are
tested on any OS without touching the real service manager.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pensieved.service.units import (
    STOP_TIMEOUT_S,
    SYSTEMD_UNIT,
    ServiceDescription,
    render_plist,
    render_systemd_unit,
)

# launchctl's answers while a job winds down: 5 (EIO) from a bootout mid-exit,
# 36 EINPROGRESS "Operation now in progress" (Homebrew retries bootout on it),
# 37 EALREADY "Operation already in progress".
LAUNCHCTL_BUSY = (5, 36, 37)
# How long a re-install or uninstall waits for the old daemon to be gone: its
# drain, within launchd's ExitTimeOut, and a margin.
WAIT_S = STOP_TIMEOUT_S + 5
POLL_S = 0.5

# The folders macOS's privacy protection (TCC) keeps a launchd-started program
# out of, whatever Terminal was allowed: the interpreter gets EPERM ("Operation
# not permitted") reading the venv. Relative to the home directory; iCloud
# Drive is Library/Mobile Documents, File Provider clouds Library/CloudStorage.
TCC_PROTECTED = (
    "Desktop",
    "Documents",
    "Downloads",
    "Library/Mobile Documents",
    "Library/CloudStorage",
)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def tcc_protected(path: Path, home: Path) -> str | None:
    """The TCC-protected place `path` is in ("~/Documents", "/Volumes/SSD"); None if none.

    Compared without case: APFS volumes are case-insensitive by default.
    """
    parts = [part.casefold() for part in path.parts]
    if len(parts) > 2 and parts[:2] == ["/", "volumes"]:
        return f"/Volumes/{path.parts[2]}"
    home_parts = [part.casefold() for part in home.parts]
    if parts[: len(home_parts)] != home_parts:
        return None
    rest = parts[len(home_parts) :]
    for folder in TCC_PROTECTED:
        inside = folder.casefold().split("/")
        if rest[: len(inside)] == inside:
            return f"~/{folder}"
    return None


class ServiceError(RuntimeError):
    """The service manager refused; the message carries its answer."""


class ServiceManager:
    """Install or remove the login service with launchctl (macOS) or systemctl (Linux)."""

    def __init__(
        self,
        desc: ServiceDescription,
        *,
        platform: str = sys.platform,
        home: Path | None = None,
        uid: int | None = None,
        runner: Runner = run_command,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._desc = desc
        self._platform = platform
        self._home = home or Path.home()
        self._uid = os.getuid() if uid is None else uid
        self._run = runner
        self._sleep = sleep

    @property
    def service_file(self) -> Path:
        if self._platform == "darwin":
            return self._home / "Library" / "LaunchAgents" / f"{self._desc.label}.plist"
        return self._home / ".config" / "systemd" / "user" / SYSTEMD_UNIT

    def render(self, session: str = "Aqua") -> bytes:
        """The service file's content as `install` writes it (in a GUI login, on macOS)."""
        if self._platform == "darwin":
            return render_plist(self._desc, session)
        return render_systemd_unit(self._desc).encode()

    def install(self) -> Path:
        """Write the service file and start the daemon; re-running restarts it."""
        if self._platform == "darwin":
            self._refuse_protected_folders()
        self._desc.log_dir.mkdir(parents=True, exist_ok=True)
        self._desc.working_dir.mkdir(parents=True, exist_ok=True)
        if self._platform == "darwin":
            self._launchd_install()
        else:
            self._write(self.render())
            try:
                self._check("systemctl", "--user", "daemon-reload")
            except ServiceError as exc:
                # No user systemd here: leave nothing behind, and say what would help.
                self.service_file.unlink(missing_ok=True)
                raise ServiceError(
                    f"{exc}. There is no systemd user instance here: on a headless machine "
                    'or over ssh, `loginctl enable-linger "$USER"` starts one; in a container '
                    "or WSL, run `pensieved` in the foreground instead"
                ) from exc
            self._check("systemctl", "--user", "enable", "--now", SYSTEMD_UNIT)
            # enable --now leaves a running old version alone: restart it.
            self._check("systemctl", "--user", "restart", SYSTEMD_UNIT)
        return self.service_file

    def notes(self) -> list[str]:
        """What the user should know about what `install` writes (one line each)."""
        notes = [
            f"{name} is copied into {self.service_file}, which is written 0600"
            for name in self._desc.secrets
        ]
        if self._platform == "darwin":
            for name in ("HF_HOME", "HF_HUB_CACHE"):
                value = self._desc.environment.get(name)
                place = value and tcc_protected(Path(value).resolve(), self._home)
                if place:
                    notes.append(
                        f"{name} is in {place}, which macOS may keep the daemon out of: allow "
                        "its Python under System Settings › Privacy & Security › Files and "
                        "Folders if models are not found"
                    )
        return notes

    def uninstall(self) -> None:
        """Stop the daemon and remove the service file. Nothing installed is fine."""
        if self._platform == "darwin":
            for domain in (f"gui/{self._uid}", f"user/{self._uid}"):
                target = f"{domain}/{self._desc.label}"
                if self._loaded(target):
                    self._bootout(target)
        elif self.service_file.exists():
            self._run(["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT])
            self.service_file.unlink()
            self._check("systemctl", "--user", "daemon-reload")
        self.service_file.unlink(missing_ok=True)

    def _write(self, content: bytes) -> None:
        """Write the service file with an exact mode, whatever the umask.

        launchd refuses a group- or world-writable plist (umask 002 gives
        0664); one that carries a token is readable by its owner only.
        """
        mode = 0o600 if self._desc.secrets else 0o644
        path = self.service_file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # a leftover partial file keeps its old mode
            out.write(content)
        os.replace(partial, path)

    def _refuse_protected_folders(self) -> None:
        places: dict[str, list[str]] = {}
        program = Path(self._desc.program[0])
        paths = [
            program,
            program.with_name("python"),  # and the interpreter the venv points at
            *(Path(arg) for arg in self._desc.program[1:] if arg.startswith("/")),
            self._desc.working_dir,
            self._desc.log_dir,
        ]
        for path in paths:
            for candidate in (path, path.resolve()):
                place = tcc_protected(candidate, self._home)
                if place and str(candidate) not in places.get(place, []):
                    places.setdefault(place, []).append(str(candidate))
        if not places:
            return
        where = "; ".join(f"{place}: {', '.join(paths)}" for place, paths in places.items())
        raise ServiceError(
            "not installed: macOS's privacy protection (TCC) keeps a program that launchd "
            "starts out of ~/Desktop, ~/Documents, ~/Downloads, iCloud Drive, cloud folders "
            "and external volumes, whatever Terminal was allowed, so the daemon would fail "
            f'at every start with "Operation not permitted". In such a place: {where}.\n'
            "Fix: move the checkout out of it (e.g. to ~/src/pensieve) and run `make "
            "install` there; or install the runtime outside it: `python3 -m venv "
            "~/.local/pensieve && ~/.local/pensieve/bin/pip install CHECKOUT && "
            "~/.local/pensieve/bin/pensievectl service install` (not `pip install -e`, "
            "which keeps reading the checkout). Set PENSIEVE_HOME outside it too if it is "
            "the data or log directory."
        )

    def _launchd_domain(self) -> tuple[str, str]:
        """The domain to load into and the plist's session type for it.

        gui/UID when this user has a GUI login (its domain answers `print`);
        otherwise (ssh into a Mac nobody is logged into, a headless Mac)
        user/UID, whose agents run in the Background session. Chosen up
        front, as Homebrew does: a fallback after a failed gui bootstrap
        would report the fallback's error instead of the real one.
        """
        gui = f"gui/{self._uid}"
        if self._run(["launchctl", "print", gui]).returncode == 0:
            return gui, "Aqua"
        return f"user/{self._uid}", "Background"

    def _launchd_install(self) -> None:
        domain, session = self._launchd_domain()
        # An installed job is booted out and started again from the new plist:
        # launchd keeps the definition it loaded (`kickstart -k` would restart
        # the old one, and by SIGKILL, with no drain).
        for loaded_in in (f"gui/{self._uid}", f"user/{self._uid}"):
            target = f"{loaded_in}/{self._desc.label}"
            if self._loaded(target):
                self._bootout(target)
        self._write(self.render(session))
        # A job switched off (Login Items › Allow in the Background, or
        # `launchctl disable`) fails bootstrap with a bare "5: Input/output error".
        self._check("launchctl", "enable", f"{domain}/{self._desc.label}")
        argv = ["launchctl", "bootstrap", domain, str(self.service_file)]
        result = self._run(argv)
        if result.returncode != 0:
            raise ServiceError(
                f"{_refusal(argv, result)}\n"
                f"`launchctl print {domain}/{self._desc.label}` and Console.app may say more; "
                f"the daemon's own log is in {self._desc.log_dir}"
            )

    def _loaded(self, target: str) -> bool:
        return self._run(["launchctl", "print", target]).returncode == 0

    def _bootout(self, target: str) -> None:
        """Stop a loaded job and wait until launchd has let it go, its drain included."""
        argv = ["launchctl", "bootout", target]
        result = self._run(argv)
        for _ in range(int(WAIT_S / POLL_S)):
            if result.returncode not in LAUNCHCTL_BUSY:
                break
            self._sleep(POLL_S)
            result = self._run(argv)
        for _ in range(int(WAIT_S / POLL_S)):
            if not self._loaded(target):
                return
            self._sleep(POLL_S)
        answer = (result.stderr or result.stdout or "").strip()
        raise ServiceError(
            f"{target} is still loaded {WAIT_S} s after `launchctl bootout {target}` "
            f"(which answered {result.returncode}{': ' + answer if answer else ''})"
        )

    def _check(self, *argv: str) -> None:
        result = self._run(list(argv))
        if result.returncode != 0:
            raise ServiceError(_refusal(argv, result))


def _refusal(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    """The command and the manager's own answer, word for word."""
    answer = (result.stderr or result.stdout or "").strip()
    return f"`{' '.join(argv)}` failed ({result.returncode}): {answer}"
