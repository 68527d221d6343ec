"""Sampling where a request is silent: the request wins, then the config, the model, Pensieve.

The daemon tests read the settings from what a tiny random model writes: its
distribution is nearly flat, so sampled replies differ from one another
while greedy (temperature 0, or top_k 1) ones repeat exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pensieved.config import BUILTIN_SOURCE, ConfigError, ModelConfig, parse_config, stops_loops
from pensieved.conversation.stops import LOOP_SHORTEST, LOOP_TIMES, looping
from pensieved.models.gguf import import_gguf
from pensieved.models.registry import BUILTIN_SAMPLING, builtin_gguf_path
from pensieved.models.sampling import FALLBACK, defaults_for, recommended
from pensieved.paths import default_paths
from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, daemon_running

MODEL = ModelConfig("m", "/m")
ASK = [{"role": "user", "content": "Tell me a story."}]


def test_each_setting_comes_from_the_config_else_the_model_else_the_fallback() -> None:
    config = ModelConfig("m", "/m", top_k=7)
    defaults = defaults_for(config, {"temperature": 0.3, "top_k": 20})
    assert (defaults.temperature, defaults.top_k) == (0.3, 7)
    assert (defaults.top_p, defaults.min_p) == (FALLBACK["top_p"], FALLBACK["min_p"])
    assert defaults.report() == {
        "temperature": {"value": 0.3, "from": "model"},
        "top_p": {"value": FALLBACK["top_p"], "from": "pensieve"},
        "top_k": {"value": 7, "from": "config"},
        "min_p": {"value": FALLBACK["min_p"], "from": "pensieve"},
        "repetition_penalty": {"value": 1.0, "from": "pensieve"},
    }


def test_a_model_recommendation_is_read_from_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.95,
                "top_k": 20,
                "min_p": 0,
                "eos_token_id": [1, 2],
            }
        )
    )
    assert recommended(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": -1},
        {"temperature": "hot"},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 2.5},
        {"min_p": 2},
        {"temperature": True},
    ],
)
def test_a_recommendation_out_of_range_is_ignored(tmp_path: Path, values: dict[str, Any]) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    assert recommended(tmp_path) == {}


def test_no_or_broken_generation_config_recommends_nothing(tmp_path: Path) -> None:
    assert recommended(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert recommended(tmp_path) == {}


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("temperature = -0.1", "models.a.temperature"),
        ("temperature = 3", "models.a.temperature"),
        ("top_p = 0", "models.a.top_p"),
        ("top_k = 1.5", "models.a.top_k"),
        ("min_p = 1.5", "models.a.min_p"),
        ('temperature = "low"', "models.a.temperature"),
    ],
)
def test_bad_sampling_settings_name_the_key(line: str, key: str) -> None:
    data = {"models": {"a": {"source": "/a", **_toml_line(line)}}}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(data, default_paths())


def _toml_line(line: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(line)


def test_the_embedded_model_imports_with_its_authors_sampling(tmp_path: Path) -> None:
    """SmolLM2's model card samples at temperature 0.2, top_p 0.9; its GGUF says nothing."""
    folder = import_gguf(builtin_gguf_path(), tmp_path / "smollm2", BUILTIN_SAMPLING)
    assert recommended(folder) == BUILTIN_SAMPLING
    assert defaults_for(MODEL, recommended(folder)).top_k == FALLBACK["top_k"]


@pytest.fixture(scope="module")
def greedy_model(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, whose generation_config.json recommends greedy decoding."""
    folder = tmp_path_factory.mktemp("models") / "greedy"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    return folder


@pytest.fixture(scope="module")
def sampling_daemon(
    greedy_model: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    common = {"context_length": TINY_CONTEXT}
    config = {
        "models": {
            "recommends-greedy": {"source": str(greedy_model), "default": True, **common},
            "configured-hot": {"source": str(greedy_model), "temperature": 1.0, **common},
            "configured-top-k-1": {"source": str(tiny_dir), "top_k": 1, **common},
            "plain": {"source": str(tiny_dir), **common},
            "stops-loops": {"source": str(greedy_model), "stop_loops": True, **common},
        }
    }
    with daemon_running(tmp_path_factory.mktemp("sampling-daemon"), config) as daemon:
        yield daemon


def _replies(daemon: Daemon, model: str, tries: int = 3, **sampling: Any) -> list[str]:
    client = daemon.client()
    replies = []
    for _ in range(tries):
        message = client.messages.create(
            model=model,
            max_tokens=12,
            messages=ASK,
            extra_body=sampling,  # type: ignore[arg-type]
        )
        replies.append("".join(getattr(block, "text", "") for block in message.content))
    return replies


def test_the_models_recommendation_applies_when_the_request_is_silent(
    sampling_daemon: Daemon,
) -> None:
    replies = _replies(sampling_daemon, "recommends-greedy")
    assert replies[0] and len(set(replies)) == 1, replies


def test_a_value_the_request_sets_wins(sampling_daemon: Daemon) -> None:
    replies = _replies(sampling_daemon, "recommends-greedy", temperature=1.0, top_k=0)
    assert len(set(replies)) == 3, replies


def test_the_config_wins_over_the_model(sampling_daemon: Daemon) -> None:
    assert len(set(_replies(sampling_daemon, "configured-hot"))) == 3


def test_top_k_one_from_the_config_decodes_the_greedy_reply(sampling_daemon: Daemon) -> None:
    greedy = _replies(sampling_daemon, "configured-top-k-1", tries=1, temperature=0)
    assert _replies(sampling_daemon, "configured-top-k-1") == greedy * 3


def test_without_a_recommendation_the_fallback_samples(sampling_daemon: Daemon) -> None:
    assert len(set(_replies(sampling_daemon, "plain"))) == 3


def test_the_defaults_in_force_are_shown(sampling_daemon: Daemon) -> None:
    with sampling_daemon.http() as http:
        models = {m["name"]: m for m in http.get("/health").json()["models"]}
        one = http.get("/v1/models/configured-hot").json()
    assert models["recommends-greedy"]["sampling"]["temperature"] == {"value": 0.0, "from": "model"}
    assert models["plain"]["sampling"]["min_p"] == {"value": FALLBACK["min_p"], "from": "pensieve"}
    assert one["sampling_defaults"]["temperature"] == {"value": 1.0, "from": "config"}
    assert one["sampling_defaults"]["top_k"] == {"value": FALLBACK["top_k"], "from": "pensieve"}


def test_a_passage_three_times_running_is_a_loop() -> None:
    passage = list(range(LOOP_SHORTEST))
    assert looping([7, 7] + passage * LOOP_TIMES)
    assert looping(list(range(100, 164)) * LOOP_TIMES)  # the longest passage watched
    assert looping([5] * LOOP_SHORTEST * LOOP_TIMES)  # one token over and over
    assert not looping(passage * (LOOP_TIMES - 1))
    assert not looping(passage * LOOP_TIMES + [99])  # it has moved on
    assert not looping(list(range(LOOP_SHORTEST - 1)) * 5)  # too short to be a passage
    assert not looping(list(range(65)) * LOOP_TIMES)  # longer than watched


def test_loops_are_stopped_for_the_embedded_model_unless_the_config_says() -> None:
    assert stops_loops(ModelConfig("b", BUILTIN_SOURCE))
    assert not stops_loops(ModelConfig("b", BUILTIN_SOURCE, stop_loops=False))
    assert not stops_loops(MODEL)
    assert stops_loops(ModelConfig("m", "/m", stop_loops=True))


def test_a_looping_reply_ends_its_turn_where_the_model_has_stop_loops(
    sampling_daemon: Daemon,
) -> None:
    """The tiny model's greedy reply falls into a loop; with `stop_loops` it ends there."""
    client = sampling_daemon.client()

    def ask(model: str) -> Any:
        return client.messages.create(model=model, max_tokens=120, messages=ASK)

    endless, stopped = ask("recommends-greedy"), ask("stops-loops")
    assert endless.stop_reason == "max_tokens"
    assert stopped.stop_reason == "end_turn"
    assert stopped.usage.output_tokens < endless.usage.output_tokens
    text = stopped.content[0].text  # type: ignore[union-attr]
    assert endless.content[0].text.startswith(text)  # type: ignore[union-attr]
    assert "stopped a reply looping" in sampling_daemon.log()
