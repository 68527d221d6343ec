"""Shared by the Python client drivers: where the daemon is, a tool, a schema, JSON out.

Each driver runs in `.venv-clients` (never the project's venv) as
`python DRIVER.py SCENARIO` and prints what it saw; a failure prints the
client's own exception, which is what `make clients` reports.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

BASE_URL = os.environ["ANTHROPIC_BASE_URL"]
API_KEY = os.environ["ANTHROPIC_API_KEY"]
MODEL = os.environ.get("PENSIEVE_MODEL", "claude-sonnet-4-5")
WRONG_KEY = "not-the-token"

WEATHER_NAME = "get_weather"
WEATHER_DESCRIPTION = "The weather in a city."
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
# Finite by construction (an enum and a boolean), so a grammar-constrained
# reply always closes, even from a random model.
PICK_PROMPT = "Pick a colour and say whether it is warm."
PICK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "warm": {"type": "boolean"},
    },
    "required": ["colour", "warm"],
    "additionalProperties": False,
}


def run(scenarios: dict[str, Callable[[], dict[str, Any]]]) -> None:
    try:
        result = scenarios[sys.argv[1]]()
    except Exception as exc:
        result = {
            "error": {
                "type": f"{type(exc).__module__}.{type(exc).__name__}",
                "status": getattr(exc, "status_code", None) or getattr(exc, "status", None),
                "message": str(exc)[:3000],
            }
        }
        print(json.dumps(result, default=str))
        sys.exit(1)
    print(json.dumps(result, default=str))
