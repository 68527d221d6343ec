"""The one TOML config file: defaults, parsing, validation, and the auth token.

Read with `tomllib` into msgspec structs, whose types, ranges and choices are
the checks; `pensievectl` writes it with `tomli-w`. `config/config.toml` at the
repository root documents every key at its default, and tests/test_config.py
checks it against these structs key by key.
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_origin, get_type_hints

import click
import msgspec
from msgspec import Meta
from msgspec.structs import replace

from pensieved.paths import Paths, default_paths, private_dir, write_private

BUILTIN_SOURCE = "builtin:smollm2-135m-instruct"
# A configured token shorter than this is refused (the generated one has 52).
MIN_TOKEN_CHARS = 32
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
KV_GROUP_SIZE: Final = 64  # values that share one scale and bias in a quantized KV cache


class ConfigError(ValueError):
    """The config file cannot be used; the message names the key."""


# Each section is a struct that msgspec fills from its TOML table: the types,
# ranges and choices below are the checks, and a key the struct lacks is
# ignored. A rule across keys is its struct's __post_init__.
Seconds = Annotated[float, Meta(gt=0)]
GB_ = Annotated[float, Meta(ge=0)]


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(gt=0, lt=65536)] = 7777
    auth_token: str | None = None
    # Seconds between SSE `ping` events while a stream waits (long prefill).
    ping_interval: Seconds = 5.0
    # A stream's text goes out at most this often (milliseconds); the tokens
    # made meanwhile travel as one delta. 0 sends each token at once.
    text_interval_ms: Annotated[float, Meta(ge=0, le=1000)] = 15.0
    # Listening on a non-loopback address must be asked for explicitly.
    allow_remote: bool = False
    # Seconds a client may take to send its request headers (slow-loris guard).
    header_timeout: Seconds = 10.0
    # Seconds a client may take to send a whole request body (then 408): a
    # body dripped byte by byte would hold its connection for good.
    body_timeout: Seconds = 60.0
    # Requests served at once; more wait in the kernel's accept queue.
    max_connections: Annotated[int, Meta(ge=1)] = 64
    # On SIGTERM/SIGINT or `pensievectl stop`: seconds in-flight requests get
    # to finish before the rest end with an `error` event. Well below the 30 s
    # launchd (ExitTimeOut) and systemd (TimeoutStopSec) wait before SIGKILL.
    drain_seconds: Annotated[float, Meta(ge=0)] = 10.0

    def __post_init__(self) -> None:
        if self.auth_token is not None and len(self.auth_token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"auth_token: {len(self.auth_token)} characters is guessable; use at least "
                f"{MIN_TOKEN_CHARS} (or leave it out: a random one is made and stored 0600)"
            )


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    # Quantized models on MLX's CPU backend: "auto" dequantizes to float32
    # when OpenBLAS is active (much faster there), "always", or "never".
    dequantize: Literal["auto", "always", "never"] = "auto"
    # KV caches of earlier requests kept for reuse by prompt prefix, in GB
    # (0 turns the prompt cache off). Counted on top of the models' weights.
    prompt_cache_gb: GB_ = 2.0
    # Sequences decoded together in one batch; more requests wait their turn.
    max_sequences: Annotated[int, Meta(ge=1)] = 8
    # Requests that may wait for a place in the batch; beyond that, 529.
    max_queue: Annotated[int, Meta(ge=0)] = 32
    # Prompt tokens prefilled per step: a long prompt's prefill pauses the
    # other streams' decoding for at most one chunk at a time.
    prefill_chunk: Annotated[int, Meta(ge=1)] = 256
    # Save each model's most recent prompt-cache entry when the daemon stops
    # and load it back at start, so the first turn after a restart is warm.
    persist_prompt_cache: bool = False
    # The most all loaded models' weights may take, in GB; loading another
    # unloads the least recently used idle ones first. 0: no budget (the
    # memory guard's reject line still applies).
    models_budget_gb: GB_ = 0.0


class MemoryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The memory guard's lines, in GB of memory the system can still hand out."""

    warn_below_gb: GB_ = 2.0
    reject_below_gb: GB_ = 1.0
    shutdown_below_gb: GB_ = 0.5
    # A level is left only once available memory is this far above its line.
    hysteresis_gb: GB_ = 0.25
    # Seconds between memory samples.
    sample_interval: Seconds = 1.0
    # Whether the kernel's own pressure level (macOS sysctl, Linux PSI) counts.
    kernel_pressure: bool = True
    # The most the daemon itself may hold (resident, MLX included); 0: no budget.
    budget_gb: GB_ = 0.0
    # MLX's buffer cache of freed memory kept for reuse (mx.set_cache_limit).
    cache_limit_gb: GB_ = 1.0
    # Metal only: the share of the GPU's recommended working set MLX may
    # keep wired (resident); 0 leaves MLX's default of nothing wired.
    wired_limit_percent: Annotated[float, Meta(ge=0, le=100)] = 50.0

    def __post_init__(self) -> None:
        if not self.shutdown_below_gb <= self.reject_below_gb <= self.warn_below_gb:
            raise ValueError("expected shutdown_below_gb <= reject_below_gb <= warn_below_gb")


# systemd's memory limits: bytes with a unit, a percentage, or infinity.
CgroupLimit = Annotated[str, Meta(pattern=r"^(\d+(\.\d+)?[KMGT]?|\d+%|infinity)$")]


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    # systemd's cgroup limits for the Linux unit, e.g. "12G"; None: no limit.
    memory_high: CgroupLimit | None = None
    memory_max: CgroupLimit | None = None


# (lowest, highest, whether the lowest itself is allowed) for each sampling key.
SAMPLING_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "min_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 2.0, False),
}


def _ranged(name: str) -> Meta:
    low, high, low_allowed = SAMPLING_RANGES[name]
    return Meta(ge=low, le=high) if low_allowed else Meta(gt=low, le=high)


class ModelConfig(msgspec.Struct, frozen=True):
    name: str
    source: Annotated[str, Meta(min_length=1)]
    aliases: tuple[str, ...] = ()
    default: bool = False
    context_length: Annotated[int, Meta(ge=1)] | None = None
    # Seconds of idleness after which the model is unloaded; None: never.
    keep_alive: Seconds | None = None
    # Image blocks for a text-only model: "placeholder" shows a short note in
    # their place (a screenshot in Claude Code's history must not refuse every
    # later turn), "reject" refuses the request with a 400.
    images: Literal["placeholder", "reject"] = "placeholder"
    # The KV cache kept quantized to this many bits per key and value (8 or
    # 4), in groups of `kv_group_size`, for live sequences and prompt-cache
    # entries alike; None: full precision (engine/kv_quant.py).
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = KV_GROUP_SIZE
    # Speculative decoding of a lone sequence (engine/speculate.py): "ngram"
    # drafts from the reply's own context and grammar-forced tokens, up to
    # `speculate_tokens` per step; "grammar": forced tokens only; "off": one
    # token per step; "draft": drafts from the `draft` model (the default
    # when `draft` is set), grammar-forced tokens and long n-gram matches.
    speculate: Literal["ngram", "draft", "grammar", "off"] = "ngram"
    speculate_tokens: Annotated[int, Meta(ge=1, le=64)] = 8
    # A smaller model with the same tokenizer that drafts for this one: the
    # source of a configured model named here, or a source of its own. It
    # loads and unloads with this model, its weights counted in this one's.
    draft: str | None = None
    # Sampling for requests that leave it unset, over the model's own
    # recommendation (its generation_config.json); None: the recommendation,
    # else Pensieve's fallback (models/sampling.py).
    temperature: Annotated[float, _ranged("temperature")] | None = None
    top_p: Annotated[float, _ranged("top_p")] | None = None
    top_k: Annotated[int, _ranged("top_k")] | None = None
    min_p: Annotated[float, _ranged("min_p")] | None = None
    repetition_penalty: Annotated[float, _ranged("repetition_penalty")] | None = None
    # End a reply that repeats one passage over and over (a small model's
    # loop) as if the model had ended it; None: on for the embedded model.
    stop_loops: bool | None = None

    def __post_init__(self) -> None:
        if self.speculate == "draft" and not self.draft:
            raise ValueError('speculate: "draft" needs a draft model (draft = ...)')


class Config(msgspec.Struct, frozen=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    models: tuple[ModelConfig, ...] = (
        ModelConfig(DEFAULT_MODEL_NAME, BUILTIN_SOURCE, ("claude-*",), True),
    )
    paths: Paths = msgspec.field(default_factory=default_paths)

    @property
    def default_model(self) -> ModelConfig:
        return next((m for m in self.models if m.default), self.models[0])

    @property
    def base_url(self) -> str:
        host = loopback_for(self.server.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"


def loopback_for(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host`.

    A wildcard is reached through the loopback address of its family.
    """
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def load_config(path: Path | None = None, paths: Paths | None = None) -> Config:
    """Read the config at `path` (default: the per-user location).

    A missing file at the default location means "all defaults"; a missing
    file that was named explicitly is an error.
    """
    paths = paths or default_paths()
    explicit = path is not None
    path = Path(path) if path is not None else paths.config_file
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file not found: {path}")
        return Config(paths=paths)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    config = parse_config(data, paths)
    if config.server.auth_token:
        # The file holds the token now: it must be as private as the token file.
        _check_private(path, "config file")
    return config


def parse_config(data: dict[str, Any], paths: Paths) -> Config:
    """The config `data` (a parsed TOML file) describes, each section checked in file order."""
    server = _section(data, "server", ServerConfig)
    engine = _section(data, "engine", EngineConfig)
    memory = _section(data, "memory", MemoryConfig)
    service = _section(data, "service", ServiceConfig)
    models = [_model_config(name, table) for name, table in _table(data, "models").items()]
    if sum(m.default for m in models) > 1:
        raise ConfigError("models: more than one model has default = true")
    # A draft that names a configured model drafts with that model's weights.
    sources = {m.name: m.source for m in models}
    models = [replace(m, draft=sources[m.draft]) if m.draft in sources else m for m in models]
    config = Config(server=server, engine=engine, memory=memory, service=service, paths=paths)
    return replace(config, models=tuple(models)) if models else config


Section = TypeVar("Section", bound=msgspec.Struct)


def _section(data: dict[str, Any], key: str, kind: type[Section]) -> Section:
    table = _table(data, key)
    if key == "server" and table.get("auth_token") == "":
        table = {k: v for k, v in table.items() if k != "auth_token"}  # "" means unset
    return _convert(table, kind, key)


def _model_config(name: str, table: Any) -> ModelConfig:
    key = f"models.{name}"
    if not MODEL_NAME.fullmatch(name):
        # The name becomes a folder of the models directory, which an
        # import replaces: `..` or `/` in it would reach outside.
        raise ConfigError(
            f"models.{name!r}: a model name is letters, digits, '.', '_' and '-', "
            "not starting with '.'"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table")
    if not table.get("source"):
        raise ConfigError(f"{key}.source: required")
    table = {k: v for k, v in table.items() if not (k == "draft" and v == "")}
    if table.get("draft") and "speculate" not in table:
        table["speculate"] = "draft"  # a draft model drafts unless told otherwise
    return _convert({**table, "name": name}, ModelConfig, key)


# A sentence added to msgspec's message where leaving the key out is the answer.
_LEAVE_OUT = {
    "keep_alive": "leave it out to keep the model loaded",
    "kv_bits": "leave it out for full precision",
    "auth_token": "leave it out: a random one is made",
}


def _convert(table: dict[str, Any], kind: type[Section], key: str) -> Section:
    """`table` as a `kind`, or a ConfigError that names the key and says what was expected."""
    try:
        return msgspec.convert(table, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$.")
        field = where.rstrip("`").split("[")[0]
        if not field:  # a rule across keys (__post_init__): "key: why" or a sentence
            named = re.match(r"(\w+): ", message)
            raise ConfigError(f"{key}.{message}" if named else f"{key}: {message}") from None
        message = message.replace("`", "")
        message = message[0].lower() + message[1:]
        if message.startswith("invalid enum value"):
            choices = [str(c) for c in get_args(_field_type(kind, field)) if c is not None]
            got = message[len("invalid enum value ") :]
            message = f"expected one of {', '.join(choices)}, got {got}"
        hint = f" ({_LEAVE_OUT[field]})" if field in _LEAVE_OUT else ""
        raise ConfigError(f"{key}.{field}: {message}{hint}") from None


def _field_type(kind: type[msgspec.Struct], name: str) -> Any:
    """The Literal of field `name` of `kind`, through Optional."""
    hint = get_type_hints(kind)[name]
    literal = [a for a in get_args(hint) if get_args(a)] if get_origin(hint) is not Literal else []
    return literal[0] if literal else hint


def config_as_toml(config: Config) -> dict[str, Any]:
    """`config` as the TOML tables that would produce it (None values left out)."""

    def table(obj: msgspec.Struct, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in msgspec.structs.asdict(obj).items()
            if v is not None and k not in skip
        }

    return {
        "server": table(config.server),
        "engine": table(config.engine),
        "memory": table(config.memory),
        "service": table(config.service),
        "models": {m.name: table(m, skip=("name",)) for m in config.models},
    }


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table")
    return value


def _check_private(path: Path, what: str = "token file") -> None:
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} belongs to another user; refusing to use it")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{what} {path} has mode {oct(info.st_mode & 0o777)[2:]} and holds the token: "
            f"others could read it; run `chmod 600 {path}`"
        )


def with_overrides(
    config: Config, host: str | None = None, port: int | None = None, model: str | None = None
) -> Config:
    """Apply command-line flags, which win over the file."""
    server = replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
    )
    models = config.models
    if model is not None:
        default = config.default_model
        replaced = replace(default, source=model, default=True)
        models = tuple(replaced if m is default else m for m in models)
    return replace(config, server=server, models=models)


def stops_loops(model: ModelConfig) -> bool:
    """Whether `model`'s replies end where they loop: `stop_loops`, else the embedded model's."""
    if model.stop_loops is not None:
        return model.stop_loops
    return model.source in (BUILTIN_SOURCE, "builtin")


def draft_config(model: ModelConfig) -> ModelConfig | None:
    """The model that drafts for `model`'s speculative decoding, if it uses one."""
    if model.speculate != "draft" or not model.draft:
        return None
    return ModelConfig(f"{model.name}-draft", model.draft, speculate="off")


def ensure_token(config: Config) -> str:
    """The configured token, else the one stored in the token file (made on first use).

    The file is written 0600 inside a 0700 directory.
    """
    if config.server.auth_token:
        return config.server.auth_token
    token_file = config.paths.token_file
    if token_file.exists():
        _check_private(token_file)
        token = token_file.read_text().strip()
        if token:
            return token
    private_dir(token_file.parent)
    token = f"pensieve-{secrets.token_urlsafe(32)}"
    write_private(token_file, (token + "\n").encode())
    return token


# Shared with pensievectl: both find the same file the same way.
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Config file (default: $PENSIEVE_HOME/config.toml or the per-user location).",
)
