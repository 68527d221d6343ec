"""The login service: one description, a plist and a unit, and the exact manager commands."""

from __future__ import annotations

import os
import plistlib
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pensieved.config import Config
from pensieved.service.limits import OPEN_FILES, raise_open_files
from pensieved.service.manager import ServiceError, ServiceManager, tcc_protected
from pensieved.service.units import (
    LABEL,
    SYSTEMD_UNIT,
    ServiceDescription,
    describe,
    render_plist,
    render_systemd_unit,
)
from tests.daemon import daemon_env, free_port, start_daemon

UID = 501
GUI, USER = f"gui/{UID}", f"user/{UID}"
NOT_FOUND = 113  # launchctl print: no such job or domain


class RecordingRunner:
    """Stands in for launchctl/systemctl: records argv, answers from a script.

    An answer is an exit code, or a list of codes given in turn (the last one
    then repeats); a non-zero answer's text is `texts[argv]`, else "refused".
    """

    def __init__(
        self,
        answers: Mapping[tuple[str, ...], int | list[int]] | None = None,
        texts: Mapping[tuple[str, ...], str] | None = None,
    ) -> None:
        self.calls: list[list[str]] = []
        self._answers = {
            k: list(v) if isinstance(v, list) else [v] for k, v in (answers or {}).items()
        }
        self._texts = texts or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        queue = self._answers.get(tuple(argv), [0])
        code = queue.pop(0) if len(queue) > 1 else queue[0]
        text = self._texts.get(tuple(argv), "refused") if code else ""
        return subprocess.CompletedProcess(list(argv), code, "", text)


def launchd(
    gui_session: bool = True,
    also: Mapping[tuple[str, ...], int | list[int]] | None = None,
    texts: Mapping[tuple[str, ...], str] | None = None,
    **answers: int | list[int],
) -> RecordingRunner:
    """launchctl on a Mac where the job is not loaded, unless told otherwise.

    `print_gui=0` answers `launchctl print gui/UID/LABEL` with 0 (loaded),
    `bootout_user=[36, 0]` answers two bootouts of user/UID/LABEL; `also`
    answers any other argv.
    """
    script: dict[tuple[str, ...], int | list[int]] = {
        ("launchctl", "print", GUI): 0 if gui_session else NOT_FOUND,
        ("launchctl", "print", f"{GUI}/{LABEL}"): NOT_FOUND,
        ("launchctl", "print", f"{USER}/{LABEL}"): NOT_FOUND,
    }
    for key, code in answers.items():
        verb, domain = key.split("_")
        target = {"gui": GUI, "user": USER}[domain]
        script[("launchctl", verb, f"{target}/{LABEL}")] = code
    return RecordingRunner({**script, **(also or {})}, texts)


def test_plist_has_the_launchd_keys_and_absolute_paths(pensieve_home: Path) -> None:
    desc = describe(Config())
    plist = plistlib.loads(render_plist(desc))
    assert plist["Label"] == LABEL
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] == 30
    # launchd's default soft limit is 256 open files.
    assert plist["SoftResourceLimits"] == {"NumberOfFiles": 10240}
    assert plist["ProgramArguments"][0].endswith("/pensieved")
    for path in (
        *plist["ProgramArguments"][:1],
        plist["StandardOutPath"],
        plist["StandardErrorPath"],
        plist["WorkingDirectory"],
    ):
        assert Path(path).is_absolute()
    assert Path(plist["ProgramArguments"][0]).exists()
    environment = plist["EnvironmentVariables"]
    assert environment["PENSIEVE_HOME"] == str(pensieve_home)
    assert environment["PATH"].startswith(str(Path(plist["ProgramArguments"][0]).parent))
    # sysctl (kernel memory pressure) is /usr/sbin/sysctl.
    assert "/usr/sbin" in environment["PATH"].split(":")
    # How the daemon knows launchd restarts it (exit 0 when it cannot start; one log).
    assert environment["PENSIEVE_SUPERVISOR"] == "launchd"
    assert environment["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert plist["LimitLoadToSessionType"] == "Aqua"
    assert plistlib.loads(render_plist(desc, "Background"))["LimitLoadToSessionType"] == (
        "Background"
    )


def wanted_open_files(hard: int) -> int:
    return OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)


def test_the_open_file_limit_is_raised_to_the_hard_one_and_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = wanted_open_files(hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # as launchd starts an agent
        assert raise_open_files() == (256, wanted)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)
        assert raise_open_files(wanted=100) == (wanted, wanted)  # never lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_a_daemon_started_with_256_open_files_raises_its_limit(
    tiny_config: dict[str, Any], tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited, as from launchd
    try:
        daemon = start_daemon(tmp_path / "home", tiny_config)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{daemon.process.pid}/limits").read_text().splitlines()
        row = next(line for line in limits if line.startswith("Max open files"))
        # Importing Granian raises it too (to the hard limit), later in the start.
        assert int(row.split()[3]) >= wanted_open_files(hard)
        assert f"open-file limit raised from 256 to {wanted_open_files(hard)}" in daemon.log()
    finally:
        daemon.stop()


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
    # Exit 1 (cannot start) is not restarted; crashes are, 5 times in 5 minutes at most.
    assert "\nRestartPreventExitStatus=1\n" in text
    assert "\nStartLimitIntervalSec=300\nStartLimitBurst=5\n" in text
    assert '\nEnvironment="PENSIEVE_SUPERVISOR=systemd"\n' in text
    # The check can fail: a broken unit is refused.
    unit.write_text(text.replace("Type=notify", "Type=sometimes"))
    broken = verify(unit)
    line = text.splitlines().index("Type=notify") + 1
    assert f"{unit}:{line}: Failed to parse service type" in broken.stderr


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


def manager(
    platform: str,
    home: Path,
    runner: RecordingRunner,
    desc: ServiceDescription | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceManager:
    return ServiceManager(
        desc or describe(Config(), environ=os.environ if environ is None else environ),
        platform=platform,
        home=home,
        uid=UID,
        runner=runner,
        sleep=lambda _: None,
    )


def agent(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def test_macos_install_in_a_gui_login_enables_then_bootstraps_into_gui(tmp_path: Path) -> None:
    runner = launchd()
    path = manager("darwin", tmp_path, runner).install()
    assert path == agent(tmp_path)
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == LABEL
    assert plist["LimitLoadToSessionType"] == "Aqua"
    assert runner.calls == [
        ["launchctl", "print", GUI],
        ["launchctl", "print", f"{GUI}/{LABEL}"],
        ["launchctl", "print", f"{USER}/{LABEL}"],
        ["launchctl", "enable", f"{GUI}/{LABEL}"],
        ["launchctl", "bootstrap", GUI, str(path)],
    ]


def test_macos_install_without_a_gui_login_loads_a_background_agent_into_user(
    tmp_path: Path,
) -> None:
    """Over ssh or on a headless Mac: chosen up front, never a gui attempt first."""
    runner = launchd(gui_session=False)
    path = manager("darwin", tmp_path, runner).install()
    assert plistlib.loads(path.read_bytes())["LimitLoadToSessionType"] == "Background"
    assert runner.calls[-2:] == [
        ["launchctl", "enable", f"{USER}/{LABEL}"],
        ["launchctl", "bootstrap", USER, str(path)],
    ]
    assert not any(call[1] == "bootstrap" and call[2] == GUI for call in runner.calls)


def test_macos_bootstrap_failure_reports_launchctls_own_words(tmp_path: Path) -> None:
    plist = str(agent(tmp_path))
    refusal = "Bootstrap failed: 5: Input/output error"
    bootstrap = ("launchctl", "bootstrap", GUI, plist)
    runner = launchd(also={bootstrap: 5}, texts={bootstrap: refusal})
    with pytest.raises(ServiceError) as failure:
        manager("darwin", tmp_path, runner).install()
    assert f"`launchctl bootstrap {GUI} {plist}` failed (5): {refusal}" in str(failure.value)
    # No fallback whose error would replace this one.
    assert runner.calls[-1] == ["launchctl", "bootstrap", GUI, plist]


def test_macos_reinstall_boots_out_waits_and_loads_the_new_plist(tmp_path: Path) -> None:
    """Not `kickstart -k`: that SIGKILLs the daemon and keeps the old definition."""
    sleeps: list[float] = []
    runner = launchd(print_gui=[0, 0, NOT_FOUND], bootout_gui=[36, 0])
    service = ServiceManager(
        describe(Config()),
        platform="darwin",
        home=tmp_path,
        uid=UID,
        runner=runner,
        sleep=sleeps.append,
    )
    path = service.install()
    target = f"{GUI}/{LABEL}"
    assert runner.calls == [
        ["launchctl", "print", GUI],
        ["launchctl", "print", target],  # loaded
        ["launchctl", "bootout", target],  # 36: in progress, asked again
        ["launchctl", "bootout", target],
        ["launchctl", "print", target],  # still winding down
        ["launchctl", "print", target],  # gone
        ["launchctl", "print", f"{USER}/{LABEL}"],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", GUI, str(path)],
    ]
    assert len(sleeps) == 2
    assert not any("kickstart" in call for call in runner.calls)


def test_macos_reinstall_moves_an_agent_loaded_over_ssh_into_the_gui_login(
    tmp_path: Path,
) -> None:
    runner = launchd(print_user=[0, NOT_FOUND])
    manager("darwin", tmp_path, runner).install()
    assert ["launchctl", "bootout", f"{USER}/{LABEL}"] in runner.calls
    assert runner.calls[-1][:3] == ["launchctl", "bootstrap", GUI]


def test_macos_uninstall_retries_while_launchd_is_busy(tmp_path: Path) -> None:
    runner = launchd(print_gui=[0, NOT_FOUND], bootout_gui=[37, 36, 5, 0])
    service = manager("darwin", tmp_path, runner)
    service.service_file.parent.mkdir(parents=True)
    service.service_file.write_bytes(service.render())
    service.uninstall()
    bootouts = [call for call in runner.calls if call[1] == "bootout"]
    assert bootouts == [["launchctl", "bootout", f"{GUI}/{LABEL}"]] * 4
    assert not service.service_file.exists()


def test_macos_a_job_that_will_not_go_is_an_error_not_a_second_copy(tmp_path: Path) -> None:
    bootout = ("launchctl", "bootout", f"{GUI}/{LABEL}")
    runner = launchd(print_gui=0, also={bootout: 1}, texts={bootout: "Boot-out failed: 5"})
    with pytest.raises(
        ServiceError, match=r"still loaded 35 s after .*answered 1: Boot-out failed"
    ):
        manager("darwin", tmp_path, runner).install()
    assert not any(call[1] == "bootstrap" for call in runner.calls)


def program_in(folder: Path) -> ServiceDescription:
    return ServiceDescription(
        label=LABEL,
        program=(str(folder / "pensieve" / ".venv" / "bin" / "pensieved"),),
        environment={},
        log_dir=folder.parent / "logs",
        working_dir=folder.parent / "data",
    )


@pytest.mark.parametrize(
    ("folder", "named"),
    [
        ("Documents", "~/Documents"),
        ("Desktop/code", "~/Desktop"),
        ("Downloads", "~/Downloads"),
        ("documents/code", "~/Documents"),  # APFS compares without case
        ("Library/Mobile Documents/com~apple~CloudDocs", "~/Library/Mobile Documents"),
        ("Library/CloudStorage/Dropbox", "~/Library/CloudStorage"),
    ],
)
def test_macos_install_refuses_a_checkout_tcc_keeps_launchd_out_of(
    tmp_path: Path, folder: str, named: str
) -> None:
    home = tmp_path / "home"
    runner = launchd()
    with pytest.raises(ServiceError) as refusal:
        manager("darwin", home, runner, program_in(home / folder)).install()
    message = str(refusal.value)
    assert f"{named}: {home / folder / 'pensieve'}" in message
    assert "Operation not permitted" in message and "~/src/pensieve" in message
    assert "pip install CHECKOUT" in message
    # Refused before anything was written or loaded.
    assert runner.calls == []
    assert not agent(home).exists()


def test_macos_install_refuses_an_external_volume_and_a_link_into_documents(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with pytest.raises(ServiceError, match=r"/Volumes/T7: /Volumes/T7/pensieve"):
        manager("darwin", home, launchd(), program_in(Path("/Volumes/T7"))).install()
    (home / "Documents" / "code").mkdir(parents=True)
    (home / "src").symlink_to(home / "Documents" / "code")
    with pytest.raises(ServiceError, match=r"~/Documents: .*Documents/code/pensieve"):
        manager("darwin", home, launchd(), program_in(home / "src")).install()


def test_tcc_protected_names_only_the_protected_places(tmp_path: Path) -> None:
    home = Path("/Users/alice")
    assert tcc_protected(home / "Documents" / "x", home) == "~/Documents"
    assert tcc_protected(Path("/Volumes/SSD/models"), home) == "/Volumes/SSD"
    for fine in ("src/pensieve", "DocumentsArchive/x", "Library/Application Support/Pensieve"):
        assert tcc_protected(home / fine, home) is None
    assert tcc_protected(Path("/Volumes"), home) is None
    assert tcc_protected(Path("/Users/bob/Documents/x"), home) is None
    # On Linux the same layout is installed as it is: TCC is macOS's.
    runner = RecordingRunner()
    manager("linux", tmp_path, runner, program_in(tmp_path / "Documents")).install()
    assert runner.calls[0] == ["systemctl", "--user", "daemon-reload"]


def test_huggingface_and_proxy_variables_reach_the_service(tmp_path: Path) -> None:
    environ = {
        "HF_HOME": "/Volumes/T7/hf",
        "HF_HUB_CACHE": "/Volumes/T7/hf/hub",
        "HF_ENDPOINT": "",  # empty: not carried
        "HTTPS_PROXY": "http://proxy.example:3128",
        "NO_PROXY": "localhost",
        "UNRELATED": "x",
    }
    desc = describe(Config(), environ=environ)
    assert {k: v for k, v in desc.environment.items() if k in environ} == {
        "HF_HOME": "/Volumes/T7/hf",
        "HF_HUB_CACHE": "/Volumes/T7/hf/hub",
        "HTTPS_PROXY": "http://proxy.example:3128",
        "NO_PROXY": "localhost",
    }
    service = manager("darwin", tmp_path, launchd(), desc)
    path = service.install()
    assert plistlib.loads(path.read_bytes())["EnvironmentVariables"]["HF_HOME"] == "/Volumes/T7/hf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # A cache on an external volume is installed, with a word about TCC.
    notes = service.notes()
    assert len(notes) == 2 and notes[0].startswith("HF_HOME is in /Volumes/T7")


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_a_token_in_the_service_file_makes_it_owner_only(tmp_path: Path, platform: str) -> None:
    desc = describe(Config(), environ={"HF_TOKEN": "hf_sekrit", "HTTP_PROXY": "http://p%40x"})
    service = manager(
        platform, tmp_path, launchd() if platform == "darwin" else RecordingRunner(), desc
    )
    path = service.install()
    assert "hf_sekrit" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert service.notes() == [f"HF_TOKEN is copied into {path}, which is written 0600"]
    if platform == "linux":
        # `%` starts a systemd specifier.
        assert '\nEnvironment="HTTP_PROXY=http://p%%40x"\n' in path.read_text()


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_the_service_file_mode_does_not_follow_the_umask(tmp_path: Path, platform: str) -> None:
    """launchd refuses a group-writable plist, which umask 002 would give."""
    service = manager(platform, tmp_path, launchd() if platform == "darwin" else RecordingRunner())
    service.service_file.parent.mkdir(parents=True)
    service.service_file.write_text("old")
    service.service_file.chmod(0o666)
    old_umask = os.umask(0o002)
    try:
        path = service.install()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == service.render()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left


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


def test_without_a_user_systemd_install_leaves_nothing_and_uninstall_is_a_no_op(
    tmp_path: Path,
) -> None:
    """Containers, WSL, ssh without lingering: no user bus to talk to."""
    bus = "Failed to connect to bus: No medium found"
    reload = ("systemctl", "--user", "daemon-reload")
    runner = RecordingRunner({reload: 1}, {reload: bus})
    service = manager("linux", tmp_path, runner)
    with pytest.raises(ServiceError, match=r"No medium found.*loginctl enable-linger"):
        service.install()
    assert not service.service_file.exists()
    runner.calls.clear()
    service.uninstall()  # nothing installed is fine, bus or not
    assert runner.calls == []


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


FAKE_LAUNCHCTL = """#!/bin/sh
echo "$*" >> {record}
case "$1 $2" in
    "print gui/"*/*|"print user/"*) exit 113 ;;  # the job is not loaded
esac
"""


def test_pensievectl_service_install_and_uninstall_end_to_end(tmp_path: Path) -> None:
    """The CLI through the real subprocess runner, on any OS, with recorders for
    `launchctl` and `systemctl` and nothing else on PATH: the real service
    manager cannot be reached (on a Mac it would load a live agent)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    records = {name: tmp_path / f"{name}.calls" for name in ("launchctl", "systemctl")}
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {records["systemctl"]}\n')
    (bin_dir / "launchctl").write_text(FAKE_LAUNCHCTL.format(record=records["launchctl"]))
    for fake in bin_dir.iterdir():
        fake.chmod(0o755)
    env = {
        **daemon_env(tmp_path / "pensieve-home"),
        "HOME": str(tmp_path / "user"),
        "PATH": str(bin_dir),
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
    if sys.platform == "darwin":
        service_file = tmp_path / "user" / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        program = plistlib.loads(service_file.read_bytes())["ProgramArguments"][0]
        assert program == str(Path(sys.executable).with_name("pensieved"))
    else:
        service_file = tmp_path / "user" / ".config" / "systemd" / "user" / SYSTEMD_UNIT
        assert (
            f"ExecStart={Path(sys.executable).with_name('pensieved')}" in service_file.read_text()
        )
    assert installed.stdout.strip() == f"installed {service_file}"
    removed = pensievectl("service", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not service_file.exists()
    uid = os.getuid()
    expected = {
        "darwin": (
            "launchctl",
            [
                f"print gui/{uid}",
                f"print gui/{uid}/{LABEL}",
                f"print user/{uid}/{LABEL}",
                f"enable gui/{uid}/{LABEL}",
                f"bootstrap gui/{uid} {service_file}",
                f"print gui/{uid}/{LABEL}",
                f"print user/{uid}/{LABEL}",
            ],
        ),
        "linux": (
            "systemctl",
            [
                "--user daemon-reload",
                f"--user enable --now {SYSTEMD_UNIT}",
                f"--user restart {SYSTEMD_UNIT}",
                f"--user disable --now {SYSTEMD_UNIT}",
                "--user daemon-reload",
            ],
        ),
    }
    manager_name, calls = expected["darwin" if sys.platform == "darwin" else "linux"]
    assert records[manager_name].read_text().splitlines() == calls
    other = "systemctl" if manager_name == "launchctl" else "launchctl"
    assert not records[other].exists()


def show_env(tmp_path: Path) -> dict[str, str]:
    """`service show`'s environment: PENSIEVE_HOME the test's, HOME a fresh one."""
    return {**daemon_env(tmp_path / "pensieve-home"), "HOME": str(tmp_path / "user")}


def run_show(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pensievectl service show ARGS` in `show_env`."""
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", "service", "show", *args],
        env=show_env(tmp_path),
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
    env = show_env(tmp_path)
    installed = manager("linux", tmp_path / "installed", RecordingRunner(), environ=env).install()
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
    env = show_env(tmp_path)
    installed = manager("darwin", tmp_path / "installed", launchd(), environ=env).install()
    assert installed.read_bytes() == shown.stdout.encode()


def test_service_show_defaults_to_this_platform(tmp_path: Path) -> None:
    shown = run_show(tmp_path)
    assert shown.returncode == 0, shown.stderr
    this = run_show(tmp_path, "--platform", "macos" if sys.platform == "darwin" else "linux")
    assert shown.stdout == this.stdout and shown.stderr == this.stderr
