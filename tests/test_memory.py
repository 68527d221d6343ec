"""The memory guard on real readings: probe, levels, hysteresis, and what each level does.

Thresholds are set relative to the memory available right now, so every level
is really reached by a real `psutil` reading. Scripted readings (the probe
seam) are used only for kernel pressure and hysteresis, which cannot be
produced on demand.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import falcon.testing
import mlx.core as mx
import psutil
import pytest

from pensieved.config import Config, ConfigError, MemoryConfig, load_config
from pensieved.engine.core import Engine
from pensieved.http.app import create_app
from pensieved.memory.guard import (
    GB,
    Level,
    MemoryGuard,
    MemoryProbe,
    MemoryReading,
    parse_psi,
)
from pensieved.models.registry import ModelRegistry

HEADROOM_GB = 8.0  # far more than other processes move available memory during a test


def available_gb() -> float:
    return float(psutil.virtual_memory().available / GB)


def lines(level: Level) -> MemoryConfig:
    """Lines that put the machine, as it is now, at `level`."""
    above = available_gb() + HEADROOM_GB  # a line above what is available: crossed
    below = available_gb() / 4  # a line well below it: not crossed
    warn, reject, shutdown = {
        Level.NORMAL: (below, below / 2, below / 4),
        Level.WARN: (above, below / 2, below / 4),
        Level.REJECT: (above, above, below / 4),
        Level.SHUTDOWN: (above, above, above),
    }[level]
    return MemoryConfig(
        warn_below_gb=warn, reject_below_gb=reject, shutdown_below_gb=shutdown, sample_interval=0.05
    )


class ScriptedProbe:
    """Readings from a script: available GB and kernel pressure, one per `read`."""

    def __init__(self) -> None:
        self.available_gb = 16.0
        self.pressure: str | None = "normal"

    def read(self) -> MemoryReading:
        return MemoryReading(
            available=int(self.available_gb * GB),
            total=32 * GB,
            pressure=self.pressure,
            resident=100 * 1024**2,
            mlx_active=0,
            mlx_cache=0,
            mlx_peak=0,
        )


def test_probe_reads_real_memory() -> None:
    reading = MemoryProbe().read()
    vm = psutil.virtual_memory()
    assert 0 < reading.available <= reading.total == vm.total
    assert abs(reading.available - vm.available) < 1 * GB
    assert reading.resident == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert reading.mlx_active >= 0 and reading.mlx_cache >= 0 and reading.mlx_peak >= 0
    if Path("/proc/pressure/memory").exists():
        assert reading.pressure in {"normal", "warn", "critical"}


def test_psi_is_read_where_present(tmp_path: Path) -> None:
    psi = tmp_path / "memory"
    psi.write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    probe = MemoryProbe(platform="linux", psi_path=psi)
    assert probe.pressure() == "normal"
    psi.write_text(
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
        "full avg10=2.00 avg60=0.50 avg300=0.10 total=45\n"
    )
    assert probe.pressure() == "warn"
    psi.write_text(
        "some avg10=60.00 avg60=40.00 avg300=9.00 total=999\n"
        "full avg10=35.00 avg60=20.00 avg300=5.00 total=500\n"
    )
    assert probe.pressure() == "critical"
    assert MemoryProbe(platform="linux", psi_path=tmp_path / "absent").pressure() is None
    assert parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n") == "normal"


def test_macos_pressure_comes_from_sysctl(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[str]] = []
    answer = {"value": "1\n"}

    def sysctl(argv: Sequence[str]) -> str:
        calls.append(list(argv))
        if answer["value"] == "fail":
            raise subprocess.CalledProcessError(1, list(argv))
        return answer["value"]

    probe = MemoryProbe(platform="darwin", runner=sysctl)
    verdicts = {}
    for value in ("1\n", "2\n", "4\n"):
        answer["value"] = value
        verdicts[value.strip()] = probe.pressure()
    assert verdicts == {"1": "normal", "2": "warn", "4": "critical"}
    assert calls[0] == ["sysctl", "-n", "kern.memorystatus_vm_pressure_level"]
    answer["value"] = "fail"
    with caplog.at_level(logging.WARNING, "pensieved.memory.guard"):
        assert probe.pressure() is None
        assert probe.pressure() is None
    assert caplog.text.count("cannot read the kernel's memory pressure") == 1


@pytest.mark.parametrize("level", list(Level))
def test_each_level_is_reached_on_real_readings(level: Level) -> None:
    shutdowns: list[str] = []
    guard = MemoryGuard(lines(level), on_shutdown=shutdowns.append)
    assert guard.sample() is level
    assert guard.accepting is (level < Level.REJECT)
    assert (guard.refusal() is None) is (level < Level.REJECT)
    assert len(shutdowns) == (level is Level.SHUTDOWN)
    if shutdowns:
        assert "memory is critically low" in shutdowns[0]


def test_hysteresis_keeps_levels_from_flapping(caplog: pytest.LogCaptureFixture) -> None:
    probe = ScriptedProbe()
    settings = MemoryConfig(hysteresis_gb=0.25)  # lines at 2.0, 1.0 and 0.5 GB
    shutdowns: list[str] = []
    guard = MemoryGuard(settings, probe, on_shutdown=shutdowns.append)
    script = [
        (3.0, Level.NORMAL),
        (1.9, Level.WARN),  # below 2.0: warn at once
        (2.1, Level.WARN),  # back above the line, but not by the margin
        (1.95, Level.WARN),
        (2.2, Level.WARN),
        (2.3, Level.NORMAL),  # 2.0 + 0.25 cleared
        (0.9, Level.REJECT),  # straight past warn
        (1.1, Level.REJECT),
        (1.2, Level.REJECT),
        (1.3, Level.WARN),  # reject left (1.25); still inside warn's margin
        (2.26, Level.NORMAL),
        (0.45, Level.SHUTDOWN),
        (16.0, Level.SHUTDOWN),  # one way: the daemon is on its way out
    ]
    with caplog.at_level(logging.INFO, "pensieved.memory.guard"):
        for available, expected in script:
            probe.available_gb = available
            assert guard.sample() is expected, available
    changes = [r.getMessage().split(":")[0] for r in caplog.records]
    assert changes == [
        "memory level normal → warn",
        "memory level warn → normal",
        "memory level normal → reject",
        "memory level reject → warn",
        "memory level warn → normal",
        "memory level normal → shutdown",
    ]
    assert "GB available" in caplog.records[0].getMessage()  # logged with the figures
    assert len(shutdowns) == 1


@pytest.mark.parametrize(
    ("pressure", "expected"),
    [("1", Level.NORMAL), ("2", Level.WARN), ("4", Level.REJECT)],
)
def test_kernel_pressure_raises_the_level(pressure: str, expected: Level) -> None:
    # Real memory figures (far above every line), the kernel's verdict scripted.
    probe = MemoryProbe(platform="darwin", runner=lambda argv: pressure)
    guard = MemoryGuard(MemoryConfig(), probe)
    assert guard.sample() is expected
    if expected is Level.REJECT:
        refusal = guard.refusal()
        assert refusal is not None and "critical memory pressure" in refusal.message
    ignored = MemoryGuard(MemoryConfig(kernel_pressure=False), probe)
    assert ignored.sample() is Level.NORMAL


def test_a_worse_level_shrinks_caches_and_clears_mlx_buffers() -> None:
    probe = ScriptedProbe()
    guard = MemoryGuard(MemoryConfig(), probe)
    shrunk: list[Level] = []
    guard.shrink_callbacks.append(lambda: shrunk.append(guard.level))
    mx.eval(mx.ones((1024, 1024)) * 2)  # leaves freed buffers in MLX's cache
    assert mx.get_cache_memory() > 0
    probe.available_gb = 1.5
    guard.sample()
    assert shrunk == [Level.WARN]
    assert mx.get_cache_memory() == 0
    for available in (1.6, 1.7, 2.1):  # the same episode: nothing more to do
        probe.available_gb = available
        guard.sample()
    probe.available_gb = 0.8
    guard.sample()
    assert shrunk == [Level.WARN, Level.REJECT]


def test_new_lines_apply_at_once() -> None:
    guard = MemoryGuard(lines(Level.NORMAL))
    assert guard.sample() is Level.NORMAL
    guard.configure(lines(Level.REJECT))
    assert guard.level is Level.REJECT
    guard.configure(lines(Level.NORMAL))
    assert guard.level is Level.NORMAL


def asgi_client(guard: MemoryGuard, tmp_path: Path) -> falcon.testing.TestClient:
    app = create_app(ModelRegistry(Config()), Engine(tmp_path), "token", guard=guard)
    return falcon.testing.TestClient(app, headers={"x-api-key": "token"})


@pytest.mark.parametrize("level", list(Level))
def test_health_reports_each_level_and_new_work_is_refused(level: Level, tmp_path: Path) -> None:
    guard = MemoryGuard(lines(level), on_shutdown=lambda reason: None)
    guard.sample()
    client = asgi_client(guard, tmp_path)
    health = client.simulate_get("/health", host="127.0.0.1", port=7777).json
    memory: dict[str, Any] = health["memory"]
    assert memory["level"] == level.label
    assert memory["accepting_requests"] is (level < Level.REJECT)
    assert health["status"] == {Level.REJECT: "overloaded", Level.SHUTDOWN: "stopping"}.get(
        level, "ok"
    )
    assert memory["available_gb"] == pytest.approx(available_gb(), abs=1.0)
    for key in ("pressure", "model_gb", "kv_cache_gb", "rss_gb", "mlx_active_gb"):
        assert key in memory
    # Invalid on purpose: refused with 503 before it is read, or else a 400.
    response = client.simulate_post(
        "/v1/messages", json={"model": "x"}, host="127.0.0.1", port=7777
    )
    if level >= Level.REJECT:
        assert response.status_code == 503
        error = response.json
        assert error["type"] == "error"
        assert error["error"]["type"] == "overloaded_error"
        assert error["request_id"] == response.headers["request-id"]
        assert int(response.headers["retry-after"]) > 0
        expected = "low on memory" if level is Level.REJECT else "shutting down"
        assert expected in error["error"]["message"]
    else:
        assert response.status_code == 400


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"warn_below_gb": 1.0, "reject_below_gb": 2.0}, "memory"),
        ({"shutdown_below_gb": -1}, "memory.shutdown_below_gb"),
        ({"sample_interval": 0}, "memory.sample_interval"),
        ({"wired_limit_percent": 150}, "memory.wired_limit_percent"),
        ({"kernel_pressure": "yes"}, "memory.kernel_pressure"),
        ({"budget_gb": "8G"}, "memory.budget_gb"),
    ],
)
def test_bad_memory_config_names_the_key(
    pensieve_home: Path, table: dict[str, Any], key: str
) -> None:
    import tomli_w

    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text(tomli_w.dumps({"memory": table}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config()


def test_memory_config_round_trips(pensieve_home: Path) -> None:
    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text(
        "[memory]\nwarn_below_gb = 4\nreject_below_gb = 2.5\nbudget_gb = 12\n"
        "[server]\ndrain_seconds = 3\n"
    )
    config = load_config()
    assert config.memory == dataclasses.replace(
        MemoryConfig(), warn_below_gb=4.0, reject_below_gb=2.5, budget_gb=12.0
    )
    assert config.server.drain_seconds == 3.0
