"""Vision models: images reach the model, and the prompt cache tells images apart."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from PIL import Image

from tests.daemon import Daemon, running_daemon

GREEDY = {"temperature": 0.0}
RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 180, 40)


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> dict[str, Any]:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    data = base64.b64encode(out.getvalue()).decode()
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


@pytest.fixture(scope="module")
def vlm_daemon(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = {"models": {"vlm": {"source": str(tiny_vlm_dir), "context_length": 4096}}}
    yield from running_daemon(tmp_path_factory.mktemp("vlm-daemon"), config)


def ask(daemon: Daemon, content: list[dict[str, Any]], **extra: Any) -> anthropic.types.Message:
    return daemon.client().messages.create(
        model="vlm",
        max_tokens=8,
        messages=[{"role": "user", "content": content}],
        extra_body=GREEDY,
        **extra,
    )


def test_two_images_of_one_size_give_two_answers(vlm_daemon: Daemon) -> None:
    question = {"type": "text", "text": "What colour is this?"}
    red = ask(vlm_daemon, [question, png(RED)])
    blue = ask(vlm_daemon, [question, png(BLUE)])
    assert red.content[0].text != blue.content[0].text  # type: ignore[union-attr]
    # The blue one read the question from the cache, not the red image.
    count = vlm_daemon.client().messages.count_tokens(
        model="vlm", messages=[{"role": "user", "content": [question, png(BLUE)]}]
    )
    read = blue.usage.cache_read_input_tokens or 0
    assert blue.usage.input_tokens + read == count.input_tokens
    assert 0 < read < count.input_tokens - 6  # the text before the image, not the image
    again = ask(vlm_daemon, [question, png(BLUE)])
    assert again.content[0].text == blue.content[0].text  # type: ignore[union-attr]
    # Through the image: all but the prompt's last token (generation starts from its logits).
    assert again.usage.cache_read_input_tokens == count.input_tokens - 1
