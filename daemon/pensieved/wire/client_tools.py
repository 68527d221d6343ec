"""Anthropic-defined tools that the client runs: their documented input schemas.

A request names these by type alone (`{"type": "bash_20250124", "name":
"bash"}`): the cloud model knows their schemas by heart, a local model does
not. `client_tool_definition` supplies the description and input schema the
documentation gives, so the prompt shows them like any other tool and the
grammar can constrain their input. Server tools (web search, code execution,
...) run on Anthropic's side and have no local equivalent.
"""

from __future__ import annotations

import re
from typing import Any

# bash_20250124, text_editor_20250728, memory_20250818, computer_20251124, ...
# (computer_toolset_* and other families with a different shape do not match).
CLIENT_TOOL_TYPE = re.compile(r"^(?P<family>bash|text_editor|memory|computer)_(?P<date>\d{8})$")

# The client tool types this server knows by name, for the error that names
# what it accepts (newer dates of the same families are accepted too).
KNOWN_CLIENT_TOOL_TYPES = (
    "bash_20241022",
    "bash_20250124",
    "computer_20241022",
    "computer_20250124",
    "computer_20251124",
    "custom",
    "memory_20250818",
    "text_editor_20241022",
    "text_editor_20250124",
    "text_editor_20250429",
    "text_editor_20250728",
)

BASH_DESCRIPTION = (
    "Run commands in a persistent bash shell. State (working directory, environment "
    "variables, files) carries over between calls; the command's output comes back as "
    "the tool result."
)

BASH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {
            "type": "string",
            "description": "The bash command to run. Required unless the tool is being restarted.",
        },
        "restart": {
            "type": "boolean",
            "description": "Specifying true will restart this tool. Otherwise, leave this "
            "unspecified.",
        },
    },
}

TEXT_EDITOR_DESCRIPTION = (
    "View, create and edit text files. `view` shows a file with line numbers (or lists a "
    "directory); `create` writes a new file; `str_replace` replaces one exact, unique "
    "occurrence of `old_str` with `new_str`; `insert` adds `new_str` after line "
    "`insert_line` (0 for the top of the file)."
)


def _text_editor_schema(undo: bool) -> dict[str, Any]:
    commands = ["view", "create", "str_replace", "insert", *(["undo_edit"] if undo else [])]
    return {
        "type": "object",
        "properties": {
            "command": {
                "type": "string",
                "enum": commands,
                "description": f"The command to run: {', '.join(commands)}.",
            },
            "path": {
                "type": "string",
                "description": "Absolute path to file or directory, e.g. `/repo/file.py` or "
                "`/repo`.",
            },
            "file_text": {
                "type": "string",
                "description": "Required parameter of `create` command, with the content of "
                "the file to be created.",
            },
            "old_str": {
                "type": "string",
                "description": "Required parameter of `str_replace` command containing the "
                "string in `path` to replace.",
            },
            "new_str": {
                "type": "string",
                "description": "Optional parameter of `str_replace` command containing the new "
                "string (if not given, no string will be added). Required parameter of "
                "`insert` command containing the string to insert.",
            },
            "insert_line": {
                "type": "integer",
                "description": "Required parameter of `insert` command. The `new_str` will be "
                "inserted AFTER the line `insert_line` of `path`.",
            },
            "view_range": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "Optional parameter of `view` command when `path` points to a "
                "file. If none is given, the full file is shown. If provided, the file will "
                "be shown in the indicated line number range, e.g. [11, 12] will show lines "
                "11 and 12. Indexing at 1 to start. Setting `[start_line, -1]` shows all "
                "lines from `start_line` to the end of the file.",
            },
        },
        "required": ["command", "path"],
    }


MEMORY_DESCRIPTION = (
    "Keep notes that outlast this conversation in the /memories directory: check it before "
    "starting a task, and record progress and what you learn as you go. Commands: view, "
    "create, str_replace, insert, delete, rename."
)

MEMORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {
            "type": "string",
            "enum": ["view", "create", "str_replace", "insert", "delete", "rename"],
            "description": "The memory command to run.",
        },
        "path": {
            "type": "string",
            "description": "Path of the file or directory, under /memories.",
        },
        "view_range": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "`view`: optional [start, end] line range of a file.",
        },
        "file_text": {"type": "string", "description": "`create`: the file's content."},
        "old_str": {"type": "string", "description": "`str_replace`: the text to replace."},
        "new_str": {"type": "string", "description": "`str_replace`: the replacement text."},
        "insert_line": {
            "type": "integer",
            "description": "`insert`: the line after which to insert (0 for the top).",
        },
        "insert_text": {"type": "string", "description": "`insert`: the text to insert."},
        "old_path": {"type": "string", "description": "`rename`: the current path."},
        "new_path": {"type": "string", "description": "`rename`: the new path."},
    },
    "required": ["command"],
}

_COMPUTER_ACTIONS = [
    "key",
    "type",
    "mouse_move",
    "left_click",
    "left_click_drag",
    "right_click",
    "middle_click",
    "double_click",
    "screenshot",
    "cursor_position",
]
# computer_20250124 added these; computer_20251124 adds `zoom` when enable_zoom is set.
_COMPUTER_ACTIONS_2025 = [
    "left_mouse_down",
    "left_mouse_up",
    "scroll",
    "hold_key",
    "wait",
    "triple_click",
]
_POINT = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}


def _computer_schema(date: str, zoom: bool) -> dict[str, Any]:
    actions = list(_COMPUTER_ACTIONS)
    properties: dict[str, Any] = {
        "action": {"type": "string", "enum": actions, "description": "The action to perform."},
        "coordinate": {
            **_POINT,
            "description": "(x, y): pixels from the left and top edges of the screen; where "
            "to move the mouse or click.",
        },
        "text": {
            "type": "string",
            "description": "`type`: the text to type. `key`, `hold_key`: a key or key "
            'combination in xdotool syntax, e.g. "ctrl+s".',
        },
    }
    if date >= "20250124":
        actions += _COMPUTER_ACTIONS_2025
        properties |= {
            "start_coordinate": {**_POINT, "description": "`left_click_drag`: where to start."},
            "scroll_direction": {"type": "string", "enum": ["up", "down", "left", "right"]},
            "scroll_amount": {"type": "integer", "minimum": 0, "description": "Scroll clicks."},
            "duration": {
                "type": "number",
                "minimum": 0,
                "description": "`hold_key`, `wait`: seconds.",
            },
            "key": {
                "type": "string",
                "description": "Modifier keys to hold during a click or scroll, e.g. shift.",
            },
        }
    if date >= "20251124" and zoom:
        actions.append("zoom")
        properties["region"] = {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 4,
            "maxItems": 4,
            "description": "`zoom`: [x1, y1, x2, y2], the screen area to view at full size.",
        }
    return {"type": "object", "properties": properties, "required": ["action"]}


def client_tool_definition(
    tool_type: str, *, width: int | None = None, height: int | None = None, zoom: bool = False
) -> tuple[str, dict[str, Any]] | None:
    """(description, input schema) of an Anthropic-defined client tool; None for other types."""
    match = CLIENT_TOOL_TYPE.match(tool_type)
    if match is None:
        return None
    family, date = match.group("family"), match.group("date")
    if family == "bash":
        return BASH_DESCRIPTION, BASH_SCHEMA
    if family == "text_editor":
        # Versions from 20250429 on dropped `undo_edit`.
        return TEXT_EDITOR_DESCRIPTION, _text_editor_schema(undo=date < "20250429")
    if family == "memory":
        return MEMORY_DESCRIPTION, MEMORY_SCHEMA
    screen = f" The screen is {width}x{height} pixels." if width and height else ""
    description = (
        "Use a mouse and keyboard to interact with a computer, and take screenshots to see "
        f"it.{screen} Take a screenshot before clicking to know where things are."
    )
    return description, _computer_schema(date, zoom)
