"""Vision models through mlx-vlm, in the same engine and batch as text models.

mlx-vlm loads the model (vision tower, projector, language model) and its
image processor; Pensieve keeps its own tokenizer, chat template, grammar,
stops and prompt cache, and mlx-lm's `BatchGenerator`, which takes token
ids only. So an image turns into KV cache before the request joins the
batch: on the engine thread, the prompt up to the end of its last image is
embedded (the vision tower's features at the image's pad tokens) and run
through the language model into a cache, and the request joins the batch
with that cache and the rest of its prompt, as a prompt-cache hit does.
Decoding then runs on mlx-lm's batch through `VisionDecoder`, which shares
the language model's weights.

Qwen2-VL's positions are three-dimensional (mRoPE): the tokens after an
image continue from the image's largest position, not from their index, so
each sequence's text positions are its index plus a `delta` (negative after
an image). The caches here carry that delta through everything the batch
does with them (merge, filter, extend, extract), and the prompt cache keeps
it with the entry.

Images are told apart by digest, not by tokens: two screenshots of one size
expand to the same run of pad tokens. `prompt_key` is the prompt with each
image's pad tokens replaced by ids derived from its digest (past the model's
vocabulary), so the prompt cache's trie branches at the first image that
differs and keeps the text before it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieved.conversation.images import DecodedImage, PreparedImage
from pensieved.conversation.plan import GenerationRequest

log = logging.getLogger(__name__)

# The families whose image tokens and positions this module knows.
SUPPORTED = ("qwen2_vl", "qwen2_5_vl")
# Say how to get mlx-vlm when a vision model is configured without it.
MLX_VLM = "mlx-vlm==0.7.10"
INSTALL = (
    f'install Pensieve\'s vision extra: `make setup` does, or `pip install -e ".[vision]"` '
    f'and `pip install --no-deps "{MLX_VLM}"`'
)


def is_vision_model(path: str | Path) -> bool:
    """Whether the model in `path` is a vision-language model (mlx-vlm's own test, roughly)."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    processor = any(
        (folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")
    )
    return processor and isinstance(config, dict) and "vision_config" in config


def _model_type(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return str(config.get("model_type", ""))


def _mlx_vlm(name: str, path: Path) -> Any:
    """mlx-vlm with the model family's module imported, or a sentence saying what to install."""
    kind = _model_type(path)
    if kind not in SUPPORTED:
        raise ValueError(
            f"model {name!r} is a {kind or 'vision'} model; Pensieve reads images with "
            f"{', '.join(SUPPORTED)} models so far (a text model of the family still works)"
        )
    try:
        import importlib

        import mlx_vlm

        # Importing the family registers its torch-free image processor with transformers.
        importlib.import_module(f"mlx_vlm.models.{kind}")
    except ImportError as exc:
        raise ValueError(
            f"model {name!r} is a vision model and mlx-vlm is missing ({exc}): {INSTALL}"
        ) from None
    return mlx_vlm


@dataclass(frozen=True)
class QwenImages:
    """Qwen2-VL's image processor: an image becomes its patches and a run of pad tokens.

    Runs on any thread (numpy only): the prompt is built off the engine thread.
    """

    processor: Any  # mlx-vlm's image processor for the model
    start: int  # <|vision_start|>
    pad: int  # <|image_pad|>
    end: int  # <|vision_end|>
    merge: int  # patches merged into one feature, per side

    def prepare(self, image: DecodedImage) -> PreparedImage:
        out = self.processor(images=[image.pixels], return_tensors="np")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        features = t * h * w // (self.merge * self.merge)
        tokens = (self.start, *([self.pad] * features), self.end)
        return PreparedImage(image.digest, tokens, out["pixel_values"], (t, h, w))


def image_preparer(name: str, path: Path) -> QwenImages:
    """The image processor of the vision model in `path` (no weights read; any thread)."""
    _mlx_vlm(name, path)
    from mlx_vlm.utils import load_processor

    processor = load_processor(path)
    config = json.loads((path / "config.json").read_text())
    images = processor.image_processor
    return QwenImages(
        images,
        int(config["vision_start_token_id"]),
        int(config["image_token_id"]),
        int(config["vision_end_token_id"]),
        int(getattr(images, "merge_size", 2)),
    )


def load_vision(name: str, path: Path) -> tuple[Any, Any]:
    """(the decoder mlx-lm's batch runs, the whole vision-language model) from `path`."""
    _mlx_vlm(name, path)
    from mlx_vlm.utils import load_model

    from pensieved.engine.vision_batch import VisionDecoder

    model = load_model(path)
    return VisionDecoder(model.language_model), model


def prompt_key(request: GenerationRequest, base: int) -> list[int]:
    """`request.prompt` with each image's pad tokens named by its digest, for the prompt cache.

    The ids start at `base` (the model's output width), past every real token.
    """
    key = list(request.prompt)
    for start, image in zip(request.image_starts, request.images, strict=True):
        seed = int(image.digest[:12], 16)
        for i in range(1, len(image.tokens) - 1):  # the pads; start and end stay
            key[start + i] = base + (seed + i * 2654435761) % (1 << 30)
    return key


def prefill_images(
    request: GenerationRequest,
    vlm: Any,
    decoder: Any,
    cache: list[Any] | None,
    cached: int,
    chunk: int = 256,
) -> tuple[list[Any], int, int]:
    """Run the prompt through its last image into `cache`.

    Returns the cache, the tokens it covers, and how many of them came from
    the prompt cache.

    `cache` holds the first `cached` tokens (a prompt-cache hit); it is cut
    back to the start of the first image it does not hold whole (the vision
    tower's features come in whole images). Engine thread only.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import trim_prompt_cache

    ends = [s + len(i.tokens) for s, i in zip(request.image_starts, request.images, strict=True)]
    last_end = max(ends)
    if cache is not None and cached >= last_end:
        return cache, cached, cached  # every image is in the cache, its delta with it
    first = next(i for i, end in enumerate(ends) if end > cached)
    start = min(cached, request.image_starts[first]) if cache is not None else 0
    if cache is not None and start < cached:
        trim_prompt_cache(cache, cached - start)
    if cache is None:
        cache = decoder.make_cache()
    ids = mx.array([request.prompt])
    grids = mx.array([image.grid for image in request.images])
    positions, deltas = vlm.language_model.get_rope_index(ids, grids, None, None)
    pieces = [mx.array(image.pixels) for image in request.images[first:]]
    tower = vlm.vision_tower
    pixels = mx.concatenate(pieces).astype(tower.patch_embed.proj.weight.dtype)
    features = tower(pixels, grids[first:], output_hidden_states=False)
    span = ids[:, start:last_end]
    embedded = vlm.language_model.model.embed_tokens(span)
    embedded = vlm.merge_input_ids_with_image_features(
        vlm.config.image_token_id, vlm.config.video_token_id, features, embedded, span
    )
    positions = positions[:, :, start:last_end]
    # In chunks, as text is prefilled: one chunk's activations at a time.
    for at in range(0, span.shape[1], chunk):
        part = slice(at, at + chunk)
        vlm.language_model.model(
            span[:, part],
            inputs_embeds=embedded[:, part],
            cache=cache,
            position_ids=positions[:, :, part],
        )
        mx.eval([layer.state for layer in cache])
    delta = int(deltas.reshape(-1)[0].item())
    for layer in cache:
        layer.delta = delta
    mx.eval([layer.state for layer in cache])
    return cache, last_end, start
