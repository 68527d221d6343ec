"""The memory guard's levels: the rule that turns a reading into one, and what it tells clients.

Pure: a reading and the settings in, a level out (guard.py applies it).
"""

from __future__ import annotations

import enum

from pensieved.config import MemoryConfig
from pensieved.memory.probe import MemoryReading
from pensieved.paths import GB

# Seconds a refused client is told to wait (`retry-after`).
RETRY_AFTER_LOW_MEMORY = "10"
RETRY_AFTER_SHUTTING_DOWN = "5"

# Seconds a memory shutdown may take (ending streams, freeing the model,
# saving the prompt cache: about a second when the loop is free) before the
# guard's thread ends the process itself.
SHUTDOWN_GRACE_S = 15.0
# A memory shutdown's exit code, also when the guard's thread ends the
# process: launchd and systemd restart only a failure, which would start the
# daemon straight back into the same pressure.
EXIT_MEMORY_SHUTDOWN = 0


class Level(enum.IntEnum):
    NORMAL = 0
    WARN = 1
    REJECT = 2
    SHUTDOWN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def classify(reading: MemoryReading, current: Level, settings: MemoryConfig) -> Level:
    """The level for `reading`, given the level in force (for hysteresis)."""
    by_memory = Level.NORMAL
    for level, line_gb in (
        (Level.SHUTDOWN, settings.shutdown_below_gb),
        (Level.REJECT, settings.reject_below_gb),
        (Level.WARN, settings.warn_below_gb),
    ):
        # Staying at a level (or above it) takes climbing past line + margin.
        margin = settings.hysteresis_gb if current >= level else 0.0
        if line_gb > 0 and reading.available < (line_gb + margin) * GB:
            by_memory = level
            break
    by_kernel = Level.NORMAL
    if settings.kernel_pressure:
        by_kernel = {"critical": Level.REJECT, "warn": Level.WARN}.get(
            reading.pressure or "", Level.NORMAL
        )
        if (
            by_memory is Level.SHUTDOWN
            and reading.kernel_first
            and reading.pressure is not None
            and reading.pressure != "critical"
        ):
            # Shutting down is not undone (launchd does not restart a clean
            # exit): on an estimate of available memory, only with the kernel.
            by_memory = Level.REJECT
    by_budget = Level.NORMAL
    if settings.budget_gb > 0:
        margin = settings.hysteresis_gb if current >= Level.WARN else 0.0
        if reading.daemon_bytes > (settings.budget_gb - margin) * GB:
            by_budget = Level.WARN
    return max(by_memory, by_kernel, by_budget)


def describe(reading: MemoryReading, settings: MemoryConfig) -> str:
    """The figures every level change is logged with."""
    return (
        f"{reading.available / GB:.2f} GB of {reading.total / GB:.2f} GB available "
        f"(warn below {settings.warn_below_gb:g}, reject below {settings.reject_below_gb:g}, "
        f"shutdown below {settings.shutdown_below_gb:g}), "
        f"kernel pressure {reading.pressure or 'unknown'}, "
        f"daemon {reading.resident / GB:.2f} GB resident, "
        f"MLX {reading.mlx_active / GB:.2f} GB active + {reading.mlx_cache / GB:.2f} GB cache"
        + (f" (budget {settings.budget_gb:g} GB)" if settings.budget_gb > 0 else "")
    )
