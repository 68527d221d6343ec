"""The documentation agrees with the code and with itself.

- Every `pensievectl` command, found by walking the real click command tree,
  is documented in docs/ as `pensievectl <path>` (in backticks or a code
  block).
- Every `pensievectl <word>` that README.md or docs/ mention names a real
  command, so the docs cannot keep a command that was removed or renamed.
- Every relative link in README.md and docs/*.md points at a file that
  exists, and a `#fragment` into a Markdown page at one of its headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pensievectl.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(?P<ticks>`+)(?P<body>.+?)(?P=ticks)", re.S)
# `pensievectl` followed, on the same line, by what may be a command name.
MENTION = re.compile(r"\bpensievectl((?:[ \t]+[a-z][a-z0-9-]*)+)")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target>\S+)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(?P<text>.*?)[ \t#]*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every command under `group`, groups included, by its path ("service install")."""
    paths: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = (*prefix, name)
        paths[" ".join(path)] = command
        if isinstance(command, click.Group):
            paths.update(command_paths(command, path))
    return paths


COMMANDS = command_paths(main)


def without_code(text: str) -> str:
    """The page's prose: code blocks and inline code removed."""
    return INLINE_CODE.sub(" ", FENCE.sub("", text))


def code_snippets(text: str) -> list[str]:
    """Each line of every code block and every inline code span, whitespace collapsed."""
    snippets = [
        " ".join(line.split()) for m in FENCE.finditer(text) for line in m["body"].splitlines()
    ]
    prose = FENCE.sub("", text)
    snippets += [" ".join(m["body"].split()) for m in INLINE_CODE.finditer(prose)]
    return snippets


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = INLINE_CODE.sub(lambda m: m["body"], heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for m in HEADING.finditer(FENCE.sub("", page.read_text())):
        base = slug(m["text"])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_pages_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/ has no pages"


def test_the_command_tree_is_walked() -> None:
    assert COMMANDS, "pensievectl has no commands?"
    groups = [path for path, command in COMMANDS.items() if isinstance(command, click.Group)]
    assert groups, "no command groups found: the walk does not recurse"
    for group in groups:
        assert any(path.startswith(f"{group} ") for path in COMMANDS), group


def test_every_command_is_documented() -> None:
    docs = [page for page in PAGES if page.parent == DOCS]
    code = "\n".join(snippet for page in docs for snippet in code_snippets(page.read_text()))
    missing = [
        path
        for path, command in COMMANDS.items()
        if not command.hidden and not re.search(rf"\bpensievectl {re.escape(path)}(?![\w-])", code)
    ]
    assert not missing, "commands not documented in docs/ as `pensievectl <command>`: " + ", ".join(
        f"`pensievectl {path}`" for path in missing
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_name_only_real_commands(page: Path) -> None:
    unknown: list[str] = []
    for m in MENTION.finditer(page.read_text()):
        words = m[1].split()
        group: click.Command = main
        path: list[str] = []
        for word in words:
            if not isinstance(group, click.Group):
                break  # a leaf command: the rest are its arguments
            command = group.commands.get(word)
            if command is None:
                unknown.append(" ".join(["pensievectl", *path, word]))
                break
            path.append(word)
            group = command
    assert not unknown, f"{page.name} names commands pensievectl does not have: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    prose = without_code(page.read_text())
    targets = [m["target"].strip("<>") for m in LINK.finditer(prose)]
    targets += [m["target"] for m in REFERENCE.finditer(prose)]
    broken: list[str] = []
    for target in targets:
        if SCHEME.match(target):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_every_daemon_module_says_where_its_tests_are() -> None:
    """docs/development.md's table names each daemon module, and only test files that exist."""
    text = (ROOT / "docs" / "development.md").read_text()
    table = text[text.index("### A module's tests") :]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([\w/]+\.py)`", row.split("|")[1])}
    package = ROOT / "daemon" / "pensieved"
    modules = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert modules - listed == set(), "modules missing from the table"
    assert listed - modules == set(), "the table names modules that do not exist"
    tests = {name for row in rows for name in re.findall(r"`(test_\w+)`", row.split("|")[2])}
    assert {name for name in tests if not (ROOT / "tests" / f"{name}.py").exists()} == set()
