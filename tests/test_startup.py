"""Starting `pensieved`: the platform check, the exit codes a service manager
acts on, one log under launchd, and the port probe."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pensieved.service.listen import StartupError, check_port_free, something_answers
from pensieved.service.logfile import LOG_BYTES
from pensieved.service.preflight import Host, unsupported
from tests.daemon import daemon_env, free_port

ROOT = Path(__file__).resolve().parent.parent
PREFLIGHT = ROOT / "daemon/pensieved/service/preflight.py"


@pytest.mark.parametrize(
    ("platform", "machine", "wanted"),
    [
        ("darwin", "arm64", {"mlx"}),
        ("darwin", "x86_64", set()),  # no wheel: the preflight's sentence, not pip's error
        ("linux", "x86_64", {"mlx[cpu]"}),
        ("linux", "aarch64", {"mlx[cpu]"}),
    ],
)
def test_mlx_is_asked_for_only_where_it_has_wheels(
    platform: str, machine: str, wanted: set[str]
) -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    environment = {"sys_platform": platform, "platform_machine": machine}
    asked = set()
    for line in dependencies:
        requirement = Requirement(line)
        if requirement.name == "mlx" and (
            requirement.marker is None or requirement.marker.evaluate(environment)
        ):
            asked.add("mlx" + "".join(f"[{extra}]" for extra in sorted(requirement.extras)))
    assert asked == wanted


@pytest.mark.parametrize(
    ("host", "says"),
    [
        (Host("darwin", "x86_64", "14.5", translated=True), "x86_64 build running under Rosetta"),
        (Host("darwin", "x86_64", "13.6"), "Intel Mac (x86_64)"),
        (Host("darwin", "arm64", "13.6.1"), "runs macOS 13.6.1"),
    ],
)
def test_a_mac_mlx_cannot_run_on_is_named_in_one_sentence(host: Host, says: str) -> None:
    problem = unsupported(host)
    assert problem is not None
    assert problem.startswith(
        "Pensieve needs a Mac with Apple silicon, a native arm64 Python and macOS 14 or later: "
    )
    assert says in problem
    assert problem.endswith(".") and "\n" not in problem


@pytest.mark.parametrize(
    "host",
    [
        Host("darwin", "arm64", "14.0"),
        Host("darwin", "arm64", "15.4"),
        Host("darwin", "arm64", "26.0"),
        Host("darwin", "arm64", ""),  # unknown: not a reason to refuse
        Host("linux", "x86_64"),
        Host("linux", "aarch64"),
    ],
)
def test_supported_hosts_pass(host: Host) -> None:
    assert unsupported(host) is None


def test_the_check_runs_as_a_script_on_the_standard_library_alone() -> None:
    """As tools/venv.sh runs it: isolated (-I), before anything is installed."""
    result = subprocess.run(
        [sys.executable, "-I", str(PREFLIGHT)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def pensieved(
    home: Path, *args: str, supervisor: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = daemon_env(home)
    env.pop("PENSIEVE_SUPERVISOR", None)
    if supervisor:
        env["PENSIEVE_SUPERVISOR"] = supervisor
    return subprocess.run(
        [sys.executable, "-m", "pensieved", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cannot_start_is_exit_1_by_hand_and_0_under_launchd(tmp_path: Path) -> None:
    """launchd restarts every non-zero exit, every 10 s, and has no setting against it."""
    refused = ("--host", "0.0.0.0", "--port", "1")
    by_hand = pensieved(tmp_path / "a", *refused)
    assert by_hand.returncode == 1
    assert "server.allow_remote" in by_hand.stderr and "Traceback" not in by_hand.stderr

    home = tmp_path / "b"
    under_launchd = pensieved(home, *refused, supervisor="launchd")
    assert under_launchd.returncode == 0
    # Said once, in the log `pensievectl logs` shows; not again on stderr (the err log).
    log = (home / "logs" / "pensieved.log").read_text()
    assert log.count("server.allow_remote") == 1
    assert "not starting: " in log and "launchd will not restart it" in log
    assert "allow_remote" not in under_launchd.stderr


def test_a_bad_config_under_launchd_is_said_on_stderr_and_not_restarted(tmp_path: Path) -> None:
    """Before the log file is open, stderr (launchd's err log) is the only place."""
    config = tmp_path / "config.toml"
    config.write_text('[models.a]\nsource = "/a"\ncontext_length = -1\n')
    result = pensieved(tmp_path / "home", "--config", str(config), supervisor="launchd")
    assert result.returncode == 0
    assert "not starting: " in result.stderr and "models.a.context_length" in result.stderr


@pytest.mark.parametrize("supervisor", [None, "launchd", "systemd"])
def test_a_crash_is_exit_70_which_both_managers_restart(
    tmp_path: Path, supervisor: str | None
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "logs").write_text("a file where the log directory goes")
    result = pensieved(home, "--port", str(free_port()), supervisor=supervisor)
    assert result.returncode == 70
    assert "pensieved crashed" in result.stderr and "Traceback" in result.stderr


def test_under_launchd_the_log_is_written_once_and_the_err_log_kept_short(
    tiny_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    logs = home / "logs"
    logs.mkdir(parents=True)
    err_log = logs / "pensieved.err.log"
    with open(err_log, "wb") as grown:
        grown.truncate(LOG_BYTES + 1)  # launchd appended to it for a long time
    env = {**daemon_env(home), "PENSIEVE_SUPERVISOR": "launchd"}
    # As launchd starts it: stderr appended to the err log.
    with open(err_log, "ab") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pensieved",
                "--model",
                str(tiny_dir),
                "--port",
                str(free_port()),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        log = logs / "pensieved.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "pensieve listening on" in log.read_text()):
            assert process.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        process.kill()
    # The grown err log was moved aside at start; this run wrote on there, and
    # none of its log lines.
    moved = logs / "pensieved.err.log.1"
    assert moved.stat().st_size >= LOG_BYTES + 1
    with open(moved, "rb") as tail:
        tail.seek(LOG_BYTES + 1)
        assert b"listening" not in tail.read()
    assert not err_log.exists()
    assert log.read_text().count("pensieve listening on") == 1


def test_a_port_served_on_every_address_is_reported_busy_for_loopback() -> None:
    """The BSD case: there a SO_REUSEADDR bind to 127.0.0.1 succeeds beside a
    listener on *:PORT, so the probe also connects (Linux refuses the bind too)."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert something_answers("127.0.0.1", port)
        assert something_answers("0.0.0.0", port)
        with pytest.raises(StartupError, match=rf"127.0.0.1:{port} is already in use"):
            check_port_free("127.0.0.1", port)
    assert not something_answers("127.0.0.1", port)
    check_port_free("127.0.0.1", port)


def test_a_previous_runs_closed_connections_do_not_make_the_port_busy() -> None:
    """Why the bind probe keeps SO_REUSEADDR: TIME_WAIT after a restart."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its side waits in TIME_WAIT
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # without SO_REUSEADDR: "in use"
    check_port_free("127.0.0.1", port)
