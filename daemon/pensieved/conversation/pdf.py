"""The text of a PDF, read in a child process that can be bounded and killed.

A PDF is a program more than a file: a page tree can name one content
stream thousands of times, and pypdf dutifully extracts it on every page (a
1.4 KB file gives 18 M characters; a 33 KB one asks for 80 G). Nothing an
input controls may run unbounded in the daemon, so pypdf runs here, in a
fresh interpreter (`python -I pdf.py`, exec'd at once as multiprocessing's
"spawn" does: nothing of the daemon's MLX state is used in a forked copy),
with:

- an address-space limit (RLIMIT_AS, which Linux enforces) and a watchdog on
  its resident memory (macOS ignores RLIMIT_AS);
- a wall-clock deadline, past which the parent kills it (and its own, should
  the parent die first);
- caps on pages and characters, checked as it goes, so it stops early;
- a lower CPU priority (nice 10), so that its work waits for the daemon's;
- lower pypdf limits on decompressed streams, and no external decoders.

It writes each page's text as a JSON line as soon as it has it, so a child
stopped at its deadline or its memory limit still gives the pages before.
The parent side (`read_pdf`) uses nothing but the standard library; pypdf is
imported only in the child, at most `CONCURRENT_READS` at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Why a read stopped before the end of the document.
CUT_PAGES = "pages"  # the page cap
CUT_CHARS = "chars"  # the character cap
CUT_TIME = "time"  # the deadline: the child was killed
CUT_MEMORY = "memory"  # the memory limit
CUT_ERROR = "error"  # the child failed part way (or could not be started)

# The child's exit status when its watchdog finds it over its memory limit,
# or past its own deadline (the parent kills it sooner, unless it died).
_MEMORY_EXIT = 3
_TIME_EXIT = 4
# Decompressed stream limits for pypdf (its defaults are 75 MB): a page's
# content stream of real documents is far smaller.
STREAM_BYTES = 16 * 1024**2
# Children reading at once, whatever the number of requests: each may use
# its memory limit.
CONCURRENT_READS = 2
_slots = threading.BoundedSemaphore(CONCURRENT_READS)


@dataclass(frozen=True)
class PdfLimits:
    pages: int
    chars: int
    seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class PdfText:
    """What was read of one PDF."""

    pages: tuple[str, ...]  # the text of each page read, stripped, empty ones left out
    total_pages: int | None  # None when the file could not be opened
    cut: str | None = None  # why reading stopped early (CUT_*); None when it read it all
    seconds: float = 0.0  # how long the child ran
    unreadable: int = 0  # pages pypdf failed on (past a stream limit, damaged)

    @property
    def readable(self) -> bool:
        """False when the file could not be opened as a PDF at all."""
        return self.total_pages is not None or self.cut is not None

    @property
    def size(self) -> int:
        """Bytes held, about (for a cache)."""
        return sum(sys.getsizeof(page) for page in self.pages) + 200


def read_pdf(data: str, limits: PdfLimits) -> PdfText:
    """The text of base64 PDF `data`, page by page, read in a child process within `limits`."""
    command = [
        sys.executable,
        "-I",  # no user site, no PYTHON* variables, no current directory on the path
        str(Path(__file__)),
        str(limits.pages),
        str(limits.chars),
        str(limits.memory_bytes),
        # Its own deadline too, a little later, should the daemon die first.
        str(limits.seconds + 5),
    ]
    # The daemon may run with an OpenBLAS preloaded (engine/cpu.py): the child needs none.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DYLD_INSERT_LIBRARIES")}
    # One malloc arena (glibc): a thread's own reserves 64 MB of the address space.
    env["MALLOC_ARENA_MAX"] = "1"
    with _slots:
        started = time.monotonic()
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:  # no process to be had (limits, descriptors): not the file's fault
            log.warning("cannot start a PDF reader: %s", exc)
            return PdfText((), None, CUT_ERROR)
        timed_out = False
        try:
            out, _ = child.communicate(data.encode("ascii", errors="replace"), limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            child.kill()
            out, _ = child.communicate()  # the pages it wrote before
        except BaseException:
            child.kill()
            child.wait()
            raise
        seconds = time.monotonic() - started
    return _parsed(out, child.returncode, timed_out, seconds)


def _parsed(out: bytes, returncode: int, timed_out: bool, seconds: float) -> PdfText:
    pages: list[str] = []
    total: int | None = None
    cut: str | None = None
    unreadable = 0
    finished = False
    # A child killed mid-line leaves a partial last line: only whole lines count.
    for line in out.split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if "text" in record:
            if record["text"]:
                pages.append(record["text"])
        elif "pages" in record:
            total = int(record["pages"])
        elif "done" in record:
            finished = True
            cut = record.get("cut")
            unreadable = int(record.get("unreadable", 0))
    if timed_out or returncode == _TIME_EXIT:
        cut = CUT_TIME
    elif returncode == _MEMORY_EXIT:
        cut = CUT_MEMORY
    elif not finished and total is not None:
        cut = CUT_ERROR
    # Else, with no `pages` record: never opened, unreadable.
    return PdfText(tuple(pages), total, cut, seconds, unreadable)


# -- the child -----------------------------------------------------------------


class _Full(BaseException):
    """The character cap is reached inside a page (a BaseException: pypdf catches Exception)."""


def _emit(record: dict[str, Any]) -> None:
    # ASCII JSON: whatever this interpreter's locale, and nothing to decode wrongly.
    sys.stdout.buffer.write(json.dumps(record).encode() + b"\n")
    sys.stdout.buffer.flush()


def _limit(memory: int, seconds: float) -> None:
    """Hold this process to `memory` bytes and `seconds` of wall-clock time, at low priority."""
    import resource

    import psutil

    # A hostile file's work yields the CPU to the daemon's own requests.
    with contextlib.suppress(OSError):
        os.nice(10)

    with contextlib.suppress(ValueError, OSError):  # macOS: not enforced; the watchdog stands in
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The current RSS, not getrusage's peak: Linux carries the peak of the
    # process it was exec'd from (the daemon, gigabytes) into ru_maxrss.
    me = psutil.Process()
    deadline = time.monotonic() + seconds

    def watch() -> None:
        while True:
            if me.memory_info().rss > memory:
                os._exit(_MEMORY_EXIT)
            if time.monotonic() > deadline:
                os._exit(_TIME_EXIT)
            time.sleep(0.02)

    threading.stack_size(512 * 1024)  # not 8 MB of the address space
    threading.Thread(target=watch, daemon=True).start()


def _page_text(page: Any, left: int) -> tuple[str, bool]:
    """A page's text, and whether it was cut at `left` characters."""
    seen: list[str] = []
    count = 0

    def visit(text: Any, *_: Any) -> None:
        nonlocal count
        if isinstance(text, str) and text:
            seen.append(text)
            count += len(text)
            if count > left:
                raise _Full

    try:
        text = page.extract_text(visitor_text=visit) or ""
        full = False
    except _Full:
        text, full = "".join(seen), True
    # Lone surrogates (a broken font map) are no text a tokenizer takes.
    text = text.encode("utf-8", "replace").decode().strip()
    return (text[:left], True) if len(text) > left else (text, full)


def _child(max_pages: int, max_chars: int, memory_bytes: int, seconds: float) -> None:
    import base64
    import io
    import logging

    _limit(memory_bytes, seconds)
    import pypdf

    logging.getLogger("pypdf").setLevel(logging.CRITICAL)  # a hostile file warns a lot
    configure = getattr(pypdf, "overwrite_configuration", None)
    if configure is not None:  # pypdf >= 7
        configure(
            maximum_declared_stream_length=STREAM_BYTES,
            array_based_stream_maximum_output_length=STREAM_BYTES,
            zlib_maximum_output_length=STREAM_BYTES,
            lzw_maximum_output_length=STREAM_BYTES,
            run_length_maximum_output_length=STREAM_BYTES,
            brotli_maximum_output_length=STREAM_BYTES,
            jbig2_maximum_output_length=STREAM_BYTES,
            image_maximum_buffer_size=STREAM_BYTES,
            jbig2dec_binary=None,  # no external program on hostile input
        )
    try:
        data = base64.b64decode(sys.stdin.buffer.read())
        reader = pypdf.PdfReader(io.BytesIO(data))
        total = len(reader.pages)
    except MemoryError:
        raise
    except Exception:
        return  # nothing written: unreadable
    _emit({"pages": total})
    left = max_chars
    unreadable = 0
    for index in range(min(total, max_pages)):
        try:
            text, full = _page_text(reader.pages[index], left)
        except MemoryError:
            raise
        except Exception:
            unreadable += 1  # one damaged page does not lose the others
            continue
        _emit({"text": text})
        left -= len(text)
        if full or left <= 0:
            _emit({"done": True, "cut": CUT_CHARS, "unreadable": unreadable})
            return
    cut = CUT_PAGES if total > max_pages else None
    _emit({"done": True, "cut": cut, "unreadable": unreadable})


def main(argv: list[str]) -> int:
    try:
        _child(int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3]))
    except MemoryError:
        return _MEMORY_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
