"""Which models stay loaded: room is made for a model before it loads, never after.

Claude Code uses two tiers (a main model and a small fast one), and each may
map to its own local model. Models load on first use and stay warm; before
one loads, its weight size is read from its files, and if it would not fit
in `[engine] models_budget_gb`, or would take available memory below the
memory guard's reject line, the least recently used idle models are unloaded
first. A model that cannot fit even alone is refused (529) with the sizes,
before any of it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pensieved.paths import GB
from pensieved.wire.errors import Overloaded

# A model whose size cannot be read from its files (a repo id that mlx-lm
# will download) is charged nothing up front; its real size counts once loaded.
UNKNOWN = 0


def weight_bytes_on_disk(path: Path) -> int:
    if not path.is_dir():
        return UNKNOWN
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def expected_weight_bytes(path: Path, dequantizes: bool) -> int:
    """What the weights will take in memory: their files, or float32 when dequantized."""
    size = weight_bytes_on_disk(path)
    if not dequantizes:
        return size
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return size
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if not isinstance(bits, int) or bits <= 0:
        return size
    # Each group's scale and bias add about one bit per weight.
    return int(size * 32 / (bits + 1))


@dataclass(frozen=True)
class Resident:
    name: str
    weight_bytes: int
    idle_since: float | None  # None: requests in flight


def plan_room(
    name: str,
    need: int,
    resident: list[Resident],
    budget: int | None,
    available: int | None,
    floor: int,
) -> list[str]:
    """The resident models to unload (least recently used first) so that `name` fits.

    `budget`: the most all models may hold (None: no budget). `available`:
    memory the system can hand out now, kept above `floor` (None: not checked).
    Raises `Overloaded` naming the sizes when no unloading makes room.
    """
    if budget is not None and need > budget:
        raise Overloaded(
            f"model {name!r} needs {need / GB:.2f} GB of weights, more than the whole "
            f"model budget of {budget / GB:.2f} GB (engine.models_budget_gb)"
        )
    held = sum(model.weight_bytes for model in resident)
    free = None if available is None else available - floor
    idle = sorted(
        (model for model in resident if model.idle_since is not None),
        key=lambda model: model.idle_since or 0.0,
    )
    evict: list[str] = []

    def fits() -> bool:
        within_budget = budget is None or held + need <= budget
        within_memory = free is None or need <= free
        return within_budget and within_memory

    while not fits():
        if not idle:
            if free is not None and need > free:
                raise Overloaded(
                    f"model {name!r} needs {need / GB:.2f} GB and only {free / GB:.2f} GB "
                    "are free above the memory guard's reject line, with every other model "
                    "busy; try again shortly",
                    {"retry-after": "10"},
                )
            raise Overloaded(
                f"model {name!r} needs {need / GB:.2f} GB; the models budget is "
                f"{(budget or 0) / GB:.2f} GB with {held / GB:.2f} GB held by models that "
                "are busy; try again shortly",
                {"retry-after": "10"},
            )
        victim = idle.pop(0)
        evict.append(victim.name)
        held -= victim.weight_bytes
        if free is not None:
            free += victim.weight_bytes
    return evict
