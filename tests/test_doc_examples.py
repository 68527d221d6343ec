"""Every shell example in README.md and docs/ runs as written (or says why it cannot here).

A fenced block marked `sh` or `console` is an example. A `console` block is
a session: lines starting with `$ ` are commands, the lines after one are
what it printed. A `sh` block's lines are commands (comments and blank
lines skipped). Each example runs in a bash shell of its own, from the
repository root, against a fresh home (`PENSIEVE_HOME`, `HOME`,
`CLAUDE_CONFIG_DIR`) with a daemon on the default config (the embedded
model) on a free port, and with Pensieve's and Claude Code's commands on
PATH as `make setup` installs them. Every command must exit 0, and every
line a `console` block shows it printing must be there, in order, with
numbers, paths and tokens free to differ (`...` stands for anything).

An example that cannot run here is marked on the line before its fence with
`<!-- example: skip (REASON) -->`: a Mac-only command, the Hugging Face Hub
(which the build machine cannot reach), a login service, the test suite
itself. A block marked so without a reason, or an example that fails, fails
this test with the file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pensieved.config import BUILTIN_SOURCE, ModelConfig
from pensieved.models.registry import materialize
from tests.daemon import CLAUDE_CODE_MAX_OUTPUT_TOKENS, OUTRAN, Daemon, daemon_env, start_daemon

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLAUDE_BIN = REPO / "tests" / "clients" / "node_modules" / ".bin"
SKIP = re.compile(r"<!--\s*example:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")


@dataclass
class Command:
    text: str
    printed: list[str] = field(default_factory=list)  # what the docs show it printing


@dataclass
class Example:
    page: Path
    line: int
    lang: str
    commands: list[Command]
    skip: str | None  # why it cannot run here

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def examples(page: Path) -> Iterator[Example]:
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"```(\w+)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if lang in ("sh", "console"):
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marked = SKIP.search(before)
            body = lines[start + 1 : end]
            commands = _session(body) if lang == "console" else _script(body)
            yield Example(page, start + 1, lang, commands, marked and marked["reason"].strip())
        i = end + 1


def _session(body: list[str]) -> list[Command]:
    commands: list[Command] = []
    for line in body:
        if line.startswith("$ "):
            commands.append(Command(line[2:]))
        elif commands and line.strip():
            commands[-1].printed.append(line)
    return commands


def _script(body: list[str]) -> list[Command]:
    joined: list[str] = []
    for line in body:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + line
        elif line.strip() and not line.lstrip().startswith("#"):
            joined.append(line)
    return [Command(text) for text in joined]


ALL = [example for page in PAGES for example in examples(page)]
RUN = [example for example in ALL if not example.skip]


def test_every_example_runs_or_says_why_not() -> None:
    assert len(ALL) >= 8, "the examples were not found"
    for example in ALL:
        assert example.commands, f"{example.where}: an example with no command"
        if example.skip is not None:
            assert len(example.skip) > 10, f"{example.where}: skipped without a reason"


@pytest.fixture(scope="module")
def embedded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model imported once, as `make setup` does, shared by the examples' homes."""
    models = tmp_path_factory.mktemp("models")
    return Path(materialize(ModelConfig("embedded", BUILTIN_SOURCE), models))


@pytest.fixture
def home(tmp_path: Path, embedded_model: Path) -> Iterator[Daemon]:
    """A fresh user: Pensieve's home with the embedded model imported, and a daemon on it."""
    pensieve = tmp_path / "pensieve"
    (pensieve / "models").mkdir(parents=True)
    (pensieve / "models" / embedded_model.name).symlink_to(embedded_model)
    daemon = start_daemon(pensieve, {})
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize("example", RUN, ids=[example.where for example in RUN])
def test_the_example_runs_as_written(example: Example, home: Daemon, tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    env = {
        name: value
        for name, value in daemon_env(home.home).items()
        if not name.startswith(("ANTHROPIC_", "CLAUDE_"))
    }
    env.update(
        HOME=str(user),
        PATH=f"{Path(sys.executable).parent}:{CLAUDE_BIN}:{os.environ['PATH']}",
        CLAUDE_CONFIG_DIR=str(user / ".claude"),
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        # A rambling reply is cut, not waited for (tests/daemon.py).
        CLAUDE_CODE_MAX_OUTPUT_TOKENS=CLAUDE_CODE_MAX_OUTPUT_TOKENS,
    )
    script = []
    for number, command in enumerate(example.commands):
        script.append(f"printf '\\n@@ {number}\\n'")
        script.append(f"{{ {command.text}\n}} 2>&1")
        script.append("printf '\\n@@ rc %d\\n' $?")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs = _outputs(done.stdout)
    assert len(outputs) == len(example.commands), f"{example.where}: {done.stdout}{done.stderr}"
    for command, (printed, status) in zip(example.commands, outputs, strict=True):
        where = f"{example.where}: `{command.text}` exited {status}:\n{printed}"
        if command.text.startswith(("claude ", "claude-local ")) and OUTRAN.search(printed):
            continue  # the 135M model answered past Claude Code's budget: the line worked
        assert status == 0, where
        _check_printed(command.printed, printed, f"{example.where}: `{command.text}`")


def _outputs(stdout: str) -> list[tuple[str, int]]:
    parts = re.split(r"\n@@ \d+\n", "\n" + stdout)[1:]
    found = []
    for part in parts:
        text, _, status = part.rpartition("\n@@ rc ")
        found.append((text, int(status.strip())))
    return found


def _shape(line: str) -> str:
    """A line with what may differ from machine to machine made equal."""
    line = re.sub(r"pensieve-[\w-]{20,}", "TOKEN", line)
    line = re.sub(r"(?<![\w.])(/|~/)[^\s:,)]*", "PATH", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    line = re.sub(r"\b(True|False)\b", "BOOL", line)
    return " ".join(line.split())


def _check_printed(shown: list[str], printed: str, where: str) -> None:
    """Each line the docs show is printed, in order (`...` in a shown line: anything)."""
    actual = [_shape(line) for line in printed.splitlines() if line.strip()]
    position = 0
    for line in shown:
        pattern = re.escape(_shape(line)).replace(r"\.\.\.", ".*").replace(r"…", ".*")
        match = next(
            (i for i in range(position, len(actual)) if re.fullmatch(pattern, actual[i])), None
        )
        assert match is not None, f"{where}: the docs show\n  {line}\nbut it printed:\n{printed}"
        position = match + 1


def test_the_shape_of_a_line() -> None:
    assert _shape("listening   http://127.0.0.1:7777") == _shape("listening http://127.0.0.1:9")
    assert _shape("up 12m03s, 0.40 GB") == _shape("up 0m05s, 1.5 GB")
    assert _shape("export ANTHROPIC_AUTH_TOKEN=pensieve-" + "a" * 43) == (
        "export ANTHROPIC_AUTH_TOKEN=TOKEN"
    )
    assert _shape("(/home/me/.config/pensieve/config.toml)") == _shape("(/tmp/x/config.toml)")
    assert _shape("unloaded big") != _shape("unloaded smollm2-135m-instruct")
