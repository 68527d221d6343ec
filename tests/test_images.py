"""Image blocks for a vision model: decoded within limits, scaled, named by digest, or refused."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pensieved.conversation.images import (
    MAX_EDGE,
    SCALED_LONG_EDGE,
    SCALED_PIXELS,
    decode_image,
    scaled_size,
)
from pensieved.wire.errors import InvalidRequest

WHERE = "messages.0.content.1"


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> str:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return base64.b64encode(out.getvalue()).decode()


def source(data: str, media_type: str = "image/png") -> dict[str, str]:
    return {"type": "base64", "media_type": media_type, "data": data}


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_each_format_decodes_to_rgb(fmt: str, media_type: str) -> None:
    image = decode_image(
        source(encoded(Image.new("RGB", (64, 48), (200, 30, 30)), fmt), media_type), WHERE
    )
    assert (image.width, image.height) == (64, 48)
    assert image.pixels.mode == "RGB" and image.pixels.size == (64, 48)


def test_the_digest_names_the_bytes() -> None:
    red = source(encoded(Image.new("RGB", (64, 48), (200, 30, 30))))
    blue = source(encoded(Image.new("RGB", (64, 48), (30, 30, 200))))
    assert decode_image(red, WHERE).digest == decode_image(dict(red), WHERE).digest
    assert decode_image(red, WHERE).digest != decode_image(blue, WHERE).digest


def test_a_large_photo_is_scaled_as_anthropic_scales_it() -> None:
    photo = source(encoded(Image.new("RGB", (6000, 4000), (10, 120, 40)), "JPEG"), "image/jpeg")
    image = decode_image(photo, WHERE)
    assert (image.sent_width, image.sent_height) == (6000, 4000)
    assert max(image.width, image.height) <= SCALED_LONG_EDGE
    assert image.width * image.height <= SCALED_PIXELS
    assert abs(image.width / image.height - 1.5) < 0.01  # the aspect kept
    # A screenshot within the caps is left as it is.
    assert scaled_size(1280, 800) == (1280, 800)
    assert scaled_size(1568, 700) == (1568, 700)


@pytest.mark.parametrize(
    ("block_source", "words"),
    [
        ({"type": "url", "url": "http://169.254.169.254/latest"}, "not fetched"),
        ({"type": "file", "file_id": "file_011"}, "Files API"),
        ({"type": "base64", "media_type": "image/tiff", "data": "AAAA"}, "media_type"),
        ({"type": "base64", "media_type": "image/png", "data": "not base64!"}, "not valid base64"),
        ({"type": "base64", "media_type": "image/png", "data": "aGVsbG8="}, "not a PNG"),
        ({"type": "base64", "media_type": "image/png", "data": 7}, "base64 string"),
        (None, "expected a base64 source"),
    ],
)
def test_sources_that_are_not_an_image_here_are_refused(block_source: object, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as refused:
        decode_image(block_source, WHERE)
    assert refused.value.message.startswith(f"{WHERE}.source")


def test_a_lying_media_type_is_refused() -> None:
    jpeg = encoded(Image.new("RGB", (8, 8)), "JPEG")
    with pytest.raises(InvalidRequest, match="is a JPEG image, but media_type says image/png"):
        decode_image(source(jpeg), WHERE)


def test_too_many_bytes_are_refused_before_decoding() -> None:
    with pytest.raises(InvalidRequest, match="over 5 MB"):
        decode_image(source("A" * (7 * 1024 * 1024)), WHERE)


def test_a_truncated_image_is_refused() -> None:
    whole = base64.b64decode(encoded(Image.effect_noise((256, 256), 64).convert("RGB")))
    cut = base64.b64encode(whole[: len(whole) // 2]).decode()
    with pytest.raises(InvalidRequest, match="truncated or corrupt"):
        decode_image(source(cut), WHERE)


def png_declaring(width: int, height: int) -> str:
    """A PNG of a few hundred bytes whose header declares `width` x `height` (a bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64, 9)  # far fewer rows than declared
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(("width", "height"), [(MAX_EDGE + 1, 10), (60_000, 60_000), (10, 100_000)])
def test_a_declared_canvas_past_the_limit_costs_a_header_read(width: int, height: int) -> None:
    with pytest.raises(InvalidRequest, match="pixels"):
        decode_image(source(png_declaring(width, height)), WHERE)


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_image(source(base64.b64encode(out.getvalue()).decode(), "image/gif"), WHERE)
    assert image.pixels.getpixel((8, 8))[0] > 200  # red, the first frame


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=2048),
    media_type=st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp"]),
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]
    ),
)
def test_any_bytes_decode_or_are_refused_with_a_sentence(
    data: bytes, media_type: str, prefix: bytes
) -> None:
    try:
        image = decode_image(source(base64.b64encode(prefix + data).decode(), media_type), WHERE)
    except InvalidRequest as refused:
        assert refused.message.startswith(f"{WHERE}.source")
    else:
        assert image.pixels.mode == "RGB" and image.width * image.height <= SCALED_PIXELS
