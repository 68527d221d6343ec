from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pensieved.models.gguf import import_gguf
from pensieved.models.registry import BUILTIN_SAMPLING, builtin_gguf_path
from tests.daemon import Daemon, running_daemon
from tests.models import build_tiny_model
from tests.schema import MONITOR

TINY_CONTEXT = 256


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "non_json_responses: the test means to receive bodies that are not JSON (or are cut "
        "off); the official-schema check lets those through and still checks JSON bodies",
    )
    config.addinivalue_line(
        "markers",
        "daemon: the test runs a real part: a pensieved, the engine, a model (tiny or "
        "embedded), or a process of its own (set by conftest.py from the test's fixtures and "
        "its and their code); `pytest -m 'not daemon'` (make test-fast) runs the others",
    )


# What makes a test slow and whole-system: a pensieved started (tests/daemon.py's
# helpers, a fixture chosen by name, `python -m pensieved`), the engine run
# in-process, a model computed on, or any process started.
STARTS_A_DAEMON = re.compile(
    r"\b(start_daemon|running_daemon|daemon_running|run_pensieve(d|ctl)|getfixturevalue|Engine)\("
    r'|"-m", "pensieve(d|ctl)"|_BIN / "(pensievectl|pensieved|claude-local)"'
    r"|\bsubprocess\.\w+\(|\bPopen\(|\bmlx_lm\.load\(|\bload_weights\("
)
# Fixtures that hand a test a model to compute on.
MODEL_FIXTURES = {"smollm_dir", "tiny_dir", "tiny_vlm_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `daemon` each test that, or any fixture or helper it uses, needs a real part."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        functions: list[Callable[..., Any]] = [item.function]
        for definitions in item._fixtureinfo.name2fixturedefs.values():
            functions.extend(definition.func for definition in definitions)
        functions.extend(_helpers(item.function, vars(item.module)))
        if MODEL_FIXTURES & set(item.fixturenames) or any(map(_starts_a_daemon, functions)):
            item.add_marker(pytest.mark.daemon)


def _helpers(function: Callable[..., Any], names: dict[str, Any]) -> list[Callable[..., Any]]:
    """The test module's own functions that `function` calls (one level: `ctl(...)`)."""
    try:
        called = set(re.findall(r"\b(\w+)\(", inspect.getsource(function)))
    except (OSError, TypeError):
        return []
    return [
        names[name]
        for name in called
        if inspect.isfunction(names.get(name)) and names[name].__module__.startswith("tests")
    ]


def _starts_a_daemon(function: Callable[..., Any]) -> bool:
    try:
        return bool(STARTS_A_DAEMON.search(inspect.getsource(function)))
    except (OSError, TypeError):  # built-in fixtures
        return False


@pytest.fixture(scope="session", autouse=True)
def official_schema_checks() -> Iterator[None]:
    """Every response the tests receive is checked against Anthropic's published schema."""
    with MONITOR.installed():
        yield


def _schema_violations(when: str) -> None:
    violations = MONITOR.take()
    if violations:
        count = f"{len(violations)} response{'s' if len(violations) > 1 else ''}"
        pytest.fail(
            f"{count} broke Anthropic's published schema ({when}):\n" + "\n".join(violations),
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    MONITOR.lenient = item.get_closest_marker("non_json_responses") is not None
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # A failure here is the test's own (the SDK may have swallowed the
    # response, or the test may have passed on what it read).
    yield
    _schema_violations("setup and call")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield
    _schema_violations("teardown")


@pytest.fixture(autouse=True)
def pensieve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own PENSIEVE_HOME: nothing touches the user's files."""
    home = tmp_path / "pensieve-home"
    monkeypatch.setenv("PENSIEVE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2, imported from its GGUF once per test session, as `prepare` does."""
    folder = tmp_path_factory.mktemp("models") / "smollm2"
    return import_gguf(builtin_gguf_path(), folder, BUILTIN_SAMPLING)


@pytest.fixture(scope="session")
def tiny_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", smollm_dir)


@pytest.fixture(scope="session")
def tiny_vlm_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2-VL (tests/vision_models.py), loaded through mlx-vlm."""
    from tests.vision_models import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", smollm_dir)


@pytest.fixture(scope="session")
def tiny_config(smollm_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("models")
    broken = build_tiny_model(
        root / "broken", smollm_dir, vocab_size=49152 + 4096, out_of_vocab_head=True
    )
    unloadable = root / "unloadable"
    unloadable.mkdir()
    (unloadable / "config.json").write_text('{"model_type": "llama"}')
    (unloadable / "model.safetensors").write_bytes(b"not safetensors")
    return {
        "models": {
            "tiny": {
                "source": str(tiny_dir),
                "aliases": ["claude-*"],
                "default": True,
                "context_length": TINY_CONTEXT,
            },
            "tiny-long": {"source": str(tiny_dir), "aliases": ["long-*"]},
            "broken": {"source": str(broken), "aliases": ["broken-*"]},
            "unloadable": {"source": str(unloadable)},
        }
    }


@pytest.fixture(scope="session")
def tiny_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_config: dict) -> Iterator[Daemon]:
    """One real daemon on a free port, serving tiny random models."""
    yield from running_daemon(tmp_path_factory.mktemp("tiny-daemon"), tiny_config)
