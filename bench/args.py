"""The command line every bench shares, and the record of what it printed.

`make bench` hands each bench the same BENCH_ARGS: `parse` takes the options
a bench knows and names the others. It also starts the record: from then on
everything the bench prints (stdout and stderr) goes to
`bench/results/<bench>[-<model>].txt` as well (`--results` elsewhere, `-`
for none), after a header that says when, at which commit, with which
command, on what machine, Python, MLX and BLAS, and how busy the machine was.
The model part of the name is the bench's `--model`, where it has one. A run
that fails leaves its traceback there, in place of the last record.

Benches re-execute themselves with OpenBLAS preloaded (`openblas.reexec_with_openblas`)
and start worker processes: the record goes on across the first (same pid,
same start, same command) and is left to its bench by the second.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Carries the record's start across a re-exec and marks the bench's children.
STARTED = "PENSIEVE_BENCH_RECORD"
# The environment that changes what a bench measures, named in the header.
SETTINGS = ("PENSIEVE_OPENBLAS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE")


def parse(
    parser: argparse.ArgumentParser, model: str = "builtin", variant: str | None = None
) -> argparse.Namespace:
    """Parse the known options, start the record, and name the options meant for another bench.

    `model`: what the bench measures when its `--model` is not given;
    `variant`: what else tells its records apart (the file name's last part).
    `args.results` is the record's path, or None.
    """
    parser.add_argument(
        "--results",
        metavar="FILE",
        help="where everything printed also goes, after a header "
        "(default: bench/results/BENCH[-MODEL].txt; '-': nowhere)",
    )
    args, others = parser.parse_known_args()
    args.results = start(args, model, variant)
    if others:
        print(f"({parser.prog}: {' '.join(others)} is for another bench)")
    return args


def start(args: argparse.Namespace, model: str, variant: str | None) -> Path | None:
    """Tee stdout and stderr into the record; its path, or None for no record."""
    carried = json.loads(os.environ.get(STARTED, "null"))
    if carried is not None and carried["pid"] != os.getpid():
        return None  # a worker of a bench: its bench prints what counts
    started = carried or {
        "pid": os.getpid(),
        "time": time.time(),
        "load": os.getloadavg()[0],
        "command": command_line(),
    }
    os.environ[STARTED] = json.dumps(started)
    if args.results == "-":
        return None
    path = Path(args.results) if args.results else RESULTS / f"{name(args, model, variant)}.txt"
    record = Record(path.resolve(), started)
    sys.stdout = Tee(sys.stdout, record)
    sys.stderr = Tee(sys.stderr, record)
    atexit.register(record.close)
    return path


def name(args: argparse.Namespace, model: str, variant: str | None) -> str:
    """`speed-builtin`, `claude-replay-tiny`, `soak`: the bench, its model (if any), the rest."""
    parts = [Path(sys.argv[0]).stem.replace("_", "-")]
    if hasattr(args, "model"):
        chosen = str(args.model or model)
        parts.append("builtin" if chosen.startswith("builtin:") else Path(chosen).name)
    if variant:
        parts.append(variant)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))


def shown(path: Path) -> str:
    """`path` as a record shows it: from the repository's root where it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command_line() -> str:
    """The command as typed: settings that change what runs, the interpreter, the arguments."""
    settings = [f"{key}={os.environ[key]}" for key in SETTINGS if key in os.environ]
    python = Path(sys.executable)
    if python.is_relative_to(REPO):
        python = python.relative_to(REPO)
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return shlex.join([*settings, str(python), str(script), *sys.argv[1:]])


class Record:
    """The results file: opened at the first thing printed, so a bench that re-executes
    itself before printing anything writes it once."""

    def __init__(self, path: Path, started: dict[str, object]) -> None:
        self.path = path
        self.started = started
        self._file: TextIO | None = None
        self._closed = False
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if self._closed:
                return  # printed while Python shuts down: the record has its end
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("w", buffering=1)
                self._file.write(header(self.started))
            self._file.write(text)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is None:
                return
            seconds = time.time() - float(str(self.started["time"]))
            ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            load = os.getloadavg()[0]
            self._file.write(
                f"\n# ended {ended}: {seconds / 60:.1f} min, load average {load:.2f}\n"
            )
            self._file.close()
            self._file = None


class Tee(io.TextIOBase):
    """A stream that writes to the terminal and to the record."""

    def __init__(self, stream: TextIO, record: Record) -> None:
        self.stream = stream
        self.record = record

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.record.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding


def header(started: dict[str, object]) -> str:
    """When, at which commit, what was run, and on what: one `# key: value` line each."""
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(str(started["time"]))))
    rows = {
        "date": date,
        "commit": commit(),
        "command": started["command"],
        "machine": machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "mlx": mlx(),
        "blas": blas(),
        "load average (1 min) at start": f"{float(str(started['load'])):.2f}",
    }
    return "".join(f"# {key}: {value}\n" for key, value in rows.items()) + "\n"


def commit() -> str:
    """The commit, and the files that differ from it (the results themselves aside)."""

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", ".", ":!bench/results", ":!bench/out")
    paths = [line[3:] for line in changed.splitlines()]
    if not paths:
        return head
    shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
    return f"{head} + uncommitted changes ({shown})"


def machine() -> str:
    """OS, kernel, CPU model, cores and memory."""
    import psutil

    if sys.platform == "darwin":
        system = f"macOS {platform.mac_ver()[0]}"
        cpu = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    else:
        found = re.search(r'^PRETTY_NAME="?([^"\n]*)', read("/etc/os-release"), re.M)
        system = found[1] if found else platform.system()
        model = re.search(r"^model name\s*:\s*(.*)$", read("/proc/cpuinfo"), re.M)
        cpu = model[1] if model else platform.processor()
    memory = psutil.virtual_memory().total / 1024**3
    return (
        f"{system}, kernel {platform.release()}, {platform.machine()}, {cpu or 'CPU unknown'}, "
        f"{os.cpu_count()} cores, {memory:.1f} GiB"
    )


def read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mlx() -> str:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)  # MLX builds before CUDA support have none
    if mx.metal.is_available():
        backend = "metal"
    elif cuda is not None and cuda.is_available():
        backend = "cuda"
    else:
        backend = "cpu"
    return f"{metadata.version('mlx')}, backend {backend}, default device {mx.default_device()}"


def blas() -> str:
    """The BLAS this process's MLX calls, and the one a daemon started now would preload."""
    from pensieved.engine import cpu, openblas

    line = cpu.blas_report().describe().replace(f"{REPO}/", "")
    if sys.platform != "linux" or openblas.openblas_active():
        return line
    if os.environ.get(openblas.SWITCH, "").lower() in openblas.OFF:
        return f"{line}; pensieved too"
    wheel = openblas.wheel_openblas()
    found = openblas.system_openblas() or (wheel[0] if wheel else None)
    return f"{line}; pensieved preloads {shown(found) if found else 'none (none found)'} itself"
