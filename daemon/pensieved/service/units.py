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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pensieved.config import Config

LABEL = "dev.pensieve.daemon"
SYSTEMD_UNIT = "pensieve.service"
# launchd's default ExitTimeOut is 20 s; the daemon's own drain is shorter.
STOP_TIMEOUT_S = 30
THROTTLE_S = 10
# launchctl answers "Operation now in progress" / exit 37 while a job winds down.
LAUNCHCTL_BUSY = (5, 37)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


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
        return self.log_dir / "pensieved.out.log"

    @property
    def stderr_log(self) -> Path:
        return self.log_dir / "pensieved.err.log"


def describe(config: Config, executable: Path | None = None) -> ServiceDescription:
    """How to run this installation's daemon at login."""
    executable = executable or Path(sys.executable).with_name("pensieved")
    program: list[str] = [str(executable.absolute())]
    if config.paths.config_file.exists():
        program += ["--config", str(config.paths.config_file.absolute())]
    environment = {
        # launchd starts jobs with a bare PATH; keep the venv's bin first.
        "PATH": f"{executable.parent.absolute()}:/usr/local/bin:/usr/bin:/bin",
    }
    if home := os.environ.get("PENSIEVE_HOME"):
        environment["PENSIEVE_HOME"] = str(Path(home).absolute())
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


def render_plist(desc: ServiceDescription) -> bytes:
    """The LaunchAgent: started at login, restarted only after a crash."""
    return plistlib.dumps(
        {
            "Label": desc.label,
            "ProgramArguments": list(desc.program),
            "RunAtLoad": True,
            # A clean exit 0 (e.g. the memory guard's self-shutdown) must not
            # be restarted straight back into the same pressure.
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": desc.throttle,
            "ProcessType": "Interactive",
            "ExitTimeOut": desc.stop_timeout,
            "EnvironmentVariables": desc.environment,
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


def render_systemd_unit(desc: ServiceDescription) -> str:
    """The `systemd --user` unit: `Type=notify` (the daemon sends READY=1)."""
    lines = [
        "[Unit]",
        "Description=Pensieve: a local model behind the Anthropic Messages API",
        "After=network.target",
        "",
        "[Service]",
        "Type=notify",
        f"ExecStart={' '.join(_quote(a) for a in desc.program)}",
        *(f'Environment="{k}={v}"' for k, v in desc.environment.items()),
        f"WorkingDirectory={desc.working_dir}",
        "Restart=on-failure",
        f"RestartSec={desc.throttle}",
        f"TimeoutStopSec={desc.stop_timeout}",
        *(f"{k}={v}" for k, v in desc.extra_unit_settings.items()),
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


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

    def render(self) -> bytes:
        """The service file's content, exactly as `install` writes it."""
        if self._platform == "darwin":
            return render_plist(self._desc)
        return render_systemd_unit(self._desc).encode()

    def install(self) -> Path:
        """Write the service file and start the daemon; re-running restarts it."""
        self._desc.log_dir.mkdir(parents=True, exist_ok=True)
        self._desc.working_dir.mkdir(parents=True, exist_ok=True)
        self.service_file.parent.mkdir(parents=True, exist_ok=True)
        self.service_file.write_bytes(self.render())
        if self._platform == "darwin":
            self._launchd_install()
        else:
            self._check("systemctl", "--user", "daemon-reload")
            self._check("systemctl", "--user", "enable", "--now", SYSTEMD_UNIT)
            # enable --now leaves a running old version alone: restart it.
            self._check("systemctl", "--user", "restart", SYSTEMD_UNIT)
        return self.service_file

    def uninstall(self) -> None:
        """Stop the daemon and remove the service file. Nothing installed is fine."""
        if self._platform == "darwin":
            self._launchd_bootout()
        elif self.service_file.exists():
            self._run(["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT])
        self.service_file.unlink(missing_ok=True)
        if self._platform != "darwin":
            self._check("systemctl", "--user", "daemon-reload")

    def _launchd_install(self) -> None:
        plist = str(self.service_file)
        for domain in (f"gui/{self._uid}", f"user/{self._uid}"):
            if self._run(["launchctl", "print", f"{domain}/{self._desc.label}"]).returncode == 0:
                # Already loaded (an upgrade): restart it on the new files.
                self._check("launchctl", "kickstart", "-k", f"{domain}/{self._desc.label}")
                return
        result = self._run(["launchctl", "bootstrap", f"gui/{self._uid}", plist])
        if result.returncode != 0:
            # No GUI session (ssh, CI): the per-user domain still runs agents.
            self._check("launchctl", "bootstrap", f"user/{self._uid}", plist)

    def _launchd_bootout(self) -> None:
        for domain in (f"gui/{self._uid}", f"user/{self._uid}"):
            target = f"{domain}/{self._desc.label}"
            for _ in range(10):
                result = self._run(["launchctl", "bootout", target])
                if result.returncode not in LAUNCHCTL_BUSY:
                    break
                self._sleep(0.5)

    def _check(self, *argv: str) -> None:
        result = self._run(list(argv))
        if result.returncode != 0:
            answer = (result.stderr or result.stdout).strip()
            raise ServiceError(f"`{' '.join(argv)}` failed ({result.returncode}): {answer}")
