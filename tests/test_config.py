"""Config parsing, overrides, token storage and model-name resolution (no model needed)."""

from __future__ import annotations

import re
import stat
import tomllib
from pathlib import Path

import pytest

from pensieved.config import (
    BUILTIN_SOURCE,
    Config,
    ConfigError,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    ServerConfig,
    ServiceConfig,
    ensure_token,
    load_config,
    parse_config,
    with_overrides,
)
from pensieved.models.registry import ModelRegistry
from pensieved.paths import default_paths

REPO = Path(__file__).resolve().parents[1]


def test_documented_defaults_match_the_built_in_ones() -> None:
    documented = parse_config(
        tomllib.loads((REPO / "config" / "config.toml").read_text()), default_paths()
    )
    assert documented == Config()
    assert documented.server.host == "127.0.0.1"
    assert documented.server.port == 7777
    assert documented.default_model.source == BUILTIN_SOURCE


SECTIONS = {"server": ServerConfig, "engine": EngineConfig, "memory": MemoryConfig}
SECTIONS["service"] = ServiceConfig


def _documented_keys(text: str) -> dict[str, set[str]]:
    """Each [section] of config.toml and its keys, set (`key = 1`) or shown unset (`# key = 1`)."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        if heading := re.fullmatch(r"\[([\w.-]+)\]", line):
            section = heading[1]
        elif setting := re.fullmatch(r"(?:# )?(\w+) = .*", line):
            keys.setdefault(section, set()).add(setting[1])
    return keys


def test_every_key_is_documented_at_its_default() -> None:
    text = (REPO / "config" / "config.toml").read_text()
    documented = _documented_keys(text)
    for name, section in SECTIONS.items():
        fields = set(section.__struct_fields__)
        assert documented[name] == fields, f"[{name}] in config/config.toml"
        # A key shown commented out is one whose default is unset.
        written = tomllib.loads(text)[name]
        assert {k for k in fields if getattr(section(), k) is None} == fields - set(written)
    # The [models.*] keys are described in the comment above the table.
    models_comment = text[text.index("# One [models.<name>] table") :]
    described = re.findall(r"^#   ([a-z_]+(?:, [a-z_]+)*)(?:\s|$)", models_comment, re.M)
    model_keys = {key for line in described for key in line.split(", ")}
    assert model_keys == set(ModelConfig.__struct_fields__) - {"name"}


def test_everything_lives_under_pensieve_home(pensieve_home: Path) -> None:
    paths = default_paths()
    for path in (
        paths.config_file,
        paths.token_file,
        paths.models_dir,
        paths.log_dir,
        paths.control_socket,
    ):
        assert path.is_relative_to(pensieve_home)


def test_missing_default_file_means_defaults_but_a_named_one_must_exist(tmp_path: Path) -> None:
    assert load_config() == Config()
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_config_is_read_from_pensieve_home(pensieve_home: Path) -> None:
    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text(
        '[server]\nport = 8123\n[models.a]\nsource = "/m/a"\n'
        '[models.b]\nsource = "x/y"\ndefault = true\n'
    )
    config = load_config()
    assert config.server.port == 8123
    assert config.default_model.name == "b"
    assert config.base_url == "http://127.0.0.1:8123"


def test_first_model_is_default_when_none_is_marked() -> None:
    config = parse_config(
        {"models": {"a": {"source": "/a"}, "b": {"source": "/b"}}}, default_paths()
    )
    assert config.default_model.name == "a"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "80"', "server.port"),
        ("[server]\nport = 70000", "server.port"),
        ("[server]\nport = true", "server.port"),
        ("[models.a]\naliases = []", "models.a.source"),
        ('[models.a]\nsource = "/a"\naliases = "claude-*"', "models.a.aliases"),
        ('[models.a]\nsource = "/a"\ncontext_length = 0', "models.a.context_length"),
        (
            '[models.a]\nsource = "/a"\ndefault = true\n[models.b]\nsource = "/b"\ndefault = true',
            "models",
        ),
        ("server = 3", "server"),
        ('[engine]\ndequantize = "sometimes"', "engine.dequantize"),
        ("[server]\ntext_interval_ms = -1", "server.text_interval_ms"),
        ('[server]\ntext_interval_ms = "fast"', "server.text_interval_ms"),
        ('[service]\nmemory_max = "lots"', "service.memory_max"),
        ('[models.a]\nsource = "/a"\nkeep_alive = 0', "models.a.keep_alive"),
        ("[server\n", "config.toml"),
    ],
)
def test_bad_config_names_the_key(pensieve_home: Path, text: str, key: str) -> None:
    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config()


def test_flags_override_the_file() -> None:
    base = parse_config(
        {"models": {"main": {"source": "/a", "aliases": ["claude-*"]}, "other": {"source": "/b"}}},
        default_paths(),
    )
    config = with_overrides(base, host="::1", port=9000, model="/c")
    assert config.server.port == 9000
    assert config.base_url == "http://[::1]:9000"
    assert config.default_model.name == "main"
    assert config.default_model.source == "/c"
    assert config.default_model.aliases == ("claude-*",)
    assert [m.source for m in config.models] == ["/c", "/b"]


def test_token_is_generated_once_and_private(pensieve_home: Path) -> None:
    config = Config()
    token = ensure_token(config)
    assert len(token) > 30
    assert ensure_token(config) == token
    assert stat.S_IMODE(config.paths.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.paths.token_file.parent.stat().st_mode) == 0o700


LONG_TOKEN = "a-token-of-forty-characters-0123456789ab"


def test_configured_token_wins(pensieve_home: Path) -> None:
    config = parse_config({"server": {"auth_token": LONG_TOKEN}}, default_paths())
    assert ensure_token(config) == LONG_TOKEN
    assert not config.paths.token_file.exists()


def test_a_short_configured_token_is_refused_with_a_sentence() -> None:
    with pytest.raises(ConfigError, match=r"server\.auth_token: 7 characters is guessable"):
        parse_config({"server": {"auth_token": "hunter2"}}, default_paths())


def test_a_config_file_holding_the_token_must_be_private(pensieve_home: Path) -> None:
    pensieve_home.mkdir()
    path = pensieve_home / "config.toml"
    path.write_text(f'[server]\nauth_token = "{LONG_TOKEN}"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"config file .* has mode 644 and holds the token"):
        load_config()
    path.chmod(0o600)
    assert load_config().server.auth_token == LONG_TOKEN
    # Without the token in it, a readable file is fine.
    path.write_text("[server]\nport = 7000\n")
    path.chmod(0o644)
    assert load_config().server.port == 7000


@pytest.mark.parametrize("name", ["../../etc", "a/b", ".hidden", "x y", "a:b", ""])
def test_a_model_name_that_could_reach_outside_the_models_folder_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="a model name is letters"):
        parse_config({"models": {name: {"source": "/m"}}}, default_paths())


def test_config_set_writes_the_file_private(pensieve_home: Path) -> None:
    from tests.daemon import run_pensievectl

    done = run_pensievectl(pensieve_home, "config", "set", "server.auth_token", LONG_TOKEN)
    assert done.returncode == 0, done.stderr
    path = pensieve_home / "config.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in pensieve_home.iterdir() if p.name.startswith(".")] == []
    short = run_pensievectl(pensieve_home, "config", "set", "server.auth_token", "hunter2")
    assert short.returncode == 1 and "guessable" in short.stderr


def test_model_names_resolve_exact_then_aliases_in_order_then_default() -> None:
    config = parse_config(
        {
            "models": {
                "big": {"source": "/big", "aliases": ["claude-*opus*", "claude-*sonnet*"]},
                "small": {"source": "/small", "aliases": ["claude-*haiku*", "claude-*"]},
                "fallback": {"source": "/f", "default": True},
            }
        },
        default_paths(),
    )
    registry = ModelRegistry(config)
    assert registry.resolve("small").name == "small"
    assert registry.resolve("claude-opus-4-8").name == "big"
    assert registry.resolve("claude-haiku-4-5-20251001").name == "small"
    assert registry.resolve("claude-3-sonnet").name == "big"
    assert registry.resolve("claude-instant").name == "small"
    assert registry.resolve("gpt-4o").name == "fallback"
