"""The one TOML config file: defaults, parsing, validation, and the auth token.

Read with `tomllib`; `pensievectl` writes it with `tomli-w`. The documented
defaults live in `config/config.toml` at the repository root.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pensieved.paths import Paths, default_paths, private_dir

BUILTIN_SOURCE = "builtin:smollm2-135m-instruct"
# A configured token shorter than this is refused (the generated one has 52).
MIN_TOKEN_CHARS = 32
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """The config file cannot be used; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7777
    auth_token: str | None = None
    # Seconds between SSE `ping` events while a stream waits (long prefill).
    ping_interval: float = 5.0
    # A stream's text goes out at most this often (milliseconds); the tokens
    # made meanwhile travel as one delta. 0 sends each token at once.
    text_interval_ms: float = 15.0
    # Listening on a non-loopback address must be asked for explicitly.
    allow_remote: bool = False
    # Seconds a client may take to send its request headers (slow-loris guard).
    header_timeout: float = 10.0
    # Seconds a client may take to send a whole request body (then 408): a
    # body dripped byte by byte would hold its connection for good.
    body_timeout: float = 60.0
    # Requests served at once; more wait in the kernel's accept queue.
    max_connections: int = 64
    # On SIGTERM/SIGINT or `pensievectl stop`: seconds in-flight requests get
    # to finish before the rest end with an `error` event. Well below the 30 s
    # launchd (ExitTimeOut) and systemd (TimeoutStopSec) wait before SIGKILL.
    drain_seconds: float = 10.0


DEQUANTIZE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class EngineConfig:
    # Quantized models on MLX's CPU backend: "auto" dequantizes to float32
    # when OpenBLAS is active (much faster there), "always", or "never".
    dequantize: str = "auto"
    # KV caches of earlier requests kept for reuse by prompt prefix, in GB
    # (0 turns the prefix cache off). Counted on top of the models' weights.
    prompt_cache_gb: float = 2.0
    # Sequences decoded together in one batch; more requests wait their turn.
    max_sequences: int = 8
    # Requests that may wait for a place in the batch; beyond that, 529.
    max_queue: int = 32
    # Prompt tokens prefilled per step: a long prompt's prefill pauses the
    # other streams' decoding for at most one chunk at a time.
    prefill_chunk: int = 256
    # Save each model's most recent prefix-cache entry when the daemon stops
    # and load it back at start, so the first turn after a restart is warm.
    persist_prompt_cache: bool = False
    # The most all loaded models' weights may take, in GB; loading another
    # unloads the least recently used idle ones first. 0: no budget (the
    # memory guard's reject line still applies).
    models_budget_gb: float = 0.0


@dataclass(frozen=True)
class MemoryConfig:
    """The memory guard's lines, in GB of memory the system can still hand out."""

    warn_below_gb: float = 2.0
    reject_below_gb: float = 1.0
    shutdown_below_gb: float = 0.5
    # A level is left only once available memory is this far above its line.
    hysteresis_gb: float = 0.25
    # Seconds between memory samples.
    sample_interval: float = 1.0
    # Whether the kernel's own pressure level (macOS sysctl, Linux PSI) counts.
    kernel_pressure: bool = True
    # The most the daemon itself may hold (resident, MLX included); 0: no budget.
    budget_gb: float = 0.0
    # MLX's buffer cache of freed memory kept for reuse (mx.set_cache_limit).
    cache_limit_gb: float = 1.0
    # Metal only: the share of the GPU's recommended working set MLX may
    # keep wired (resident); 0 leaves MLX's default of nothing wired.
    wired_limit_percent: float = 50.0


@dataclass(frozen=True)
class ServiceConfig:
    # systemd's cgroup limits for the Linux unit, e.g. "12G"; None: no limit.
    memory_high: str | None = None
    memory_max: str | None = None


IMAGE_MODES = ("placeholder", "reject")
SPECULATE_MODES = ("ngram", "draft", "grammar", "off")
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str
    aliases: tuple[str, ...] = ()
    default: bool = False
    context_length: int | None = None
    # Seconds of idleness after which the model is unloaded; None: never.
    keep_alive: float | None = None
    # Image blocks for a text-only model: "placeholder" shows a short note in
    # their place (a screenshot in Claude Code's history must not refuse every
    # later turn), "reject" refuses the request with a 400.
    images: str = "placeholder"
    # The KV cache kept quantized to this many bits per key and value (8 or
    # 4), in groups of `kv_group_size`, for live sequences and prefix-cache
    # entries alike; None: full precision (engine/kv_quant.py).
    kv_bits: int | None = None
    kv_group_size: int = 64
    # Speculative decoding of a lone sequence (engine/speculate.py): "ngram"
    # drafts from the reply's own context and grammar-forced tokens, up to
    # `speculate_tokens` per step; "grammar": forced tokens only; "off": one
    # token per step; "draft": drafts from the `draft` model (the default
    # when `draft` is set), grammar-forced tokens and long n-gram matches.
    speculate: str = "ngram"
    speculate_tokens: int = 8
    # A smaller model with the same tokenizer that drafts for this one: the
    # source of a configured model named here, or a source of its own. It
    # loads and unloads with this model, its weights counted in this one's.
    draft: str | None = None
    # Sampling for requests that leave it unset, over the model's own
    # recommendation (its generation_config.json); None: the recommendation,
    # else Pensieve's fallback (models/sampling.py).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # End a reply that repeats one passage over and over (a small model's
    # loop) as if the model had ended it; None: on for the embedded model.
    stop_loops: bool | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    models: tuple[ModelConfig, ...] = (
        ModelConfig(DEFAULT_MODEL_NAME, BUILTIN_SOURCE, ("claude-*",), True),
    )
    paths: Paths = field(default_factory=default_paths)

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
    server = _server_config(_table(data, "server"))
    engine = _engine_config(_table(data, "engine"))
    memory = _memory_config(_table(data, "memory"))
    service = _service_config(_table(data, "service"))
    models = [_model_config(name, table) for name, table in _table(data, "models").items()]
    if sum(m.default for m in models) > 1:
        raise ConfigError("models: more than one model has default = true")
    # A draft that names a configured model drafts with that model's weights.
    sources = {m.name: m.source for m in models}
    models = [
        dataclasses.replace(m, draft=sources[m.draft]) if m.draft in sources else m for m in models
    ]
    config = Config(server=server, engine=engine, memory=memory, service=service, paths=paths)
    return dataclasses.replace(config, models=tuple(models)) if models else config


def _server_config(server_table: dict[str, Any]) -> ServerConfig:
    server = ServerConfig(
        host=_get(server_table, "server.host", str, ServerConfig.host),
        port=_get(server_table, "server.port", int, ServerConfig.port),
        auth_token=_get(server_table, "server.auth_token", str, None) or None,
        ping_interval=float(
            _get(server_table, "server.ping_interval", (int, float), ServerConfig.ping_interval)
        ),
        text_interval_ms=float(
            _get(
                server_table,
                "server.text_interval_ms",
                (int, float),
                ServerConfig.text_interval_ms,
            )
        ),
        allow_remote=_get(server_table, "server.allow_remote", bool, False),
        header_timeout=float(
            _get(server_table, "server.header_timeout", (int, float), ServerConfig.header_timeout)
        ),
        body_timeout=float(
            _get(server_table, "server.body_timeout", (int, float), ServerConfig.body_timeout)
        ),
        max_connections=_get(
            server_table, "server.max_connections", int, ServerConfig.max_connections
        ),
        drain_seconds=float(
            _get(server_table, "server.drain_seconds", (int, float), ServerConfig.drain_seconds)
        ),
    )
    if server.header_timeout <= 0:
        raise ConfigError("server.header_timeout: must be > 0")
    if server.body_timeout <= 0:
        raise ConfigError("server.body_timeout: must be > 0")
    if server.max_connections < 1:
        raise ConfigError("server.max_connections: must be >= 1")
    if not 0 < server.port < 65536:
        raise ConfigError(f"server.port: {server.port} is not a TCP port")
    if server.ping_interval <= 0:
        raise ConfigError("server.ping_interval: must be > 0")
    if not 0 <= server.text_interval_ms <= 1000:
        raise ConfigError("server.text_interval_ms: must be between 0 and 1000")
    if server.drain_seconds < 0:
        raise ConfigError("server.drain_seconds: must be >= 0")
    if server.auth_token is not None and len(server.auth_token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"server.auth_token: {len(server.auth_token)} characters is guessable; use at "
            f"least {MIN_TOKEN_CHARS} (or leave it out: a random one is made and stored 0600)"
        )
    return server


def _engine_config(engine_table: dict[str, Any]) -> EngineConfig:
    engine = EngineConfig(
        dequantize=_get(engine_table, "engine.dequantize", str, EngineConfig.dequantize),
        prompt_cache_gb=float(
            _get(
                engine_table,
                "engine.prompt_cache_gb",
                (int, float),
                EngineConfig.prompt_cache_gb,
            )
        ),
        max_sequences=_get(engine_table, "engine.max_sequences", int, EngineConfig.max_sequences),
        max_queue=_get(engine_table, "engine.max_queue", int, EngineConfig.max_queue),
        prefill_chunk=_get(engine_table, "engine.prefill_chunk", int, EngineConfig.prefill_chunk),
        persist_prompt_cache=_get(
            engine_table, "engine.persist_prompt_cache", bool, EngineConfig.persist_prompt_cache
        ),
        models_budget_gb=float(
            _get(
                engine_table,
                "engine.models_budget_gb",
                (int, float),
                EngineConfig.models_budget_gb,
            )
        ),
    )
    if engine.dequantize not in DEQUANTIZE_MODES:
        raise ConfigError(f"engine.dequantize: expected one of {', '.join(DEQUANTIZE_MODES)}")
    for key in ("prompt_cache_gb", "models_budget_gb"):
        if getattr(engine, key) < 0:
            raise ConfigError(f"engine.{key}: must be >= 0")
    for key in ("max_sequences", "prefill_chunk"):
        if getattr(engine, key) < 1:
            raise ConfigError(f"engine.{key}: must be >= 1")
    if engine.max_queue < 0:
        raise ConfigError("engine.max_queue: must be >= 0")
    return engine


def _service_config(service_table: dict[str, Any]) -> ServiceConfig:
    service = ServiceConfig(
        memory_high=_get(service_table, "service.memory_high", str, None),
        memory_max=_get(service_table, "service.memory_max", str, None),
    )
    for key in ("memory_high", "memory_max"):
        value = getattr(service, key)
        if value is not None and not re.fullmatch(r"\d+(\.\d+)?[KMGT]?|\d+%|infinity", value):
            raise ConfigError(f"service.{key}: expected bytes like 12G, a percentage or infinity")
    return service


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
    source = _get(table, f"{key}.source", str, None)
    if not source:
        raise ConfigError(f"{key}.source: required")
    aliases = _get(table, f"{key}.aliases", list, [])
    if not all(isinstance(a, str) for a in aliases):
        raise ConfigError(f"{key}.aliases: expected a list of strings")
    context = _get(table, f"{key}.context_length", int, None)
    if context is not None and context < 1:
        raise ConfigError(f"{key}.context_length: must be >= 1")
    keep_alive = _get(table, f"{key}.keep_alive", (int, float), None)
    if keep_alive is not None and keep_alive <= 0:
        raise ConfigError(f"{key}.keep_alive: must be > 0 seconds (leave it out for forever)")
    images = _get(table, f"{key}.images", str, ModelConfig.images)
    if images not in IMAGE_MODES:
        raise ConfigError(f"{key}.images: expected one of {', '.join(IMAGE_MODES)}")
    kv_bits = _get(table, f"{key}.kv_bits", int, None)
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ConfigError(f"{key}.kv_bits: expected 8 or 4 (leave it out for full precision)")
    kv_group_size = _get(table, f"{key}.kv_group_size", int, ModelConfig.kv_group_size)
    if kv_group_size not in KV_GROUP_SIZES:
        raise ConfigError(f"{key}.kv_group_size: expected one of 32, 64, 128")
    draft = _get(table, f"{key}.draft", str, None) or None
    speculate = _get(table, f"{key}.speculate", str, "draft" if draft else ModelConfig.speculate)
    if speculate not in SPECULATE_MODES:
        raise ConfigError(f"{key}.speculate: expected one of {', '.join(SPECULATE_MODES)}")
    if speculate == "draft" and not draft:
        raise ConfigError(f'{key}.speculate: "draft" needs a draft model ({key}.draft)')
    speculate_tokens = _get(table, f"{key}.speculate_tokens", int, ModelConfig.speculate_tokens)
    if not 1 <= speculate_tokens <= 64:
        raise ConfigError(f"{key}.speculate_tokens: must be between 1 and 64")
    sampling = _sampling_settings(table, key)
    stop_loops = _get(table, f"{key}.stop_loops", bool, None)
    return ModelConfig(
        name=name,
        source=source,
        aliases=tuple(aliases),
        default=_get(table, f"{key}.default", bool, False),
        context_length=context,
        keep_alive=None if keep_alive is None else float(keep_alive),
        images=images,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        speculate=speculate,
        speculate_tokens=speculate_tokens,
        draft=draft,
        stop_loops=stop_loops,
        **sampling,
    )


# (lowest, highest, whether the lowest itself is allowed) for each sampling key.
SAMPLING_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "min_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 2.0, False),
}


def _sampling_settings(table: dict[str, Any], key: str) -> dict[str, Any]:
    """A model table's sampling defaults, each checked against its range."""
    settings: dict[str, Any] = {}
    for name, (low, high, low_allowed) in SAMPLING_RANGES.items():
        kind: Any = int if name == "top_k" else (int, float)
        value = _get(table, f"{key}.{name}", kind, None)
        if value is None:
            continue
        if not (low <= value <= high) or (value == low and not low_allowed):
            bound = ">=" if low_allowed else ">"
            raise ConfigError(f"{key}.{name}: must be {bound} {low:g} and <= {high:g}")
        settings[name] = value if name == "top_k" else float(value)
    return settings


def _memory_config(table: dict[str, Any]) -> MemoryConfig:
    numbers = {
        f.name: float(_get(table, f"memory.{f.name}", (int, float), f.default))
        for f in dataclasses.fields(MemoryConfig)
        if f.type == "float"
    }
    memory = MemoryConfig(
        **numbers,
        kernel_pressure=_get(table, "memory.kernel_pressure", bool, MemoryConfig.kernel_pressure),
    )
    for key, value in numbers.items():
        if value < 0:
            raise ConfigError(f"memory.{key}: must be >= 0")
    if not memory.shutdown_below_gb <= memory.reject_below_gb <= memory.warn_below_gb:
        raise ConfigError("memory: expected shutdown_below_gb <= reject_below_gb <= warn_below_gb")
    if memory.sample_interval <= 0:
        raise ConfigError("memory.sample_interval: must be > 0")
    if memory.wired_limit_percent > 100:
        raise ConfigError("memory.wired_limit_percent: must be at most 100")
    return memory


def config_as_toml(config: Config) -> dict[str, Any]:
    """`config` as the TOML tables that would produce it (None values left out)."""

    def table(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(obj).items()
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


def _get(table: dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = table.get(key.rsplit(".", 1)[-1], default)
    if value is default:
        return value
    # bool is an int in Python; a port of `true` is still a mistake.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
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


def write_private(path: Path, data: bytes) -> None:
    """Write `path` 0600 through a temporary file renamed over it (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # a leftover partial file keeps its old mode
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def with_overrides(
    config: Config, host: str | None = None, port: int | None = None, model: str | None = None
) -> Config:
    """Apply command-line flags, which win over the file."""
    server = dataclasses.replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
    )
    models = config.models
    if model is not None:
        default = config.default_model
        replaced = dataclasses.replace(default, source=model, default=True)
        models = tuple(replaced if m is default else m for m in models)
    return dataclasses.replace(config, server=server, models=models)


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
