"""Two models for Claude Code's two tiers, loaded on demand within a budget."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pensieved.models.residency import Resident, plan_room
from pensieved.wire.errors import Overloaded
from tests.daemon import Daemon, running_daemon, sse_events, start_daemon
from tests.models import build_tiny_model

MB = 1024**2
ASK_HUGE = {"model": "huge-1", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture(scope="module")
def tier_models(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiers")
    return {
        "small": build_tiny_model(root / "small", smollm_dir, hidden_size=64),
        "big": build_tiny_model(root / "big", smollm_dir, hidden_size=128),
        "huge": build_tiny_model(root / "huge", smollm_dir, hidden_size=512),
    }


def size_of(path: Path) -> int:
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def tiers_config(models: dict[str, Path], budget_gb: float) -> dict[str, Any]:
    return {
        "engine": {"models_budget_gb": budget_gb},
        "models": {
            "big": {"source": str(models["big"]), "aliases": ["claude-*opus*"], "default": True},
            "small": {"source": str(models["small"]), "aliases": ["claude-*haiku*"]},
            "huge": {"source": str(models["huge"]), "aliases": ["huge-*"]},
        },
    }


def loaded(daemon: Daemon) -> set[str]:
    with daemon.http() as http:
        return {m["name"] for m in http.get("/health").json()["models"] if m["loaded"]}


def ask(daemon: Daemon, model: str) -> str:
    message = daemon.client().messages.create(
        model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    return message.model


@pytest.fixture(scope="module")
def roomy(
    tier_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """Budget for big and small together (but never huge)."""
    budget = (size_of(tier_models["big"]) + size_of(tier_models["small"]) + MB) / 1024**3
    yield from running_daemon(tmp_path_factory.mktemp("roomy"), tiers_config(tier_models, budget))


def test_each_tier_reaches_its_model_and_both_stay_resident(roomy: Daemon) -> None:
    assert ask(roomy, "claude-opus-4-8") == "big"
    assert ask(roomy, "claude-haiku-4-5") == "small"
    assert loaded(roomy) == {"big", "small"}
    assert ask(roomy, "claude-opus-4-8") == "big"
    assert "unloaded model" not in roomy.log()


def test_a_model_larger_than_the_budget_is_refused_before_loading(roomy: Daemon) -> None:
    with roomy.http() as http:
        response = http.post("/v1/messages", json=ASK_HUGE)
    assert response.status_code == 529
    error = response.json()["error"]
    assert error["type"] == "overloaded_error"
    assert "'huge' needs" in error["message"] and "GB" in error["message"]
    assert "loaded model huge" not in roomy.log()
    assert loaded(roomy) <= {"big", "small"}


def test_the_least_recently_used_model_makes_room(
    tier_models: dict[str, Path], tmp_path: Path
) -> None:
    # Room for big alone: small and big take turns.
    budget = (size_of(tier_models["big"]) + MB) / 1024**3
    daemon = start_daemon(tmp_path, tiers_config(tier_models, budget))
    try:
        assert loaded(daemon) == {"big"}  # the default model is warmed at start
        assert ask(daemon, "claude-haiku-4-5") == "small"
        assert loaded(daemon) == {"small"}
        assert "unloaded model big (least recently used) to make room for small" in daemon.log()
        # And back: big is loaded again on demand.
        assert ask(daemon, "claude-opus-4-8") == "big"
        assert loaded(daemon) == {"big"}
    finally:
        daemon.stop()


def test_concurrent_first_requests_load_a_cold_model_once(
    tier_models: dict[str, Path], tmp_path: Path
) -> None:
    daemon = start_daemon(tmp_path, tiers_config(tier_models, 1.0))
    try:
        body = {
            "model": "claude-haiku-4-5",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }

        def stream() -> list[str]:
            with daemon.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
                assert response.status_code == 200
                return [name for name, _ in sse_events(response)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: stream(), range(4)))
        for names in results:
            # A cold model's stream may open with pings while it loads.
            assert next(n for n in names if n != "ping") == "message_start"
            assert names[-1] == "message_stop"
        assert daemon.log().count("loaded model small") == 1
    finally:
        daemon.stop()


def resident(name: str, size: int, idle_since: float | None) -> Resident:
    return Resident(name, size, idle_since)


def test_plan_room_picks_least_recently_used_idle_models() -> None:
    models = [resident("a", 40, 5.0), resident("b", 40, 1.0), resident("c", 40, None)]
    assert plan_room("new", 30, models, budget=150, available=None, floor=0) == []
    assert plan_room("new", 50, models, budget=150, available=None, floor=0) == ["b"]
    assert plan_room("new", 90, models, budget=150, available=None, floor=0) == ["b", "a"]
    # Memory above the reject line counts too, budget or not.
    assert plan_room("new", 30, models, budget=None, available=60, floor=40) == ["b"]
    with pytest.raises(Overloaded, match="busy"):
        plan_room("new", 120, models, budget=150, available=None, floor=0)
    with pytest.raises(Overloaded, match="more than the whole"):
        plan_room("new", 151, models, budget=150, available=None, floor=0)
