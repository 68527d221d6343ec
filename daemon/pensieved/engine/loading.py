"""Loading a model on the engine thread: weights, CPU-backend choices, room within the budget.

Every function here runs on the engine thread (it owns all MLX work); the
engine decides when to call them and keeps what they return.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pensieved.config import EngineConfig, ModelConfig, draft_config
from pensieved.conversation.constraints import GrammarCompiler
from pensieved.conversation.prompt import PromptBuilder
from pensieved.engine import cpu, vision
from pensieved.engine.mlx_internals import disown_wired_limit
from pensieved.models.facts import context_window
from pensieved.models.residency import Resident, expected_weight_bytes, plan_room
from pensieved.models.sampling import SamplingDefaults, defaults_for, recommended
from pensieved.paths import GB

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Any
    tokenizer: Any
    context_length: int
    builder: PromptBuilder
    vocab_size: int  # the tokenizer's
    logits_size: int  # the model's output width, which may be padded past it
    dequantized: bool = False
    weight_bytes: int = 0  # the draft model's included
    draft_model: Any = None  # the model that drafts for speculative decoding, if any
    path: str = ""  # where its weights were read from (a folder, or a repo id)
    # Sampling for what a request leaves unset (models/sampling.py).
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # A vision model's whole mlx-vlm model (vision tower and all); `model` is
    # then its language model as mlx-lm's batch runs it (engine/vision.py).
    vision: Any = None
    grammars: GrammarCompiler = field(init=False)

    def __post_init__(self) -> None:
        self.grammars = GrammarCompiler(self.tokenizer, self.logits_size)

    @property
    def name(self) -> str:
        return self.config.name


def load_weights(
    config: ModelConfig,
    path: str | Path,
    settings: EngineConfig,
    draft_path: str | Path | None = None,
) -> LoadedModel:
    """Load `config`'s weights from `path` (dequantized where the CPU backend gains from it).

    `draft_path`: where `config`'s draft model lies, if it has one (by default its
    source as given: a directory or a Hugging Face repo id).
    """
    started = time.perf_counter()
    model, tokenizer, dequantized, weight_bytes, vlm = _read_weights(config, path, settings)
    draft_model = None
    draft = draft_config(config)
    if draft is not None:
        draft_path = draft.source if draft_path is None else draft_path
        draft_model, draft_tokenizer, _, draft_bytes, _ = _read_weights(draft, draft_path, settings)
        _check_draft(config, tokenizer, draft_model, draft_tokenizer)
        weight_bytes += draft_bytes
    context = config.context_length or context_length(model, tokenizer)
    log.info(
        "loaded model %s from %s in %.1fs (context %d tokens)%s",
        config.name,
        path,
        time.perf_counter() - started,
        context,
        f", drafting with {draft_path}" if draft_model is not None else "",
    )
    preparer = None if vlm is None else vision.image_preparer(config.name, Path(path))
    return LoadedModel(
        config,
        model,
        tokenizer,
        context,
        PromptBuilder(tokenizer, config.name, config.images, preparer),
        len(tokenizer),
        int(getattr(getattr(model, "args", None), "vocab_size", 0) or len(tokenizer)),
        dequantized,
        weight_bytes,
        draft_model,
        str(path),
        defaults_for(config, recommended(model_directory(path))),
        vlm,
    )


def sampling_defaults(config: ModelConfig, models_dir: Path) -> SamplingDefaults:
    """What `config`'s model samples with where a request is silent, without loading it."""
    from pensieved.models.registry import hub_repo, local_model_dir

    folder = local_model_dir(config, models_dir)
    if folder is None:
        try:  # a repo id: its snapshot, if downloaded
            folder = model_directory(hub_repo(config.source))
        except FileNotFoundError:
            folder = None  # a local folder that is missing: loading it says so
    return defaults_for(config, recommended(folder))


def model_directory(path: str | Path) -> Path | None:
    """The local directory of a model `mlx_lm.load` has read from `path` (a repo id's snapshot)."""
    if Path(path).is_dir():
        return Path(path)
    from mlx_lm.utils import hf_repo_to_path

    try:
        return Path(hf_repo_to_path(str(path)))  # type: ignore[no-untyped-call]
    except Exception:  # not in the cache in a shape huggingface_hub recognises
        return None


def _read_weights(
    config: ModelConfig, path: str | Path, settings: EngineConfig
) -> tuple[Any, Any, bool, int, Any]:
    """(model, tokenizer, dequantized, weight bytes, the vision model if it is one) from `path`."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_tokenizer

    vlm = None
    if vision.is_vision_model(path):
        if config.kv_bits is not None:
            raise ValueError(
                f"model {config.name!r} is a vision model, whose KV cache stays at full "
                "precision for now: leave out kv_bits"
            )
        model, vlm = vision.load_vision(config.name, Path(path))
        tokenizer = load_tokenizer(Path(path))  # type: ignore[no-untyped-call]
    else:
        model, tokenizer = mlx_lm.load(str(path))[:2]
    dequantized = cpu.should_dequantize(settings.dequantize, vlm or model)
    if dequantized:
        cpu.dequantize(vlm or model)
        log.info("dequantized %s to float32 (faster on the CPU backend)", config.name)
    parameters = cast(list[tuple[str, Any]], tree_flatten((vlm or model).parameters()))
    return model, tokenizer, dequantized, sum(int(v.nbytes) for _, v in parameters), vlm


def _check_draft(config: ModelConfig, tokenizer: Any, draft: Any, draft_tokenizer: Any) -> None:
    """Refuse a draft model whose token ids mean other text, or whose cache cannot rewind."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    ours, theirs = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if ours != theirs:
        differing = sum(1 for text, i in theirs.items() if ours.get(text) != i)
        raise ValueError(
            f"model {config.name!r}: its draft model {config.draft!r} has another "
            f"vocabulary ({len(theirs)} tokens, {differing} unlike the model's "
            f"{len(ours)}); a draft model must use the same tokenizer"
        )
    if not can_trim_prompt_cache(make_prompt_cache(draft)):
        raise ValueError(
            f"model {config.name!r}: its draft model {config.draft!r} keeps a KV cache "
            "that cannot be rewound (a sliding window), so it cannot draft"
        )


def models_to_evict(
    config: ModelConfig,
    path: Path,
    settings: EngineConfig,
    resident: list[Resident],
    memory_floor_bytes: int,
    available_memory: Callable[[], int] | None = None,
    draft_path: Path | None = None,
) -> list[str]:
    """The resident models to unload, least recently used first, so that `config` fits.

    `draft_path`: its draft model's weights, which count as part of it.

    Raises `Overloaded` when even unloading every idle model would not make room.
    """
    import psutil

    dequantizes = cpu.dequantizes(settings.dequantize, expected_weight_bytes(path, True))
    need = expected_weight_bytes(path, dequantizes)
    if draft_path is not None:
        need += expected_weight_bytes(draft_path, dequantizes)
    budget = gb(settings.models_budget_gb) or None
    available = None
    if memory_floor_bytes:
        # The memory guard's reading where it is wired in (on macOS, the
        # kernel's own count, not psutil's free + inactive).
        available = available_memory() if available_memory else psutil.virtual_memory().available
    return plan_room(config.name, need, resident, budget, available, memory_floor_bytes)


def free_memory() -> None:
    """Give freed arrays back: Python's cycles first, then MLX's buffer cache."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def new_generator(loaded: LoadedModel, settings: EngineConfig) -> Any:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        loaded.model,
        stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
        prefill_step_size=settings.prefill_chunk,
        # Past these, requests wait in the generator's own queue.
        completion_batch_size=settings.max_sequences,
        prefill_batch_size=min(settings.max_sequences, 8),
    )
    # mlx-lm's constructor wires 100% of Metal's recommended working set and
    # puts its saved value back when the generator is closed or collected.
    # The limit is the memory guard's (`[memory] wired_limit_percent`, set
    # before any model loads): put back the one in force before, and keep
    # this generator from restoring an older one later.
    previous = disown_wired_limit(generator)
    if previous is not None:
        mx.synchronize()  # MLX: never change the wired limit during an async eval
        mx.set_wired_limit(previous)
    return generator


@dataclass(frozen=True)
class ModelFrontEnd:
    """What a request can be checked with before its model's weights load."""

    builder: PromptBuilder
    context_length: int


def load_front_end(config: ModelConfig, path: Path) -> ModelFrontEnd:
    """The tokenizer and context of the model in `path`, without its weights (any thread)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(path)  # type: ignore[no-untyped-call]
    try:
        declared = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        declared = None
    context = config.context_length or context_window(declared, tokenizer_limit(tokenizer))
    preparer = vision.image_preparer(config.name, path) if vision.is_vision_model(path) else None
    return ModelFrontEnd(PromptBuilder(tokenizer, config.name, config.images, preparer), context)


def context_length(model: Any, tokenizer: Any) -> int:
    args = getattr(model, "args", None)
    declared = getattr(args, "max_position_embeddings", None)
    return context_window(declared, tokenizer_limit(tokenizer))


def tokenizer_limit(tokenizer: Any) -> Any:
    """The longest input the tokenizer's config names (`model_max_length`), if any."""
    return getattr(tokenizer, "model_max_length", None)


def persisted_cache_path(models_dir: Path, config: ModelConfig) -> Path:
    """Where `config`'s prompt cache is saved at shutdown (when persistence is on)."""
    return models_dir / ".prompt-cache" / f"{config.name}.safetensors"


def identity(loaded: LoadedModel) -> dict[str, str]:
    """What a saved KV cache must match to be loaded into a model.

    The folder's files, not only its path: a repo downloaded again with new
    weights of the same size, or a changed chat template, is another model.
    """
    return {
        "model_path": loaded.path,
        "weight_bytes": str(loaded.weight_bytes),
        "dequantized": str(loaded.dequantized),
        "files": model_fingerprint(loaded.path),
    }


# What a model's files say about it: read whole (they are small) or by size and time.
_FINGERPRINT_READ = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def model_fingerprint(path: str | Path) -> str:
    """A hash of a model folder: its config and tokenizer, and each weight file's size and time.

    A Hugging Face snapshot's real path names its commit, so that is in it too.
    """
    folder = model_directory(path)
    digest = hashlib.sha256()
    if folder is None:
        digest.update(str(path).encode())
        return digest.hexdigest()
    real = folder.resolve()
    digest.update(str(real).encode())
    for name in _FINGERPRINT_READ:
        file = real / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    for weights in sorted(real.glob("*.safetensors*")) + sorted(real.glob("*.json")):
        info = weights.stat()
        digest.update(f"{weights.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return digest.hexdigest()


def gb(value: float) -> int:
    return int(value * GB)
