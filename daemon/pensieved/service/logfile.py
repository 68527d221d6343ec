"""The daemon's own log file: rotated, read by `pensievectl logs` on every platform."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from pensieved.paths import private_dir
from pensieved.service.units import STDERR_LOG, STDOUT_LOG

LOG_FILE = "pensieved.log"


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """Rotates once the file has passed its size, checked on the open stream.

    The standard handler stats the path and formats each record twice to
    decide before writing; every message logs a line or two from the event
    loop, so that cost was paid per request. The file may pass `maxBytes` by
    one line.
    """

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return self.stream is not None and self.maxBytes > 0 and self.stream.tell() >= self.maxBytes


LOG_BYTES = 10 * 1024**2


def log_to_file(path: Path, supervised_by: str | None = None) -> None:
    """Also log to `path` (rotated), which `pensievectl logs` reads on every platform.

    Under launchd stderr is pensieved.err.log, a file launchd appends to and
    nothing rotates: the log then goes to `path` alone, each line once, and
    stderr keeps only what bypasses logging (a crash's traceback, native
    libraries' output). An out or err log past LOG_BYTES anyway is moved to
    `.1` at start; this run keeps writing there, the next one starts afresh.
    """
    private_dir(path.parent)
    handler = _RotatingLog(path, maxBytes=LOG_BYTES, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if supervised_by == "launchd":
        for stderr in [h for h in root.handlers if getattr(h, "stream", None) is sys.stderr]:
            root.removeHandler(stderr)
        for name in (STDOUT_LOG, STDERR_LOG):
            output = path.with_name(name)
            with contextlib.suppress(OSError):
                if output.stat().st_size > LOG_BYTES:
                    os.replace(output, output.with_name(f"{name}.1"))
    root.addHandler(handler)
