"""Image blocks made safe for a vision model: decoded within limits, scaled, and named by digest.

Only bytes the client sent are read: a `url` source is never fetched and a
`file` source never opened (a server that fetched would let any client reach
the machine's network and files; mlx-vlm's own loader fetches URLs and opens
paths, so it is only ever given a decoded image). Every limit is checked
before the pixels are decoded: the base64 text's length, then the size the
image's header declares, so a small file that declares a huge canvas (a
decompression bomb) costs a header read. A truncated, lying or unsupported
image is the client's mistake: an `InvalidRequest` naming the block, never a
5xx. Large images are scaled down the way Anthropic documents for its own
API (a long edge of at most 1568 pixels and about 1.15 megapixels), so a
6000x8000 photo costs what a screenshot does.

Pillow is imported when an image is decoded: a daemon serving text models
never loads it (it comes with the `vision` extra).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from pensieved.wire.errors import InvalidRequest

# The formats Anthropic's API takes, as media type -> Pillow's format name.
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
# Anthropic's limits: 5 MB an image (as sent, base64-decoded) and 8000 pixels an edge.
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_EDGE = 8000
# What a model is shown at most (Anthropic scales down to these before its models see one).
SCALED_LONG_EDGE = 1568
SCALED_PIXELS = 1_150_000
# Prepared images kept by digest (prompts render on worker threads): a
# full-size image's patches take about 6 MB.
PREPARED_CACHE_ENTRIES = 64
PREPARED_CACHE_BYTES = 256 * 1024**2
_prepared: OrderedDict[tuple[ImagePreparer, str], PreparedImage] = OrderedDict()
_prepared_bytes = 0
_prepared_lock = threading.Lock()


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for a vision model's processor: RGB pixels, and what names them."""

    # sha256 of the bytes as sent: the same screenshot resent each turn has one digest.
    digest: str
    pixels: Any  # PIL.Image.Image, RGB
    width: int
    height: int
    # The size the client sent, before scaling (for the log and the doctor).
    sent_width: int
    sent_height: int


def decode_image(source: Any, where: str) -> DecodedImage:
    """The image a block's `source` carries, checked and scaled; `where` names the block."""
    data, media_type = _base64_source(source, where)
    return _decoded(data, media_type, where)


def prepare_image(source: Any, where: str, preparer: ImagePreparer) -> PreparedImage:
    """`source`'s image as `preparer`'s model takes it, from the cache when it was seen before.

    Claude Code resends every image of a conversation on every turn: each is
    decoded and processed once, then found by its digest.
    """
    data, media_type = _base64_source(source, where)
    key = (preparer, hashlib.sha256(data).hexdigest())
    with _prepared_lock:
        found = _prepared.get(key)
        if found is not None:
            _prepared.move_to_end(key)
            return found
    prepared = preparer.prepare(_decoded(data, media_type, where))
    _keep(key, prepared)
    return prepared


def _keep(key: tuple[ImagePreparer, str], prepared: PreparedImage) -> None:
    global _prepared_bytes
    size = int(getattr(prepared.pixels, "nbytes", 0))
    with _prepared_lock:
        if key in _prepared or size > PREPARED_CACHE_BYTES:
            return
        _prepared[key] = prepared
        _prepared_bytes += size
        while len(_prepared) > PREPARED_CACHE_ENTRIES or _prepared_bytes > PREPARED_CACHE_BYTES:
            _, dropped = _prepared.popitem(last=False)
            _prepared_bytes -= int(getattr(dropped.pixels, "nbytes", 0))


def _decoded(data: bytes, media_type: str, where: str) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=list(MEDIA_TYPES.values()))
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}.source: the image declares too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidRequest(
            f"{where}.source: the data is not a PNG, JPEG, GIF or WebP image"
        ) from None
    if MEDIA_TYPES[media_type] != image.format:
        raise InvalidRequest(
            f"{where}.source: the data is a {image.format} image, but media_type says {media_type}"
        )
    width, height = image.size
    if not (0 < width <= MAX_EDGE and 0 < height <= MAX_EDGE):
        raise InvalidRequest(
            f"{where}.source: the image is {width}x{height} pixels; at most "
            f"{MAX_EDGE}x{MAX_EDGE} are accepted"
        )
    scaled = scaled_size(width, height)
    try:
        if image.format == "JPEG":
            image.draft("RGB", scaled)  # decode at a fraction of the size where JPEG allows
        image.seek(0)  # an animation's first frame
        pixels = image.convert("RGB")
        if pixels.size != scaled:
            pixels = pixels.resize(scaled, Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError, EOFError):
        raise InvalidRequest(f"{where}.source: the image data is truncated or corrupt") from None
    return DecodedImage(
        hashlib.sha256(data).hexdigest(), pixels, scaled[0], scaled[1], width, height
    )


def scaled_size(width: int, height: int) -> tuple[int, int]:
    """`width` x `height` scaled down, keeping its aspect, within the long edge and pixel caps."""
    factor = min(
        1.0, SCALED_LONG_EDGE / max(width, height), (SCALED_PIXELS / (width * height)) ** 0.5
    )
    return max(1, int(width * factor)), max(1, int(height * factor))


def _base64_source(source: Any, where: str) -> tuple[bytes, str]:
    """The bytes and media type of a base64 source; any other kind is refused with why."""
    if isinstance(source, msgspec.Raw):  # as the request decoder keeps it (wire/protocol.py)
        try:
            source = msgspec.json.decode(source)
        except msgspec.DecodeError:
            source = None
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url":
        raise InvalidRequest(
            f"{where}.source: image URLs are not fetched by this server (it would reach the "
            "network on a client's behalf); send the image as base64"
        )
    if kind == "file":
        raise InvalidRequest(
            f"{where}.source: file ids name files of Anthropic's Files API, which this server "
            "does not hold; send the image as base64"
        )
    if kind != "base64":
        raise InvalidRequest(f"{where}.source: expected a base64 source")
    media_type, text = source.get("media_type"), source.get("data")
    if media_type not in MEDIA_TYPES:
        raise InvalidRequest(f"{where}.source.media_type: expected one of {', '.join(MEDIA_TYPES)}")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.source.data: expected a base64 string")
    # Checked before decoding: base64 takes 4 characters for each 3 bytes.
    if len(text) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise InvalidRequest(
            f"{where}.source.data: the image is over {MAX_IMAGE_BYTES // (1024 * 1024)} MB"
        )
    try:
        return base64.b64decode(text, validate=True), media_type
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.source.data: not valid base64") from None


@dataclass(frozen=True)
class PreparedImage:
    """An image as its model takes it: the run of tokens that stands for it, and its pixels."""

    digest: str
    # The run in the prompt: the model's image start token, one pad token per
    # vision feature, its end token (Qwen2-VL: <|vision_start|>, <|image_pad|>
    # x N, <|vision_end|>).
    tokens: tuple[int, ...]
    # The vision tower's input (a numpy array: no MLX array leaves the engine thread).
    pixels: Any
    # (time, height, width) in patches: where the vision features sit (mRoPE).
    grid: tuple[int, int, int]


class ImagePreparer(Protocol):
    """A vision model's processor: a decoded image in, the tokens and pixels it becomes out."""

    def prepare(self, image: DecodedImage) -> PreparedImage: ...
