"""The daemon as a login service: one description, a launchd and a systemd renderer.

In the spirit of Homebrew's `service.rb`: `describe` says what to run and how
(absolute paths into the installed venv, environment, logs, restart policy);
`render_plist` and `render_systemd_unit` are pure. manager.py's
`ServiceManager` writes the file and drives `launchctl`/`systemctl`.
"""

from __future__ import annotations

import os
import plistlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pensieved.config import Config
from pensieved.service.limits import OPEN_FILES

LABEL = "dev.pensieve.daemon"
SYSTEMD_UNIT = "pensieve.service"
# launchd's default ExitTimeOut is 20 s; the daemon's own drain is shorter.
STOP_TIMEOUT_S = 30
THROTTLE_S = 10

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
            # launchd's default soft limit is 256 open files (limits.py).
            "SoftResourceLimits": {"NumberOfFiles": OPEN_FILES},
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
