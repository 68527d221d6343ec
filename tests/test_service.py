"""The login service: one description, a plist and a unit, and the exact manager commands."""

from __future__ import annotations

import plistlib
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from pensieved.config import Config
from pensieved.service.units import (
    LABEL,
    SYSTEMD_UNIT,
    ServiceError,
    ServiceManager,
    describe,
    render_plist,
    render_systemd_unit,
)
from tests.daemon import daemon_env, free_port

UID = 501


class RecordingRunner:
    """Stands in for launchctl/systemctl: records argv, answers from a script."""

    def __init__(self, answers: dict[tuple[str, ...], int] | None = None) -> None:
        self.calls: list[list[str]] = []
        self._answers = answers or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        code = self._answers.get(tuple(argv), 0)
        return subprocess.CompletedProcess(list(argv), code, "", "refused" if code else "")


def test_plist_has_the_launchd_keys_and_absolute_paths(pensieve_home: Path) -> None:
    desc = describe(Config())
    plist = plistlib.loads(render_plist(desc))
    assert plist["Label"] == LABEL
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] == 30
    assert plist["ProgramArguments"][0].endswith("/pensieved")
    for path in (
        *plist["ProgramArguments"][:1],
        plist["StandardOutPath"],
        plist["StandardErrorPath"],
        plist["WorkingDirectory"],
    ):
        assert Path(path).is_absolute()
    assert Path(plist["ProgramArguments"][0]).exists()
    assert plist["EnvironmentVariables"]["PENSIEVE_HOME"] == str(pensieve_home)
    assert plist["EnvironmentVariables"]["PATH"].startswith(
        str(Path(plist["ProgramArguments"][0]).parent)
    )


def test_program_names_the_config_file_when_there_is_one(pensieve_home: Path) -> None:
    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text("[server]\nport = 7000\n")
    desc = describe(Config())
    assert desc.program[1:] == ("--config", str(pensieve_home / "config.toml"))


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(pensieve_home: Path, tmp_path: Path) -> None:
    unit = tmp_path / SYSTEMD_UNIT
    unit.write_text(render_systemd_unit(describe(Config())))
    result = verify(unit)
    # verify exits 0 on parse warnings too; they show on stderr, naming the file.
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text and "TimeoutStopSec=30" in text
    # The check can fail: a broken unit is refused.
    unit.write_text(text.replace("Type=notify", "Type=sometimes"))
    broken = verify(unit)
    assert f"{unit}:6: Failed to parse service type" in broken.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_memory_limits_from_config_reach_the_unit(pensieve_home: Path, tmp_path: Path) -> None:
    from pensieved.config import parse_config
    from pensieved.paths import default_paths

    config = parse_config({"service": {"memory_high": "12G", "memory_max": "14G"}}, default_paths())
    unit = tmp_path / SYSTEMD_UNIT
    unit.write_text(render_systemd_unit(describe(config)))
    assert "MemoryHigh=12G\nMemoryMax=14G\n" in unit.read_text()
    result = verify(unit)
    assert result.returncode == 0 and str(unit) not in result.stderr, result.stderr
    assert "Memory" not in render_systemd_unit(describe(Config()))


def manager(platform: str, home: Path, runner: RecordingRunner) -> ServiceManager:
    return ServiceManager(
        describe(Config()),
        platform=platform,
        home=home,
        uid=UID,
        runner=runner,
        sleep=lambda _: None,
    )


def test_macos_install_bootstraps_into_the_gui_domain(tmp_path: Path) -> None:
    runner = RecordingRunner(
        {
            ("launchctl", "print", f"gui/{UID}/{LABEL}"): 113,
            ("launchctl", "print", f"user/{UID}/{LABEL}"): 113,
        }
    )
    path = manager("darwin", tmp_path, runner).install()
    assert path == tmp_path / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    assert plistlib.loads(path.read_bytes())["Label"] == LABEL
    assert runner.calls == [
        ["launchctl", "print", f"gui/{UID}/{LABEL}"],
        ["launchctl", "print", f"user/{UID}/{LABEL}"],
        ["launchctl", "bootstrap", f"gui/{UID}", str(path)],
    ]


def test_macos_install_without_a_gui_session_uses_the_user_domain(tmp_path: Path) -> None:
    plist = str(tmp_path / "Library" / "LaunchAgents" / f"{LABEL}.plist")
    runner = RecordingRunner(
        {
            ("launchctl", "print", f"gui/{UID}/{LABEL}"): 113,
            ("launchctl", "print", f"user/{UID}/{LABEL}"): 113,
            ("launchctl", "bootstrap", f"gui/{UID}", plist): 125,
        }
    )
    manager("darwin", tmp_path, runner).install()
    assert runner.calls[-1] == ["launchctl", "bootstrap", f"user/{UID}", plist]


def test_macos_reinstall_restarts_the_running_agent(tmp_path: Path) -> None:
    runner = RecordingRunner()
    manager("darwin", tmp_path, runner).install()
    assert runner.calls == [
        ["launchctl", "print", f"gui/{UID}/{LABEL}"],
        ["launchctl", "kickstart", "-k", f"gui/{UID}/{LABEL}"],
    ]


def test_macos_uninstall_retries_while_launchd_is_busy(tmp_path: Path) -> None:
    runner = RecordingRunner()
    service = manager("darwin", tmp_path, runner)
    service.install()
    busy = {("launchctl", "bootout", f"gui/{UID}/{LABEL}"): 37}
    calls = 0

    def answers(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        nonlocal calls
        calls += 1
        code = busy.get(tuple(argv), 0) if calls < 3 else 0
        return subprocess.CompletedProcess(list(argv), code, "", "")

    uninstall = ServiceManager(
        describe(Config()),
        platform="darwin",
        home=tmp_path,
        uid=UID,
        runner=answers,
        sleep=lambda _: None,
    )
    uninstall.uninstall()
    assert calls == 4  # two busy answers for gui/, then done, then user/
    assert not service.service_file.exists()


def test_linux_install_and_uninstall(tmp_path: Path) -> None:
    runner = RecordingRunner()
    service = manager("linux", tmp_path, runner)
    path = service.install()
    assert path == tmp_path / ".config" / "systemd" / "user" / SYSTEMD_UNIT
    assert "Type=notify" in path.read_text()
    assert runner.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT],
        ["systemctl", "--user", "restart", SYSTEMD_UNIT],
    ]
    runner.calls.clear()
    service.uninstall()
    assert runner.calls == [
        ["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not path.exists()


def test_a_refusal_is_reported_with_the_managers_answer(tmp_path: Path) -> None:
    runner = RecordingRunner({("systemctl", "--user", "daemon-reload"): 1})
    with pytest.raises(ServiceError, match=r"daemon-reload.*refused"):
        manager("linux", tmp_path, runner).install()


def test_daemon_tells_systemd_when_ready_and_stopping(tiny_dir: Path, tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(120)
    home = tmp_path / "home"
    env = {**daemon_env(home), "NOTIFY_SOCKET": str(notify)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pensieved", "--model", str(tiny_dir), "--port", str(free_port())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1")
        assert f"MAINPID={process.pid}" in ready
        process.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert process.wait(30) == 0
    finally:
        process.kill()
        listener.close()


def test_pensievectl_service_install_and_uninstall_end_to_end(tmp_path: Path) -> None:
    """The CLI through the real subprocess runner; `systemctl` is a recorder on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "systemctl.calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {record}\n')
    fake.chmod(0o755)
    env = {
        **daemon_env(tmp_path / "pensieve-home"),
        "HOME": str(tmp_path / "user"),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
    }

    def pensievectl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pensievectl", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    installed = pensievectl("service", "install")
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / SYSTEMD_UNIT
    assert installed.stdout.strip() == f"installed {unit}"
    assert f"ExecStart={Path(sys.executable).with_name('pensieved')}" in unit.read_text()
    removed = pensievectl("service", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert record.read_text().splitlines() == [
        "--user daemon-reload",
        f"--user enable --now {SYSTEMD_UNIT}",
        f"--user restart {SYSTEMD_UNIT}",
        f"--user disable --now {SYSTEMD_UNIT}",
        "--user daemon-reload",
    ]


def run_show(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pensievectl service show ARGS`, PENSIEVE_HOME the test's, HOME a fresh one."""
    env = {**daemon_env(tmp_path / "pensieve-home"), "HOME": str(tmp_path / "user")}
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", "service", "show", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_service_show_prints_the_unit_install_would_write_and_writes_nothing(
    pensieve_home: Path, tmp_path: Path
) -> None:
    shown = run_show(tmp_path, "--platform", "linux")
    assert shown.returncode == 0, shown.stderr
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / SYSTEMD_UNIT
    assert shown.stderr.strip() == f"would be written to {unit}"
    pensieved = Path(sys.executable).with_name("pensieved").absolute()
    assert pensieved.exists()
    assert f"\nExecStart={pensieved}\n" in shown.stdout
    assert f'\nEnvironment="PENSIEVE_HOME={pensieve_home}"\n' in shown.stdout
    assert shown.stdout.startswith("[Unit]\n")
    assert shown.stdout.endswith("WantedBy=default.target\n")
    # Nothing installed: no unit, no service directories, no log or data dirs.
    assert not unit.exists()
    assert not (tmp_path / "user").exists()
    assert not pensieve_home.exists()
    # Byte for byte what `install` writes for the same installation.
    installed = manager("linux", tmp_path / "installed", RecordingRunner()).install()
    assert installed.read_text() == shown.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_service_show_unit_verifies(tmp_path: Path) -> None:
    shown = run_show(tmp_path, "--platform", "linux")
    assert shown.returncode == 0, shown.stderr
    unit = tmp_path / SYSTEMD_UNIT
    unit.write_text(shown.stdout)
    result = verify(unit)
    assert result.returncode == 0 and str(unit) not in result.stderr, result.stderr


def test_service_show_macos_prints_the_launch_agent(pensieve_home: Path, tmp_path: Path) -> None:
    shown = run_show(tmp_path, "--platform", "macos")
    assert shown.returncode == 0, shown.stderr
    plist = plistlib.loads(shown.stdout.encode())
    assert plist["Label"] == LABEL
    pensieved = Path(sys.executable).with_name("pensieved").absolute()
    assert plist["ProgramArguments"] == [str(pensieved)]
    assert plist["EnvironmentVariables"]["PENSIEVE_HOME"] == str(pensieve_home)
    agent = tmp_path / "user" / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    assert shown.stderr.strip() == f"would be written to {agent}"
    assert not agent.exists()
    assert not (tmp_path / "user").exists()
    installed = manager("darwin", tmp_path / "installed", RecordingRunner()).install()
    assert installed.read_bytes() == shown.stdout.encode()


def test_service_show_defaults_to_this_platform(tmp_path: Path) -> None:
    shown = run_show(tmp_path)
    assert shown.returncode == 0, shown.stderr
    this = run_show(tmp_path, "--platform", "macos" if sys.platform == "darwin" else "linux")
    assert shown.stdout == this.stdout and shown.stderr == this.stderr
