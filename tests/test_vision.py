"""Vision models: images reach the model, and the prompt cache tells images apart."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pensieved.config import EngineConfig, ModelConfig
from pensieved.engine import vision
from pensieved.engine.loading import load_weights
from pensieved.memory.admission import vision_bytes
from tests.daemon import Daemon, daemon_running, running_daemon

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


def ask(
    daemon: Daemon, content: list[dict[str, Any]], max_tokens: int = 8, **extra: Any
) -> anthropic.types.Message:
    return daemon.client().messages.create(
        model="vlm",
        max_tokens=max_tokens,
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


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_new_image_in_a_later_turn_keeps_the_turns_before_it_cached(vlm_daemon: Daemon) -> None:
    client = vlm_daemon.client()
    first_turn = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, png(GREEN)]}]
    first = client.messages.create(
        model="vlm", max_tokens=8, messages=first_turn, extra_body=GREEDY
    )
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": text_of(first)},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this one?"}, png(RED, (96, 64))],
        },
    ]
    second = client.messages.create(
        model="vlm", max_tokens=8, messages=second_turn, extra_body=GREEDY
    )
    before = client.messages.count_tokens(model="vlm", messages=first_turn).input_tokens
    # Turn one's prompt, its image included, comes from the cache; the new image does not.
    assert (second.usage.cache_read_input_tokens or 0) >= before
    total = client.messages.count_tokens(model="vlm", messages=second_turn).input_tokens
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) == total
    assert second.usage.input_tokens > 6  # the new image's run was prefilled


def test_an_image_a_tool_returns_reaches_the_model(vlm_daemon: Daemon) -> None:
    def read_result(color: tuple[int, int, int]) -> anthropic.types.Message:
        return vlm_daemon.client().messages.create(
            model="vlm",
            max_tokens=8,
            tools=[{"name": "Read", "input_schema": {"type": "object"}}],
            messages=[
                {"role": "user", "content": "Read shot.png"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [png(color)]}
                    ],
                },
            ],
            extra_body=GREEDY,
        )

    red, blue = read_result(RED), read_result(BLUE)
    assert text_of(red) != text_of(blue)
    assert (blue.usage.cache_read_input_tokens or 0) < blue.usage.input_tokens + (
        blue.usage.cache_read_input_tokens or 0
    ) - 6


def test_several_images_stand_in_their_order(vlm_daemon: Daemon) -> None:
    red_blue = ask(vlm_daemon, [png(RED), png(BLUE), {"type": "text", "text": "Compare."}])
    blue_red = ask(vlm_daemon, [png(BLUE), png(RED), {"type": "text", "text": "Compare."}])
    assert text_of(red_blue) != text_of(blue_red)

    def count(*blocks: dict[str, Any]) -> int:
        messages = [{"role": "user", "content": [*blocks, {"type": "text", "text": "x"}]}]
        return (
            vlm_daemon.client().messages.count_tokens(model="vlm", messages=messages).input_tokens
        )

    # <|vision_start|>, 4 pads, <|vision_end|>: images stand right against what is around them.
    assert count(png(RED), png(BLUE)) - count(png(RED)) == 6


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ({"type": "url", "url": "http://169.254.169.254/"}, "not fetched"),
        ({"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}, "Files API"),
        ({"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}, "not a PNG"),
        ({"type": "base64", "media_type": "image/png", "data": "%%%"}, "base64"),
    ],
)
def test_images_it_cannot_use_are_refused_in_the_apis_envelope(
    vlm_daemon: Daemon, source: dict[str, Any], words: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        ask(
            vlm_daemon,
            [{"type": "text", "text": "What is it?"}, {"type": "image", "source": source}],
        )
    body = refused.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.1.source" in body["error"]["message"]
    assert words in body["error"]["message"]


def test_an_image_request_and_a_text_request_share_the_batch(vlm_daemon: Daemon) -> None:
    image = [{"type": "text", "text": "Batch me."}, png(BLUE, (80, 80))]
    text = [{"type": "text", "text": "Only words here, " + "some more words " * 8}]

    def fresh(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*content, {"type": "text", "text": secrets.token_hex(4)}]

    contents = [fresh(image), fresh(text)]
    alone = [text_of(ask(vlm_daemon, content, max_tokens=24)) for content in contents]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda c: text_of(ask(vlm_daemon, c, max_tokens=24)), contents))
    assert together == alone


def test_a_model_not_loaded_counts_images_as_the_loaded_one_does(
    tiny_vlm_dir: Path, tmp_path: Path
) -> None:
    content = [{"type": "text", "text": "Count me."}, png(RED, (200, 120))]
    config = {"models": {"cold": {"source": str(tiny_vlm_dir)}}}
    with daemon_running(tmp_path, config) as daemon:
        client = daemon.client()
        messages = [{"role": "user", "content": content}]
        before = client.messages.count_tokens(model="cold", messages=messages).input_tokens
        reply = client.messages.create(model="cold", max_tokens=2, messages=messages)
        after = client.messages.count_tokens(model="cold", messages=messages).input_tokens
    assert before == after == reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)


def test_a_persisted_image_turn_is_warm_after_a_restart(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    config = {
        "engine": {"persist_prompt_cache": True},
        "models": {"vlm": {"source": str(tiny_vlm_dir), "context_length": 4096}},
    }
    content = [{"type": "text", "text": "Remember this."}, png(GREEN, (120, 90))]
    with daemon_running(tmp_path, config) as daemon:
        cold = ask(daemon, content)
    with daemon_running(tmp_path, config) as daemon:
        warm = ask(daemon, content)
        assert "warm from disk" in daemon.log()
    assert text_of(warm) == text_of(cold)  # the image's positions came back with it
    total = cold.usage.input_tokens
    assert warm.usage.cache_read_input_tokens == total - 1


def test_the_makefile_installs_the_mlx_vlm_the_engine_names() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"MLX_VLM := {vision.MLX_VLM}\n" in makefile


def test_a_vision_model_without_mlx_vlm_is_refused_with_the_fix(
    tiny_vlm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # as if not installed
    with pytest.raises(ValueError, match=r"model 'vlm' is a vision model and mlx-vlm is missing"):
        vision.image_preparer("vlm", tiny_vlm_dir)


def test_a_text_model_daemon_never_imports_mlx_vlm_or_pillow() -> None:
    code = (
        "import sys, pensieved.service.server, pensieved.engine.runner; "
        "print(sorted({'mlx_vlm', 'PIL'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_health_says_the_model_sees_images(vlm_daemon: Daemon) -> None:
    ask(vlm_daemon, [{"type": "text", "text": "Load."}])
    models = vlm_daemon.health()["models"]
    assert next(m for m in models if m["name"] == "vlm")["images"] == "vision"


def test_the_vision_towers_activations_grow_with_the_largest_image() -> None:
    tower = SimpleNamespace(num_heads=16, embed_dim=1280)  # Qwen2.5-VL's
    # A 1280x800 screenshot: 57 x 91 patches of 14 pixels (5187 in all).
    screenshot = vision_bytes(tower, [(1, 57, 91)])
    assert 1.5 * 1024**3 < screenshot < 2.5 * 1024**3  # scores dominate: 16 x 5187^2 x 4 bytes
    half = vision_bytes(tower, [(1, 29, 46)])  # a quarter of the pixels
    assert 10 < screenshot / half < 17
    # Two images cost the larger one's scores, and both their states.
    assert vision_bytes(tower, [(1, 57, 91), (1, 29, 46)]) < screenshot + half
    assert vision_bytes(tower, []) == 0


def test_kv_bits_on_a_vision_model_is_refused_with_a_sentence(tiny_vlm_dir: Path) -> None:
    config = ModelConfig("eyes", str(tiny_vlm_dir), kv_bits=8)
    with pytest.raises(ValueError, match="vision model, whose KV cache stays at full precision"):
        load_weights(config, tiny_vlm_dir, EngineConfig())


def test_thinking_with_an_image_is_answered(vlm_daemon: Daemon) -> None:
    reply = ask(
        vlm_daemon,
        [{"type": "text", "text": "Think, then say."}, png(RED)],
        max_tokens=1100,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=512),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"]),
)
def test_any_image_bytes_get_a_reply_or_a_400(
    vlm_daemon: Daemon, data: bytes, prefix: bytes
) -> None:
    body = base64.b64encode(prefix + data).decode()
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": body}}
    with vlm_daemon.http() as http:
        response = http.post(
            "/v1/messages",
            json={
                "model": "vlm",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [block]}],
            },
        )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_typescript_sdk_sends_an_image_block(vlm_daemon: Daemon) -> None:
    from tests.test_ts_sdk import NODE, SDK, run_script

    if NODE is None or not SDK.exists():
        pytest.skip("the TypeScript SDK is not installed: run `make setup`")
    result = run_script(vlm_daemon, "image.mjs", model="vlm")
    usage = result["usage"]
    assert result["stop_reason"] in ("end_turn", "max_tokens")
    # The image's run (a 2x2 image is scaled up to the processor's minimum: 4 features).
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == result["counted"]
    text_only = vlm_daemon.client().messages.count_tokens(
        model="vlm", messages=[{"role": "user", "content": "What is in this image?"}]
    )
    assert result["counted"] >= text_only.input_tokens + 6


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_each_family_answers_as_mlx_vlm_itself_does(
    family: str, smollm_dir: Path, tmp_path: Path
) -> None:
    """Greedy, the daemon's reply to a text and an image is mlx-vlm's own, token for token."""
    from mlx_vlm import load, stream_generate

    from tests.vision_models import build_tiny_vlm

    folder = build_tiny_vlm(tmp_path / family, smollm_dir, family=family, seed=3)
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    model, processor = load(str(folder))
    turn = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image"}]}]
    prompt = processor.tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True
    )
    theirs = [
        r.token
        for r in stream_generate(
            model, processor, prompt, image=[image], max_tokens=8, temperature=0.0
        )
    ]
    expected = processor.tokenizer.decode(theirs[:8])
    out = io.BytesIO()
    image.save(out, format="PNG")
    block = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(out.getvalue()).decode(),
        },
    }
    with daemon_running(tmp_path / "home", {"models": {"vlm": {"source": str(folder)}}}) as daemon:
        reply = ask(daemon, [{"type": "text", "text": "What?"}, block], max_tokens=8)
    # (A reply's first token loses its leading space, as with every model.)
    assert text_of(reply) == expected.removeprefix(" ")
