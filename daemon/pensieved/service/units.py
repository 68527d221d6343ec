"""The daemon as a login service: one description, a launchd and a systemd renderer.

In the spirit of Homebrew's `service.rb`: `describe` says what to run and how
(absolute paths into the installed venv, environment, logs, restart policy);
`render_plist` and `render_systemd_unit` are pure; `ServiceManager` writes the
file and drives `launchctl`/`systemctl` through one injectable runner, so the
argument lists are tested on any OS without touching the real service manager.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pensieved.config import Config

LABEL = "dev.pensieve.daemon"
SYSTEMD_UNIT = "pensieve.service"
# launchd's default ExitTimeOut is 20 s; the daemon's own drain is shorter.
STOP_TIMEOUT_S = 30
THROTTLE_S = 10
# launchctl's answers while a job winds down: 5 (EIO) from a bootout mid-exit,
# 36 EINPROGRESS "Operation now in progress" (Homebrew retries bootout on it),
# 37 EALREADY "Operation already in progress".
LAUNCHCTL_BUSY = (5, 36, 37)
# How long a re-install or uninstall waits for the old daemon to be gone: its
# drain, within launchd's ExitTimeOut, and a margin.
WAIT_S = STOP_TIMEOUT_S + 5
POLL_S = 0.5

# launchd's StandardOutPath/StandardErrorPath, in the log directory.
STDOUT_LOG = "pensieved.out.log"
STDERR_LOG = "pensieved.err.log"

# Set in the service's environment: how the daemon knows who restarts it.
SUPERVISOR_ENV = "PENSIEVE_SUPERVISOR"
# `pensieved` exits 1 when it cannot start (bad config, port in use, already
# running, a model that fails to load): starting again does not fix that, so
# systemd is told not to restart it, and under launchd, which restarts every
# non-zero exit and has no such setting, the daemon exits 0 instead.
EXIT_CANNOT_START = 1
# An unexpected exception (sysexits' EX_SOFTWARE): both managers restart it.
EXIT_CRASHED = 70
# systemd: a daemon that crashes this often in this window stays down.
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL_S = 300

# Carried from the installing shell into the service's environment, when set:
# launchd and systemd --user read no shell profile, and without these the
# daemon misses the Hugging Face cache `pensievectl pull` filled (HF_HOME on an
# external disk is common on a Mac), a gated repo's token, or the proxy.
CARRIED_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
)
# A service file carrying one of these is written 0600, not 0644.
SECRET_ENV = ("HF_TOKEN",)

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


def supervisor() -> str | None:
    """Which service manager started this process ("launchd", "systemd"); None by hand."""
    return os.environ.get(SUPERVISOR_ENV) or None


@dataclass(frozen=True)
class ServiceDescription:
    label: str
    program: tuple[str, ...]
    environment: dict[str, str]
    log_dir: Path
    working_dir: Path
    stop_timeout: int = STOP_TIMEOUT_S
    throttle: int = THROTTLE_S
    extra_unit_settings: dict[str, str] = field(default_factory=dict)

    # The daemon writes its own pensieved.log; these catch anything else
    # (a crash before logging starts, native libraries' output).
    @property
    def stdout_log(self) -> Path:
        return self.log_dir / STDOUT_LOG

    @property
    def stderr_log(self) -> Path:
        return self.log_dir / STDERR_LOG

    @property
    def secrets(self) -> list[str]:
        """The variables in `environment` that are secrets."""
        return [name for name in SECRET_ENV if name in self.environment]


def describe(
    config: Config, executable: Path | None = None, environ: Mapping[str, str] = os.environ
) -> ServiceDescription:
    """How to run this installation's daemon at login; `environ` is the installing shell's."""
    executable = executable or Path(sys.executable).with_name("pensieved")
    program: list[str] = [str(executable.absolute())]
    if config.paths.config_file.exists():
        program += ["--config", str(config.paths.config_file.absolute())]
    environment = {
        # launchd starts jobs with a bare PATH; keep the venv's bin first, and
        # /usr/sbin for sysctl (kernel memory pressure on macOS).
        "PATH": f"{executable.parent.absolute()}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        # No terminal to draw them on: tqdm bars would only fill the err log.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if home := environ.get("PENSIEVE_HOME"):
        environment["PENSIEVE_HOME"] = str(Path(home).absolute())
    environment.update({name: environ[name] for name in CARRIED_ENV if environ.get(name)})
    limits = {
        "MemoryHigh": config.service.memory_high,
        "MemoryMax": config.service.memory_max,
    }
    return ServiceDescription(
        label=LABEL,
        program=tuple(program),
        environment=environment,
        log_dir=config.paths.log_dir.absolute(),
        working_dir=config.paths.data_dir.absolute(),
        extra_unit_settings={k: v for k, v in limits.items() if v is not None},
    )


def render_plist(desc: ServiceDescription, session: str = "Aqua") -> bytes:
    """The LaunchAgent: started at login, restarted only after a crash.

    `session` is the launchd session type it loads into: "Aqua" in a GUI
    login, "Background" for the per-user domain of an ssh or headless login
    (a plist without the key is Aqua-only, and refused there).
    """
    return plistlib.dumps(
        {
            "Label": desc.label,
            "ProgramArguments": list(desc.program),
            "RunAtLoad": True,
            # A clean exit 0 (the memory guard's self-shutdown, or a daemon
            # that cannot start: see EXIT_CANNOT_START) must not be restarted.
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": desc.throttle,
            "ProcessType": "Interactive",
            "ExitTimeOut": desc.stop_timeout,
            "LimitLoadToSessionType": session,
            "EnvironmentVariables": {**desc.environment, SUPERVISOR_ENV: "launchd"},
            "WorkingDirectory": str(desc.working_dir),
            "StandardOutPath": str(desc.stdout_log),
            "StandardErrorPath": str(desc.stderr_log),
        }
    )


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-:=+@" for c in arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _environment_line(name: str, value: str) -> str:
    # `%` starts a systemd specifier (a proxy URL may carry %40).
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{name}={escaped}"'


def render_systemd_unit(desc: ServiceDescription) -> str:
    """The `systemd --user` unit: `Type=notify` (the daemon sends READY=1)."""
    environment = {**desc.environment, SUPERVISOR_ENV: "systemd"}
    lines = [
        "[Unit]",
        "Description=Pensieve: a local model behind the Anthropic Messages API",
        "After=network.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=notify",
        f"ExecStart={' '.join(_quote(a) for a in desc.program)}",
        *(_environment_line(k, v) for k, v in environment.items()),
        f"WorkingDirectory={desc.working_dir}",
        "Restart=on-failure",
        f"RestartSec={desc.throttle}",
        f"RestartPreventExitStatus={EXIT_CANNOT_START}",
        f"TimeoutStopSec={desc.stop_timeout}",
        *(f"{k}={v}" for k, v in desc.extra_unit_settings.items()),
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


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
            self._check("systemctl", "--user", "daemon-reload")
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
        self.service_file.unlink(missing_ok=True)
        if self._platform != "darwin":
            self._check("systemctl", "--user", "daemon-reload")

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
