"""The memory guard on real readings: probe, levels, hysteresis, and what each level does.

Thresholds are set relative to the memory available right now, so every level
is really reached by a real `psutil` reading. Scripted readings (the probe
seam) are used only for kernel pressure and hysteresis, which cannot be
produced on demand.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import falcon.testing
import mlx.core as mx
import msgspec
import psutil
import pytest

from pensieved.config import Config, ConfigError, MemoryConfig, load_config
from pensieved.engine.commands import MemoryHooks
from pensieved.engine.core import Engine
from pensieved.http.app import create_app
from pensieved.memory import darwin
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import Level, classify
from pensieved.memory.probe import MemoryProbe, MemoryReading, parse_psi
from pensieved.models.registry import ModelRegistry
from pensieved.paths import GB

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
        self.resident = 100 * 1024**2
        self.gpu_working_set = 0

    def read(self) -> MemoryReading:
        return MemoryReading(
            available=int(self.available_gb * GB),
            total=32 * GB,
            pressure=self.pressure,
            resident=self.resident,
            mlx_active=0,
            mlx_cache=0,
            mlx_peak=0,
            gpu_working_set=self.gpu_working_set,
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


class FakeDarwinKernel:
    """macOS's memory entry points as C-callables with their real prototypes (darwin.py).

    The daemon's ctypes code calls them exactly as it calls libSystem on a
    Mac: pointers, sizes and structs are really marshalled. The figures are
    a script (vm_stat-like page counts, a pressure level).
    """

    def __init__(self) -> None:
        self.pressure = 1
        self.pages = {
            "free_count": 40_000,  # includes the speculative ones, as xnu counts
            "speculative_count": 10_000,
            "active_count": 300_000,
            "inactive_count": 280_000,
            "wire_count": 150_000,
            "purgeable_count": 5_000,
            "external_page_count": 200_000,
            "internal_page_count": 420_000,
            "compressor_page_count": 60_000,
        }
        self.kern_return = 0
        self.revision_fields = darwin.HOST_VM_INFO64_REV1_COUNT
        self.fail_sysctl = False
        self.sysctl_names: list[bytes] = []
        self.hosts: list[int] = []
        self.sysctlbyname = darwin.SYSCTLBYNAME(self._sysctlbyname)
        self.mach_host_self = darwin.MACH_HOST_SELF(lambda: 0x1503)
        self.host_statistics64 = darwin.HOST_STATISTICS64(self._host_statistics64)

    def _sysctlbyname(self, name: bytes, old: int, size: Any, new: int, new_size: int) -> int:
        self.sysctl_names.append(name)
        if self.fail_sysctl or size[0] != 4:
            return -1
        ctypes.c_int.from_address(old).value = self.pressure
        return 0

    def _host_statistics64(self, host: int, flavor: int, info: int, count: Any) -> int:
        self.hosts.append(host)
        assert flavor == darwin.HOST_VM_INFO64
        assert count[0] == darwin.HOST_VM_INFO64_REV1_COUNT
        stats = darwin.VmStatistics64.from_address(info)
        for name, value in self.pages.items():
            setattr(stats, name, value)
        count[0] = self.revision_fields
        return self.kern_return

    def memory(self) -> darwin.DarwinMemory:
        return darwin.DarwinMemory(
            self.sysctlbyname, self.mach_host_self, self.host_statistics64, page_size=16384
        )


def test_the_vm_statistics64_struct_matches_xnu() -> None:
    # <mach/vm_statistics.h>: 152 bytes to revision 1; the fields the
    # available figure needs at their offsets.
    assert ctypes.sizeof(darwin.VmStatistics64) == 152
    assert darwin.HOST_VM_INFO64_REV1_COUNT == 38
    assert darwin.VmStatistics64.purgeable_count.offset == 88
    assert darwin.VmStatistics64.speculative_count.offset == 92
    assert darwin.VmStatistics64.external_page_count.offset == 136


def test_macos_pressure_is_one_sysctlbyname_call(caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeDarwinKernel()
    probe = MemoryProbe(platform="darwin", darwin=kernel.memory())
    verdicts = {}
    for level in (1, 2, 4):
        kernel.pressure = level
        verdicts[level] = probe.pressure()
    assert verdicts == {1: "normal", 2: "warn", 4: "critical"}
    assert kernel.sysctl_names == [b"kern.memorystatus_vm_pressure_level"] * 3
    kernel.fail_sysctl = True
    with caplog.at_level(logging.WARNING, "pensieved.memory.probe"):
        assert probe.pressure() is None
        assert probe.pressure() is None
    assert caplog.text.count("cannot read the kernel's memory pressure") == 1
    assert "kern.memorystatus_vm_pressure_level" in caplog.text


def test_macos_available_memory_is_counted_as_macos_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kernel = FakeDarwinKernel()
    probe = MemoryProbe(platform="darwin", darwin=kernel.memory())
    reading = probe.read()
    pages = kernel.pages
    # Free (less the speculative pages xnu folds into it) + file-backed + purgeable.
    expected = (
        pages["free_count"]
        - pages["speculative_count"]
        + pages["external_page_count"]
        + pages["purgeable_count"]
    ) * 16384
    assert reading.available == expected
    # Not psutil's free + inactive: dirty anonymous inactive pages are not free.
    assert reading.available != (pages["free_count"] + pages["inactive_count"]) * 16384
    assert reading.kernel_first and reading.pressure == "normal"
    assert kernel.hosts == [0x1503]  # the host port taken once, at start
    # A kernel that answers less than revision 1 (or fails): psutil's figure, logged once.
    kernel.revision_fields = 24
    with caplog.at_level(logging.WARNING, "pensieved.memory.probe"):
        fallback = probe.read()
        probe.read()
    assert fallback.available == pytest.approx(psutil.virtual_memory().available, abs=GB)
    assert caplog.text.count("cannot read the kernel's page counts") == 1
    kernel.revision_fields = darwin.HOST_VM_INFO64_REV1_COUNT
    kernel.kern_return = 5  # KERN_FAILURE
    with pytest.raises(OSError, match="kern_return_t 5"):
        kernel.memory().page_counts()


def test_linux_available_memory_is_psutils() -> None:
    reading = MemoryProbe(platform="linux").read()
    assert abs(reading.available - psutil.virtual_memory().available) < GB
    assert not reading.kernel_first and reading.gpu_working_set == 0  # no Metal here


def darwin_reading(available_gb: float, pressure: str | None) -> MemoryReading:
    return MemoryReading(
        available=int(available_gb * GB),
        total=16 * GB,
        pressure=pressure,
        resident=GB,
        mlx_active=0,
        mlx_cache=0,
        mlx_peak=0,
        kernel_first=True,
    )


@pytest.mark.parametrize(
    ("pressure", "expected"),
    [
        ("normal", Level.REJECT),  # an estimate below the line: no new work, no exit
        ("warn", Level.REJECT),
        ("critical", Level.SHUTDOWN),  # the kernel agrees
        (None, Level.SHUTDOWN),  # no verdict to wait for: the line decides
    ],
)
def test_on_macos_shutdown_takes_the_kernels_critical(
    pressure: str | None, expected: Level
) -> None:
    settings = MemoryConfig()  # shutdown below 0.5 GB
    assert classify(darwin_reading(0.3, pressure), Level.NORMAL, settings) is expected
    linux = dataclasses.replace(darwin_reading(0.3, pressure), kernel_first=False)
    assert classify(linux, Level.NORMAL, settings) is Level.SHUTDOWN


def test_past_its_budget_the_daemon_gives_caches_back() -> None:
    probe = ScriptedProbe()
    released: list[Level] = []
    guard = MemoryGuard(
        MemoryConfig(budget_gb=0.2, hysteresis_gb=0.05),
        probe,
        shrink=[lambda: released.append(guard.level)],
    )
    assert guard.sample() is Level.NORMAL  # 100 MB resident
    probe.resident = int(0.25 * GB)  # a reply grew past its estimate
    assert guard.sample() is Level.WARN
    assert released == [Level.WARN] and guard.accepting
    probe.resident = int(0.17 * GB)  # below the budget, not by the margin
    assert guard.sample() is Level.WARN
    probe.resident = int(0.1 * GB)
    assert guard.sample() is Level.NORMAL


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
    [(1, Level.NORMAL), (2, Level.WARN), (4, Level.REJECT)],
)
def test_kernel_pressure_raises_the_level(pressure: int, expected: Level) -> None:
    # Plenty of memory by the page counts; the kernel's verdict scripted.
    kernel = FakeDarwinKernel()
    kernel.pressure = pressure
    kernel.pages["free_count"] = 2_000_000
    probe = MemoryProbe(platform="darwin", darwin=kernel.memory())
    guard = MemoryGuard(MemoryConfig(), probe)
    assert guard.sample() is expected
    if expected is Level.REJECT:
        refusal = guard.refusal()
        assert refusal is not None and "critical memory pressure" in refusal.message
    ignored = MemoryGuard(MemoryConfig(kernel_pressure=False), probe)
    assert ignored.sample() is Level.NORMAL


def test_a_worse_level_shrinks_caches_and_clears_mlx_buffers() -> None:
    probe = ScriptedProbe()
    shrunk: list[Level] = []
    guard = MemoryGuard(MemoryConfig(), probe, shrink=[lambda: shrunk.append(guard.level)])
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
    # Invalid on purpose: refused with 529 before it is read, or else a 400.
    response = client.simulate_post(
        "/v1/messages", json={"model": "x"}, host="127.0.0.1", port=7777
    )
    if level >= Level.REJECT:
        assert response.status_code == 529
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
    assert config.memory == msgspec.structs.replace(
        MemoryConfig(), warn_below_gb=4.0, reject_below_gb=2.5, budget_gb=12.0
    )
    assert config.server.drain_seconds == 3.0


FREE_AND_MEASURE = """
import sys, mlx.core as mx, psutil
from pensieved.memory.heap import hand_back_freed_buffers
if sys.argv[1] == "set":
    assert hand_back_freed_buffers()
mx.set_cache_limit(0)  # freed buffers go straight to malloc
process = psutil.Process()
before = process.memory_info().rss
for megabytes in (16, 12, 8):  # each freed before the next: a KV cache growing, say
    buffer = mx.ones((megabytes * 1024 * 1024 // 4,))
    mx.eval(buffer)
    del buffer
print((process.memory_info().rss - before) / 2**20)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_buffers_leave_the_daemons_resident_size() -> None:
    def retained_mb(mode: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", FREE_AND_MEASURE, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return float(result.stdout)

    # glibc keeps freed mid-sized buffers once its mmap threshold has risen:
    # the resident size that `budget_gb` reads would count them.
    kept = retained_mb("default")
    assert kept > 8
    # With the threshold fixed, at most the last buffer's worth of pages and
    # the interpreter's own noise stay (about 1 MB idle, up to 5 under load).
    assert retained_mb("set") < kept / 2


def metal_as_on_a_mac(monkeypatch: pytest.MonkeyPatch, working_set: int) -> list[int]:
    """MLX as it behaves on Metal: a recommended working set and a wired limit that sticks.

    The CPU backend has neither (its `set_wired_limit` does nothing), so the
    register MLX keeps is kept here; mlx-lm's own code reads and sets it.
    """
    history = [0]

    def set_wired_limit(limit: int) -> int:
        history.append(limit)
        return history[-2]

    info = {**mx.device_info(), "max_recommended_working_set_size": working_set}
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "device_info", lambda: info)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    return history


def test_the_configured_wired_limit_outlives_mlx_lms_generator(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from pensieved.config import EngineConfig, ModelConfig
    from pensieved.engine.loading import load_weights, new_generator

    settings = EngineConfig(dequantize="never")
    loaded = load_weights(ModelConfig("tiny", str(tiny_dir)), tiny_dir, settings)
    history = metal_as_on_a_mac(monkeypatch, working_set=12 * GB)
    guard = MemoryGuard(MemoryConfig(wired_limit_percent=50), ScriptedProbe())
    guard.apply_mlx_limits()
    assert history[-1] == 6 * GB
    generator = new_generator(loaded, settings)
    # mlx-lm wired the whole working set; the configured half is back.
    assert history[-2:] == [12 * GB, 6 * GB]
    generator.close()
    del generator
    gc.collect()
    assert history[-1] == 6 * GB  # closing it does not swing the limit back
    guard.configure(MemoryConfig(wired_limit_percent=25))
    replacement = new_generator(loaded, settings)  # a reload's, or after a failed step
    assert history[-1] == 3 * GB
    del replacement
    gc.collect()
    assert history[-1] == 3 * GB


def test_a_model_load_judges_free_memory_by_the_guards_reading(tiny_dir: Path) -> None:
    """The room check before a load reads what the guard reads (macOS's own count there)."""
    import asyncio

    from pensieved.config import EngineConfig, ModelConfig
    from pensieved.wire.errors import Overloaded

    probe = ScriptedProbe()
    guard = MemoryGuard(lines(Level.NORMAL), probe)
    hooks = MemoryHooks(floor_bytes=lambda: 2 * GB, available=guard.available_memory)
    engine = Engine(tiny_dir.parent, EngineConfig(dequantize="never"), hooks)
    engine.start()

    async def load() -> None:
        await engine.load(ModelConfig("tiny", str(tiny_dir)))

    try:
        probe.available_gb = 2.001  # the tiny weights would take it below the floor
        with pytest.raises(Overloaded):
            asyncio.run(load())
        probe.available_gb = 16.0
        asyncio.run(load())
        assert [m.name for m in engine.loaded()] == ["tiny"]
    finally:
        engine.stop()
