"""A Claude-Code-shaped conversation for the prompt-cache benchmark, in two wire formats.

Shaped like what Claude Code 2.1.x sends: `system` as text blocks whose first
block is the volatile billing header (a new `cch=` on every request), a long
instruction prompt and project context, a dozen tools with JSON schemas, and a
tool round trip between turn 1 and turn 2. `openai_messages` renders the same
conversation for `mlx_lm.server`, the tools and calls written in the generic
text format that Pensieve uses for models without native tool support (such
as SmolLM2), so both servers prefill about the same tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from pensieved.conversation.toolcalls import (
    generic_call_text,
    generic_instructions,
    generic_result_text,
)
from pensieved.wire.protocol import Tool

Json = dict[str, Any]


def _tool(name: str, description: str, properties: Json, required: list[str]) -> Json:
    schema = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#",
    }
    return {"name": name, "description": description, "input_schema": schema}


def _str(description: str) -> Json:
    return {"type": "string", "description": description}


def _int(description: str) -> Json:
    return {"type": "number", "description": description}


def _bool(description: str) -> Json:
    return {"type": "boolean", "description": description}


_EDIT = {
    "old_string": _str("The text to replace"),
    "new_string": _str("The text to replace it with (must be different from old_string)"),
    "replace_all": _bool("Replace all occurences of old_string (default false)"),
}
_TODO = {
    "type": "object",
    "properties": {
        "content": {"type": "string", "minLength": 1},
        "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
        "activeForm": {"type": "string", "minLength": 1},
    },
    "required": ["content", "status", "activeForm"],
}

TOOLS: list[Json] = [
    _tool(
        "Task",
        "Launch a new agent to handle complex, multi-step tasks autonomously. Use it for "
        "open-ended searches that may need several rounds of globbing and grepping.",
        {
            "description": _str("A short (3-5 word) description of the task"),
            "prompt": _str("The task for the agent to perform"),
            "subagent_type": _str("The type of specialized agent to use for this task"),
        },
        ["description", "prompt", "subagent_type"],
    ),
    _tool(
        "Bash",
        "Executes a given bash command in a persistent shell session with optional timeout, "
        "ensuring proper handling and security measures. Quote paths that contain spaces. "
        "Avoid find, grep, cat, head and tail: use the dedicated tools instead.",
        {
            "command": _str("The command to execute"),
            "timeout": _int("Optional timeout in milliseconds (max 600000)"),
            "description": _str("Clear, concise description of what this command does"),
            "run_in_background": _bool("Set to true to run this command in the background"),
        },
        ["command"],
    ),
    _tool(
        "Glob",
        "Fast file pattern matching tool that works with any codebase size. Supports glob "
        'patterns like "**/*.js" or "src/**/*.ts". Returns matching file paths sorted by '
        "modification time.",
        {
            "pattern": _str("The glob pattern to match files against"),
            "path": _str("The directory to search in. Defaults to the current directory."),
        },
        ["pattern"],
    ),
    _tool(
        "Grep",
        "A powerful search tool built on ripgrep. Supports full regex syntax, filtering "
        "files with the glob or type parameters, and several output modes.",
        {
            "pattern": _str("The regular expression pattern to search for in file contents"),
            "path": _str("File or directory to search in. Defaults to the working directory."),
            "glob": _str('Glob pattern to filter files (e.g. "*.js", "*.{ts,tsx}")'),
            "output_mode": {
                "type": "string",
                "enum": ["content", "files_with_matches", "count"],
                "description": 'Output mode; defaults to "files_with_matches".',
            },
            "-i": _bool("Case insensitive search"),
            "-n": _bool("Show line numbers in output"),
            "-C": _int("Number of lines to show before and after each match"),
            "head_limit": _int("Limit output to the first N lines or entries"),
            "multiline": _bool("Enable multiline mode where . matches newlines"),
        },
        ["pattern"],
    ),
    _tool(
        "Read",
        "Reads a file from the local filesystem. The file_path parameter must be an absolute "
        "path. By default it reads up to 2000 lines from the beginning of the file; results "
        "are returned using cat -n format, with line numbers starting at 1.",
        {
            "file_path": _str("The absolute path to the file to read"),
            "offset": _int("The line number to start reading from"),
            "limit": _int("The number of lines to read"),
        },
        ["file_path"],
    ),
    _tool(
        "Edit",
        "Performs exact string replacements in files. You must use the Read tool at least "
        "once before editing. The edit fails if old_string is not unique in the file.",
        {"file_path": _str("The absolute path to the file to modify"), **_EDIT},
        ["file_path", "old_string", "new_string"],
    ),
    _tool(
        "MultiEdit",
        "Makes multiple edits to a single file in one operation, applied in sequence.",
        {
            "file_path": _str("The absolute path to the file to modify"),
            "edits": {
                "type": "array",
                "minItems": 1,
                "description": "Array of edit operations to perform sequentially on the file",
                "items": {
                    "type": "object",
                    "properties": _EDIT,
                    "required": ["old_string", "new_string"],
                },
            },
        },
        ["file_path", "edits"],
    ),
    _tool(
        "Write",
        "Writes a file to the local filesystem, overwriting the file if there is one. "
        "Prefer editing existing files; never write documentation files unless asked.",
        {
            "file_path": _str("The absolute path to the file to write (must be absolute)"),
            "content": _str("The content to write to the file"),
        },
        ["file_path", "content"],
    ),
    _tool(
        "NotebookEdit",
        "Completely replaces the contents of a specific cell in a Jupyter notebook.",
        {
            "notebook_path": _str("The absolute path to the Jupyter notebook file to edit"),
            "cell_id": _str("The ID of the cell to edit"),
            "new_source": _str("The new source for the cell"),
            "cell_type": {"type": "string", "enum": ["code", "markdown"]},
            "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]},
        },
        ["notebook_path", "new_source"],
    ),
    _tool(
        "WebFetch",
        "Fetches content from a specified URL and processes it using an AI model.",
        {
            "url": {"type": "string", "format": "uri", "description": "The URL to fetch"},
            "prompt": _str("The prompt to run on the fetched content"),
        },
        ["url", "prompt"],
    ),
    _tool(
        "WebSearch",
        "Allows Claude to search the web and use the results to inform responses.",
        {
            "query": {"type": "string", "minLength": 2, "description": "The query to use"},
            "allowed_domains": {"type": "array", "items": {"type": "string"}},
            "blocked_domains": {"type": "array", "items": {"type": "string"}},
        },
        ["query"],
    ),
    _tool(
        "TodoWrite",
        "Use this tool to create and manage a structured task list for your current coding "
        "session. It helps you track progress and organize complex tasks.",
        {"todos": {"type": "array", "items": _TODO, "description": "The updated todo list"}},
        ["todos"],
    ),
]

INSTRUCTIONS = """\
You are Claude Code, Anthropic's official CLI for Claude.
You are an interactive CLI tool that helps users with software engineering tasks. Use the \
instructions below and the tools available to you to assist the user.

IMPORTANT: Assist with defensive security tasks only. Refuse to create, modify, or improve \
code that may be used maliciously.

# Tone and style
You should be concise, direct, and to the point. Your output is displayed on a command line \
interface and rendered as GitHub-flavored markdown in a monospace font. Answer the user's \
question directly, without elaboration, explanation, or details, unless they ask for them. \
Only use emojis if the user explicitly requests it.

# Proactiveness
You are allowed to be proactive, but only when the user asks you to do something. Do what \
has been asked; nothing more, nothing less. Do not surprise the user with actions you take \
without asking.

# Following conventions
When making changes to files, first understand the file's code conventions. Mimic code \
style, use existing libraries and utilities, and follow existing patterns. NEVER assume that \
a given library is available: check that the codebase already uses it. When you create a new \
component, first look at existing components to see how they're written. Always follow \
security best practices; never introduce code that exposes or logs secrets and keys.

# Task management
Use the TodoWrite tool VERY frequently to plan tasks and to give the user visibility into \
your progress. Mark todos as completed as soon as you are done with a task.

# Doing tasks
- Use the available search tools to understand the codebase and the user's query.
- Implement the solution using all tools available to you.
- Verify the solution with tests if possible. Never assume a specific test framework.
- When you have completed a task, run the lint and typecheck commands if they exist.
NEVER commit changes unless the user explicitly asks you to.

# Tool usage policy
- When doing file search, prefer to use the Task tool in order to reduce context usage.
- You can call multiple tools in a single response. When multiple independent pieces of \
information are requested, batch your tool calls together for optimal performance.

# Code References
When referencing specific functions or pieces of code include the pattern \
`file_path:line_number` to allow the user to easily navigate to the source code location.
"""


def _project_context(lines: int) -> str:
    """An <env> block and a git status with `lines` recent commits and changed files."""
    commits = "\n".join(
        f"{(i * 2654435761) % 16**7:07x} Module {i % 23}: fix the handling of case {i} in "
        f"parser_{i % 7}.py and add a regression test"
        for i in range(lines)
    )
    changed = "\n".join(f" M src/pkg_{i % 9}/module_{i}.py" for i in range(lines // 4))
    return (
        "Here is useful information about the environment you are running in:\n<env>\n"
        "Working directory: /home/dev/project\nIs directory a git repo: Yes\n"
        "Platform: linux\nOS Version: Linux 6.8.0\nToday's date: 2026-03-14\n</env>\n"
        "You are powered by the model named Opus 4.8.\n\n"
        f"gitStatus: This is the git status at the start of the conversation.\n"
        f"Current branch: main\n\nStatus:\n{changed}\n\nRecent commits:\n{commits}"
    )


def billing_header(cch: str | None = None) -> str:
    """Claude Code's per-request first system block (a fresh `cch` unless given)."""
    return f"x-anthropic-billing-header: cc_version=2.1.197; cch={cch or secrets.token_hex(3)};"


TOOL_CALL = {
    "name": "Bash",
    "input": {"command": "pytest tests/test_parser.py -x -q", "description": "Run the tests"},
}
TOOL_OUTPUT = "\n".join(
    [
        "F",
        "=================================== FAILURES ===================================",
        "____________________________ test_nested_quotes ________________________________",
        "    def test_nested_quotes():",
        ">       assert parse('a \"b \\'c\\'\"') == ['a', 'b \\'c\\'']",
        "E       AssertionError: assert ['a', '\"b', \"'c'\\\"\"] == ['a', \"b 'c'\"]",
        "tests/test_parser.py:42: AssertionError",
        "=========================== short test summary info ============================",
        "FAILED tests/test_parser.py::test_nested_quotes - AssertionError",
        "1 failed, 17 passed in 0.21s",
    ]
)
USER_TURN = "The tests in tests/test_parser.py fail since the last commit. Find out why and fix it."


@dataclass(frozen=True)
class Conversation:
    """Turn 1 and the prefix shared by turn 2, with `context_lines` of project context."""

    context_lines: int

    def system(self, cch: str | None = None) -> list[Json]:
        return [
            {"type": "text", "text": billing_header(cch)},
            {"type": "text", "text": INSTRUCTIONS, "cache_control": {"type": "ephemeral"}},
            {
                "type": "text",
                "text": _project_context(self.context_lines),
                "cache_control": {"type": "ephemeral"},
            },
        ]

    def turn1(self) -> list[Json]:
        return [{"role": "user", "content": [{"type": "text", "text": USER_TURN}]}]

    def turn2(self, reply: str) -> list[Json]:
        call = {"type": "tool_use", "id": "toolu_01bench", **TOOL_CALL}
        result = {"type": "tool_result", "tool_use_id": "toolu_01bench", "content": TOOL_OUTPUT}
        return [
            *self.turn1(),
            {"role": "assistant", "content": [{"type": "text", "text": reply}, call]},
            {"role": "user", "content": [result]},
        ]

    def anthropic_extras(self, cch: str | None = None) -> Json:
        """The request's `system` and `tools` (a fresh billing header unless `cch` is given)."""
        return {"system": self.system(cch), "tools": TOOLS}

    def openai_messages(
        self, messages: list[Json], cch: str | None = None, billing: bool = True
    ) -> list[Json]:
        """The same conversation as OpenAI chat messages, tools in the generic text format.

        Without `billing`, the billing header is left out: the prompt is then
        token for token the one Pensieve renders (which drops that header).
        """
        blocks = self.system(cch)[0 if billing else 1 :]
        system = "\n".join(block["text"] for block in blocks)
        turns = [{"role": "system", "content": f"{system}\n\n{_generic_tools()}"}]
        for message in messages:
            texts = []
            for block in message["content"]:
                if block["type"] == "text":
                    texts.append(block["text"])
                elif block["type"] == "tool_use":
                    texts.append(generic_call_text(block["name"], block["input"]))
                elif block["type"] == "tool_result":
                    texts.append(generic_result_text(TOOL_CALL["name"], block["content"], False))
            turns.append({"role": message["role"], "content": "\n".join(texts)})
        return turns


def _generic_tools() -> str:
    # Exactly what Pensieve tells a model without tool support.
    return generic_instructions(msgspec.convert(TOOLS, list[Tool]))


def fit_conversation(count_tokens: Callable[[Json], int], min_tokens: int) -> Conversation:
    """The smallest conversation (in steps of 4 context lines) whose turn 1 has `min_tokens`."""
    lines = 0
    while True:
        conversation = Conversation(lines)
        request = {"messages": conversation.turn1(), **conversation.anthropic_extras()}
        if count_tokens(request) >= min_tokens:
            return conversation
        lines += 4
