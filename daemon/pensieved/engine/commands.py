"""What crosses into the engine thread: the commands on its queue, and its hooks into the guard.

Plain records: the event loop builds them (core.py's public methods), the
engine thread reads them (`Engine._handle`, by `match`).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pensieved.config import ModelConfig
from pensieved.conversation.plan import GenerationRequest
from pensieved.engine.stream import GenerationStream

if TYPE_CHECKING:
    from pensieved.engine.loading import LoadedModel


# What the event loop asks of the engine thread, in order, through one queue.
@dataclass(frozen=True)
class Load:
    model: ModelConfig
    future: concurrent.futures.Future[LoadedModel]


@dataclass(frozen=True)
class Unload:
    model: ModelConfig
    future: concurrent.futures.Future[None]


@dataclass(frozen=True)
class Submit:
    model: ModelConfig
    request: GenerationRequest
    stream: GenerationStream


@dataclass(frozen=True)
class Cancel:
    stream: GenerationStream


@dataclass(frozen=True)
class Call:
    """Run a function between steps (MLX calls belong on the engine thread)."""

    function: Callable[[], None]


@dataclass(frozen=True)
class Stop:
    """End the thread: fail what runs, save the prompt caches, refuse what is queued."""


Command = Load | Unload | Submit | Cancel | Call | Stop


@dataclass(frozen=True)
class MemoryHooks:
    """What the engine asks of the memory guard; each is None where no guard runs.

    Functions, not the guard itself: the guard watches the engine, so the
    daemon (service/server.py) builds these around the guard it owns.
    """

    # Free memory to keep when loading a model: the memory guard's reject line.
    floor_bytes: Callable[[], int] | None = None
    # What the system can hand out now, as the memory guard reads it.
    available: Callable[[], int] | None = None
    # Called with each request before it is queued; raises to refuse it
    # (the memory guard's admission by estimate, memory/admission.py).
    admit: Callable[[LoadedModel, GenerationRequest, GenerationStream], None] | None = None
