"""`GET /v1/models` and `GET /v1/models/{id}` against real daemons, through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from pensieved.http.models import page
from pensieved.wire.errors import InvalidRequest
from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, running_daemon

# tiny_daemon's models in config order, then its Claude tiers (every
# `claude-*` name resolves to tiny there).
CONFIGURED = ["tiny", "tiny-long", "broken", "unloadable"]
TIERS = ["claude-opus-4-8", "claude-sonnet-4-6", "claude-haiku-4-5"]


@pytest.fixture(scope="module")
def sonnet_only(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose aliases serve only the sonnet tier, with no fallback model."""
    config = {
        "models": {
            "local": {
                "source": str(tiny_dir),
                "aliases": ["claude-sonnet-*"],
                "context_length": TINY_CONTEXT,
            }
        }
    }
    yield from running_daemon(tmp_path_factory.mktemp("sonnet-only"), config)


def test_the_list_holds_the_models_then_a_claude_entry_per_tier(tiny_daemon: Daemon) -> None:
    models = list(tiny_daemon.client().models.list())
    assert [m.id for m in models] == CONFIGURED + TIERS
    for model in models[len(CONFIGURED) :]:
        # Claude Code's picker keeps ids matching ^(claude|anthropic).
        assert model.id.startswith("claude-")
        assert model.display_name.startswith("tiny (as Claude ")
        assert model.max_input_tokens == TINY_CONTEXT
    assert {m.display_name for m in models[len(CONFIGURED) :]} == {
        "tiny (as Claude Opus)",
        "tiny (as Claude Sonnet)",
        "tiny (as Claude Haiku)",
    }


def test_a_tier_entry_is_a_name_messages_serves(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    for tier in TIERS:
        message = client.messages.create(
            model=tier, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.model == "tiny"


def test_only_tiers_that_resolve_are_listed(sonnet_only: Daemon) -> None:
    ids = [m.id for m in sonnet_only.client().models.list()]
    assert ids == ["local", "claude-sonnet-4-6"]


def test_paging_one_at_a_time_walks_the_whole_list(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    first = client.models.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    assert first.first_id == first.last_id == "tiny"
    pages = list(first.iter_pages())
    assert all(len(p.data) == 1 for p in pages)
    assert [p.data[0].id for p in pages] == CONFIGURED + TIERS
    assert [p.has_more for p in pages] == [True] * (len(pages) - 1) + [False]


def test_after_id_and_before_id_page_as_documented(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    after = client.models.list(limit=2, after_id="tiny")
    assert [m.id for m in after.data] == ["tiny-long", "broken"]
    assert (after.first_id, after.last_id, after.has_more) == ("tiny-long", "broken", True)

    before = client.models.list(limit=2, before_id="broken")
    assert [m.id for m in before.data] == ["tiny", "tiny-long"]
    assert before.has_more is False  # nothing before "tiny"

    backwards = client.models.list(limit=3, before_id="claude-haiku-4-5")
    assert [m.id for m in backwards.data] == ["unloadable", "claude-opus-4-8", "claude-sonnet-4-6"]
    assert backwards.has_more is True
    # The SDK walks backwards from a before_id page, each page the one before.
    walked = [[m.id for m in p.data] for p in backwards.iter_pages()]
    assert walked == [
        ["unloadable", "claude-opus-4-8", "claude-sonnet-4-6"],
        ["tiny", "tiny-long", "broken"],
    ]

    everything = client.models.list(limit=1000)
    assert [m.id for m in everything.data] == CONFIGURED + TIERS
    assert everything.has_more is False
    default = client.models.list()  # 20 by default: the whole list
    assert len(default.data) == len(CONFIGURED + TIERS) and default.has_more is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": 0}, "limit: must be an integer from 1 to 1000"),
        ({"limit": 1001}, "limit: must be an integer from 1 to 1000"),
        ({"after_id": "nope"}, "after_id: no model has the id 'nope'"),
        ({"before_id": "nope"}, "before_id: no model has the id 'nope'"),
        ({"after_id": "tiny", "before_id": "broken"}, "cannot be used together"),
    ],
)
def test_bad_paging_is_a_400(tiny_daemon: Daemon, params: dict[str, object], message: str) -> None:
    with pytest.raises(anthropic.BadRequestError, match=message) as caught:
        tiny_daemon.client().models.list(**params)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_retrieve_resolves_every_name_messages_serves(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    tiny = client.models.retrieve("tiny")
    assert (tiny.id, tiny.display_name, tiny.max_input_tokens) == ("tiny", "tiny", TINY_CONTEXT)
    assert tiny.type == "model" and tiny.created_at.year == 1970  # release date unknown
    # A listed tier entry answers as listed; an alias as the model it names.
    assert client.models.retrieve("claude-opus-4-8").id == "claude-opus-4-8"
    assert client.models.retrieve("claude-3-5-haiku-latest").id == "tiny"
    assert client.models.retrieve("long-anything").id == "tiny-long"
    # tiny is the default: any other name is served by it, so it is found.
    assert client.models.retrieve("gpt-4").id == "tiny"


def test_retrieve_is_a_404_for_names_messages_refuses(sonnet_only: Daemon) -> None:
    client = sonnet_only.client()
    assert client.models.retrieve("claude-sonnet-4-6").id == "claude-sonnet-4-6"
    assert client.models.retrieve("claude-sonnet-4-5").id == "local"
    for name in ("claude-opus-4-8", "gpt-4"):
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.models.retrieve(name)
        assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(
                model=name, max_tokens=1, messages=[{"role": "user", "content": "Hi"}]
            )


def test_beta_models_routes(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    assert [m.id for m in client.beta.models.list(limit=2)] == CONFIGURED + TIERS
    assert client.beta.models.retrieve("claude-haiku-4-5").display_name == "tiny (as Claude Haiku)"


def test_page_windows() -> None:
    ids = ["a", "b", "c", "d", "e"]

    def ids_of(limit: int, after: str | None, before: str | None) -> tuple[list[str], bool]:
        window, more = page(ids, limit, after, before)
        return ids[window], more

    assert ids_of(2, None, None) == (["a", "b"], True)
    assert ids_of(5, None, None) == (ids, False)
    assert ids_of(2, "c", None) == (["d", "e"], False)
    assert ids_of(2, "e", None) == ([], False)
    assert ids_of(2, None, "c") == (["a", "b"], False)
    assert ids_of(2, None, "e") == (["c", "d"], True)
    assert ids_of(2, None, "a") == ([], False)
    with pytest.raises(InvalidRequest):
        page(ids, 2, "z", None)
