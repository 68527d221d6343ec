"""Memory readings and where they come from: `MemoryProbe`, `MemoryReading`, the kernel's verdict.

A reading is the system's available and total memory, the kernel's own
pressure verdict (macOS `kern.memorystatus_vm_pressure_level` through
darwin.py, Linux PSI through `parse_psi`), the daemon's resident size and
MLX's allocator counters. `Probe` is the seam tests script readings through;
guard.py turns readings into levels.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from pensieved.memory.darwin import DarwinMemory, PageCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReading:
    available: int  # bytes the system can still hand out without swapping
    total: int
    pressure: str | None  # the kernel's verdict: normal | warn | critical; None: no signal
    resident: int  # this process
    mlx_active: int
    mlx_cache: int
    mlx_peak: int
    # macOS: `available` is an estimate, so shutting down takes the kernel's
    # "critical" too (when the kernel gives a verdict at all).
    kernel_first: bool = False
    # Metal's max_recommended_working_set_size: what MLX's buffers may take
    # before the GPU runs out (0: no such ceiling, as on the CPU backend).
    gpu_working_set: int = 0

    @property
    def daemon_bytes(self) -> int:
        """What the daemon holds. Metal buffers may not show in RSS, so take the larger."""
        return max(self.resident, self.mlx_active + self.mlx_cache)


class Probe(Protocol):
    """Where readings come from: the seam tests use to script pressure and hysteresis."""

    def read(self) -> MemoryReading: ...


# kern.memorystatus_vm_pressure_level, from xnu's kern_memorystatus.h.
MACOS_PRESSURE = {1: "normal", 2: "warn", 4: "critical"}
PSI_PATH = Path("/proc/pressure/memory")
# Linux PSI, as a percentage of the last 10 s: "some" is time in which at
# least one task stalled on memory (reclaim, swap-in), "full" time in which
# all of them did. Thrashing shows as sustained "full" stalls.
PSI_WARN_SOME_AVG10 = 10.0
PSI_CRITICAL_FULL_AVG10 = 10.0


def parse_psi(text: str) -> str:
    """The pressure verdict for the contents of /proc/pressure/memory."""
    avg10: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        for field in fields.split():
            name, _, value = field.partition("=")
            if name == "avg10":
                avg10[kind] = float(value)
    if avg10.get("full", 0.0) >= PSI_CRITICAL_FULL_AVG10:
        return "critical"
    if avg10.get("some", 0.0) >= PSI_WARN_SOME_AVG10:
        return "warn"
    return "normal"


class DarwinReader(Protocol):
    """The macOS readings (darwin.py): the seam tests script pressure and page counts through."""

    def pressure_level(self) -> int: ...

    def page_counts(self) -> PageCounts: ...


class MemoryProbe:
    """Real readings: the system's memory, the kernel's pressure level, MLX's allocator counters."""

    def __init__(
        self,
        *,
        platform: str = sys.platform,
        darwin: DarwinReader | None = None,
        psi_path: Path = PSI_PATH,
    ) -> None:
        self._platform = platform
        self._darwin = darwin
        self._psi_path = psi_path
        self._process = psutil.Process()
        self._pressure_failed = False
        self._pages_failed = False
        self._gpu_working_set: int | None = None

    def _darwin_reader(self) -> DarwinReader:
        if self._darwin is None:
            self._darwin = DarwinMemory()  # binds libSystem: only ever on a Mac
        return self._darwin

    def read(self) -> MemoryReading:
        import mlx.core as mx  # allocator counters only: no array work

        vm = psutil.virtual_memory()
        return MemoryReading(
            available=self.available(int(vm.available)),
            total=int(vm.total),
            pressure=self.pressure(),
            resident=int(self._process.memory_info().rss),
            mlx_active=int(mx.get_active_memory()),
            mlx_cache=int(mx.get_cache_memory()),
            mlx_peak=int(mx.get_peak_memory()),
            kernel_first=self._platform == "darwin",
            gpu_working_set=self.gpu_working_set(),
        )

    def available(self, psutil_available: int) -> int:
        """Bytes the system can hand out: macOS's own count there, psutil's elsewhere."""
        if self._platform != "darwin":
            return psutil_available  # Linux: MemAvailable, which is what it says
        try:
            return self._darwin_reader().page_counts().available
        except (OSError, ValueError, AttributeError) as exc:
            if not self._pages_failed:
                log.warning("cannot read the kernel's page counts (%s); using psutil's", exc)
                self._pages_failed = True
            return psutil_available

    def pressure(self) -> str | None:
        try:
            if self._platform == "darwin":
                value = self._darwin_reader().pressure_level()
                return MACOS_PRESSURE.get(value, "critical" if value > 4 else "normal")
            if self._platform == "linux" and self._psi_path.exists():
                return parse_psi(self._psi_path.read_text())
        except (OSError, ValueError, AttributeError) as exc:
            if not self._pressure_failed:
                log.warning("cannot read the kernel's memory pressure: %s", exc)
                self._pressure_failed = True
        return None

    def gpu_working_set(self) -> int:
        """Metal's recommended ceiling for MLX's buffers; 0 where there is none (read once)."""
        if self._gpu_working_set is None:
            import mlx.core as mx

            size = 0
            if mx.metal.is_available():
                info: dict[str, Any] = mx.device_info()
                size = int(info.get("max_recommended_working_set_size", 0))
            self._gpu_working_set = size
        return self._gpu_working_set
