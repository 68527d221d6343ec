"""The README's lines with the real Claude Code (from npm) on the embedded model.

`eval "$(pensievectl env)"`, then `claude -p "Say hello."` and a `claude -c -p`
turn after it: each must print a reply and exit 0. SmolLM2's 8k window cannot
hold Claude Code's full prompt, so `env` puts it in its minimal mode; the
second turn reads the first one's prompt from the prompt cache. `make setup`
installs the pinned Claude Code with the other JavaScript clients
(tests/clients/package.json); without node these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import CLAUDE_CODE_MAX_OUTPUT_TOKENS, OUTRAN, Daemon, daemon_env, start_daemon

CLAUDE = Path(__file__).parent / "clients" / "node_modules" / ".bin" / "claude"

pytestmark = pytest.mark.skipif(
    not CLAUDE.exists(),
    reason="Claude Code is not installed: run `make setup` (npm ci in tests/clients)",
)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on the default config: the embedded model, as `make run` starts it."""
    daemon = start_daemon(tmp_path_factory.mktemp("embedded"), {})
    try:
        yield daemon
    finally:
        daemon.stop()


def check_replied(result: subprocess.CompletedProcess[str]) -> None:
    """Whether Claude Code printed the model's reply, or said the reply outran its budget.

    The second is Claude Code's own message (exit 1) for a reply that ended
    at `CLAUDE_CODE_MAX_OUTPUT_TOKENS`: the request went through and the
    model answered, at a length that is the 135M model's, not these lines'.
    """
    printed = result.stdout.strip()
    assert printed, result.stderr
    if result.returncode != 0:
        assert OUTRAN.search(printed), printed + result.stderr


def shell(daemon: Daemon, project: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` in a user's shell: Pensieve's and Claude Code's commands on PATH, nothing set."""
    env = {
        name: value
        for name, value in daemon_env(daemon.home).items()
        if not name.startswith(("ANTHROPIC_", "CLAUDE_"))
    }
    env.update(
        PATH=f"{CLAUDE.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        HOME=str(project.parent),
        CLAUDE_CONFIG_DIR=str(project.parent / ".claude"),
        # Offline here: no update checks, no telemetry.
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        CLAUDE_CODE_MAX_OUTPUT_TOKENS=CLAUDE_CODE_MAX_OUTPUT_TOKENS,
    )
    return subprocess.run(
        ["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_readme_lines_print_a_reply_and_so_does_a_continued_turn(
    embedded: Daemon, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    first = shell(embedded, project, 'eval "$(pensievectl env)"\nclaude -p "Say hello."')
    check_replied(first)
    second = shell(embedded, project, 'eval "$(pensievectl env)"\nclaude -c -p "Now say goodbye."')
    check_replied(second)
    third = shell(embedded, project, 'claude-local -c -p "Thank you."')
    check_replied(third)
    assert "minimal mode" in third.stderr
    # Claude Code's minimal mode: three tools, and the first turn's prompt,
    # ~1.1k tokens, read from the prompt cache by the turns after it (a reply
    # cut at the budget makes Claude Code ask for the rest: longer prompts).
    log = embedded.log()
    main_turns = re.findall(r"stream model=\S+ prompt=(\d+) .*tools=3", log)
    assert len(main_turns) >= 3 and int(main_turns[0]) < 2_000, log
    cached = [int(n) for n in re.findall(r"done: \w+ in=\d+ cached=(\d+)", log)]
    assert max(cached) > 1_000, log


def test_a_screenshot_named_in_a_prompt_reaches_a_vision_model(
    tiny_vlm_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    # A window that holds Claude Code's full prompt: its minimal mode reads no @-mentions.
    model = {"source": str(tiny_vlm_dir), "aliases": ["claude-*"], "context_length": 32768}
    daemon = start_daemon(tmp_path / "home", {"models": {"vlm": model}})
    try:
        project = tmp_path / "project"
        project.mkdir()
        Image.new("RGB", (320, 200), (200, 30, 30)).save(project / "shot.png")
        result = shell(
            daemon, project, 'eval "$(pensievectl env)"\nclaude -p "What is in @shot.png?"'
        )
        check_replied(result)
        log = daemon.log()
    finally:
        daemon.stop()
    # Claude Code sent the file as an image block, and the model's vision tower read it.
    assert re.search(r"images: 1 in the prompt \(\d+ tokens\)", log), log
    assert " 500 " not in log and "Traceback" not in log
