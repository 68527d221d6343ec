"""OpenBLAS for MLX's CPU backend (Linux): found, checked, and preloaded.

Measured on a 2-core x86 machine with SmolLM2-135M (see docs/performance.md):
the `mlx[cpu]` wheel bundles the reference BLAS, and quantized matmuls on
the CPU are slow. Dequantizing to float32 gains nothing on the reference
BLAS, but with OpenBLAS preloaded, prefill runs an order of magnitude
faster and decode about twice as fast. So: preload OpenBLAS (by
re-executing the daemon with LD_PRELOAD, which must be set before the
process starts), and dequantize small models when it is active.

Which OpenBLAS, in order: a library named by `PENSIEVE_OPENBLAS=/path`; the
system's (a distribution keeps it current); else the wheel pyproject.toml
installs (why those wheels: its comment). The wheels' libopenblas needs
libgfortran.so.5, which a fresh machine lacks; mlx-cpu's wheel bundles a
renamed copy (`mlx_cpu.libs/libgfortran-<hash>.so.5.0.0`), so a private
directory of symlinks giving it its usual name goes on LD_LIBRARY_PATH.
Before re-executing, a child process loads the library with that exact
environment and runs a matmul: a library the loader cannot resolve would
stop the daemon from starting at all, and one built for another CPU dies of
SIGILL. Any failure leaves the reference BLAS, with the reason in
`blas_report()` (the startup log and /health say it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pensieved.paths import default_paths, private_dir

log = logging.getLogger(__name__)

# "0" keeps the reference BLAS (the bench's baseline); a path names the library to use.
SWITCH = "PENSIEVE_OPENBLAS"
# Set in the re-executed process, to the library it preloads, so that it never
# re-executes again. Its children inherit it along with the preload.
REEXEC_MARK = "PENSIEVE_OPENBLAS_PRELOADED"
# Forces OpenBLAS's kernel in a DYNAMIC_ARCH build (one that carries a kernel per CPU).
CORETYPE = "OPENBLAS_CORETYPE"

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
# The wheels pyproject.toml brings (one per architecture), in order of preference.
WHEELS = ("ngsolve-openblas", "cmeel-openblas")
GFORTRAN = "libgfortran.so.5"
# OpenBLAS's threads spin while they wait for each other, so one that loses its
# core to another process (Claude Code, an editor, a build) stalls every matmul:
# on a busy 2-core machine, 2 threads prefilled and decoded several times
# slower and far less steadily than 1 (measured while #22 was built). So one
# core is left to the rest, unless the environment sets one of these.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
PROBE_TIMEOUT_S = 60.0
# Loads the library as the re-executed process will (the same environment),
# then multiplies two matrices through cblas_sgemm, which MLX calls.
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 64
a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))
c = (ctypes.c_float * (n * n))()
one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
lib.cblas_sgemm(101, 111, 111, n, n, n, one, a, n, a, n, zero, c, n)
sys.exit(0 if c[0] == n and c[n * n - 1] == n else "cblas_sgemm computed a wrong product")
"""
OFF = ("0", "false", "no", "off")
# Why this process runs the reference BLAS, where reexec_with_openblas decided so.
_fallback: str | None = None


class NoOpenBLAS(Exception):
    """Why OpenBLAS cannot be preloaded here; the reference BLAS stays."""


@dataclass(frozen=True)
class Preload:
    """An OpenBLAS to preload, and what it takes to load it."""

    library: Path
    source: str  # "system", "<distribution> wheel", or "PENSIEVE_OPENBLAS"
    shim: Path | None = None  # the libgfortran.so.5 link, to put on LD_LIBRARY_PATH

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env["LD_PRELOAD"] = _joined(str(self.library), base.get("LD_PRELOAD", ""), " ")
        if self.shim is not None:
            # Never a trailing ":": an empty entry means the current directory.
            env["LD_LIBRARY_PATH"] = _joined(str(self.shim), base.get("LD_LIBRARY_PATH", ""), ":")
        if not any(name in base for name in THREAD_VARIABLES):
            env["OPENBLAS_NUM_THREADS"] = str(openblas_threads())
        env[REEXEC_MARK] = str(self.library)
        return env


def openblas_threads() -> int:
    """OpenBLAS's threads by default: the CPUs this process may use, less one."""
    if sys.platform == "linux":  # the CPUs of its cgroup or taskset, not all the machine's
        return max(1, len(os.sched_getaffinity(0)) - 1)
    return max(1, (os.cpu_count() or 1) - 1)


def _joined(first: str, rest: str, separator: str) -> str:
    return f"{first}{separator}{rest}" if rest.strip(separator + " ") else first


def system_openblas() -> Path | None:
    """The system's OpenBLAS shared library, if there is one."""
    for candidate in _SYSTEM_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    found = ctypes.util.find_library("openblas")
    return Path(found) if found and Path(found).is_absolute() else None


def wheel_openblas(search_path: Sequence[str] | None = None) -> tuple[Path, str] | None:
    """(library, distribution) of an installed OpenBLAS wheel (`WHEELS`), if any.

    `search_path`: where to look for installed distributions (default: sys.path).
    The wheels are found through their metadata, never imported (ngsolve-openblas's
    `__init__` loads the library, which fails without libgfortran).
    """
    path = list(sys.path if search_path is None else search_path)
    for name in WHEELS:
        for dist in metadata.distributions(name=name, path=path):
            libraries = sorted(
                (Path(str(dist.locate_file(f))) for f in dist.files or () if _is_openblas(f.name)),
                # cmeel ships libopenblas.so, .so.0 and .so.0.3 (copies): take its soname.
                key=lambda p: (p.name != "libopenblas.so.0", p.name),
            )
            for library in libraries:
                if library.is_file():
                    return library, name
    return None


def _is_openblas(filename: str) -> bool:
    return filename.startswith("libopenblas") and ".so" in filename


def gfortran_links(libs_dir: Path | None = None) -> dict[str, Path]:
    """The links that let a wheel's libopenblas find libgfortran.so.5 in mlx-cpu's wheel.

    `libs_dir`: mlx-cpu's `mlx_cpu.libs` (default: the installed one). auditwheel
    renamed the copies there, and their own dependencies (x86_64: libquadmath)
    too, which the loader looks up by those names beside the link.
    """
    libs = libs_dir if libs_dir is not None else _mlx_cpu_libs()
    fortran = sorted(libs.glob("libgfortran-*.so.5*")) if libs.is_dir() else []
    if not fortran:
        raise NoOpenBLAS(f"OpenBLAS needs {GFORTRAN}, which neither the system nor {libs} has")
    links = {GFORTRAN: fortran[0]}
    links.update((dep.name, dep) for dep in sorted(libs.glob("libquadmath-*")))
    return links


def _mlx_cpu_libs() -> Path:
    try:
        return Path(str(metadata.distribution("mlx-cpu").locate_file("mlx_cpu.libs")))
    except metadata.PackageNotFoundError:
        raise NoOpenBLAS(
            f"OpenBLAS needs {GFORTRAN}; neither the system nor mlx-cpu has it"
        ) from None


def prepare_shim(links: Mapping[str, Path], runtime_dir: Path) -> Path:
    """A private directory under `runtime_dir` holding `links` (name -> target).

    Named after its links' targets, so daemons from the same venv share one,
    and a pip upgrade that renames mlx-cpu's hashed libraries gets a new one
    (the old ones, whose links now dangle, are removed). It is made whole in a
    temporary directory and renamed into place, so a concurrent daemon never
    sees half of it. `runtime_dir` is made 0700 and must be this user's: what
    is on LD_LIBRARY_PATH runs as the daemon.
    """
    root = private_dir(runtime_dir)
    digest = hashlib.sha256(
        json.dumps(sorted((name, str(target)) for name, target in links.items())).encode()
    ).hexdigest()[:12]
    shim = root / f"blas-{digest}"
    if not _shim_holds(shim, links):
        staging = Path(tempfile.mkdtemp(prefix=f".{shim.name}-", dir=root))  # 0700
        for name, target in links.items():
            (staging / name).symlink_to(target)
        if (shim.exists() or shim.is_symlink()) and not _shim_holds(shim, links):
            _remove(shim)  # not what it should be (and not a concurrent daemon's): make it again
        try:
            staging.rename(shim)
        except OSError:
            _remove(staging)
            if not _shim_holds(shim, links):  # not a concurrent daemon's identical one
                raise
    for other in root.glob("blas-*"):
        if other != shim and other.is_dir() and not other.is_symlink() and _dangles(other):
            _remove(other)
    return shim


def _shim_holds(shim: Path, links: Mapping[str, Path]) -> bool:
    try:
        info = shim.lstat()
        return (
            shim.is_dir()
            and not shim.is_symlink()
            and info.st_uid == os.getuid()
            and info.st_mode & 0o077 == 0
            and all(os.readlink(shim / name) == str(target) for name, target in links.items())
        )
    except OSError:
        return False


def _dangles(shim: Path) -> bool:
    return any(link.is_symlink() and not link.exists() for link in shim.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def choose_openblas(
    environ: Mapping[str, str],
    runtime_dir: Path,
    search_path: Sequence[str] | None = None,
    libs_dir: Path | None = None,
) -> Preload:
    """The OpenBLAS to preload, or `NoOpenBLAS` saying why there is none.

    `search_path` and `libs_dir`: where the wheels are (see `wheel_openblas`
    and `gfortran_links`).
    """
    named = environ.get(SWITCH, "")
    if "/" in named:
        if not Path(named).is_file():
            raise NoOpenBLAS(f"{SWITCH}={named}: no such file")
        return Preload(Path(named), SWITCH, _shim_if_needed(runtime_dir, libs_dir))
    system = system_openblas()
    if system is not None:
        # A distribution's OpenBLAS comes with its own libgfortran.
        return Preload(system, "system")
    wheel = wheel_openblas(search_path)
    if wheel is None:
        raise NoOpenBLAS(
            "no OpenBLAS: neither the system's nor a wheel's "
            f"({' or '.join(WHEELS)}; `make setup` installs one)"
        )
    library, name = wheel
    return Preload(library, f"{name} wheel", _shim_if_needed(runtime_dir, libs_dir))


def _shim_if_needed(runtime_dir: Path, libs_dir: Path | None) -> Path | None:
    if ctypes.util.find_library("gfortran") == GFORTRAN:
        return None  # the system's own is found without help
    links = gfortran_links(libs_dir)
    try:
        return prepare_shim(links, runtime_dir)
    except OSError as exc:
        raise NoOpenBLAS(f"cannot make the {GFORTRAN} link under {runtime_dir}: {exc}") from exc


def probe(preload: Preload, env: Mapping[str, str]) -> None:
    """Load `preload` in a child process as the re-executed one would; `NoOpenBLAS` if it fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, str(preload.library)],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoOpenBLAS(f"{preload.library} could not be tried: {exc}") from exc
    if done.returncode == 0:
        return
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        hint = " (built for another CPU)" if name == "SIGILL" else ""
        raise NoOpenBLAS(f"{preload.library} crashed a trial process with {name}{hint}")
    lines = done.stderr.strip().splitlines()
    raise NoOpenBLAS(f"{preload.library} failed to load: {lines[-1] if lines else done.returncode}")


def reexec_with_openblas(
    command: list[str], runtime_dir: Path | None = None, search_path: Sequence[str] | None = None
) -> None:
    """Replace this process with `command`, run with OpenBLAS preloaded (Linux only).

    Returns without doing anything where that is not possible or not wanted
    (`PENSIEVE_OPENBLAS=0`, already preloaded), and never raises: a failure
    leaves the reference BLAS, and `blas_report()` says why.
    """
    global _fallback
    if sys.platform != "linux":
        return
    if os.environ.get(SWITCH, "").lower() in OFF:
        _fallback = f"turned off by {SWITCH}={os.environ[SWITCH]}"
        return
    if os.environ.get(REEXEC_MARK) or openblas_active():
        return
    try:
        runtime = runtime_dir if runtime_dir is not None else default_paths().runtime_dir
        preload = choose_openblas(os.environ, runtime, search_path)
        env = preload.environment(os.environ)
        probe(preload, env)
        os.execve(command[0], command, env)
    except NoOpenBLAS as exc:
        _fallback = str(exc)
    except Exception as exc:  # anything else still must not stop the daemon
        _fallback = f"preparing OpenBLAS failed: {type(exc).__name__}: {exc}"


def mapped_openblas() -> Path | None:
    """The libopenblas mapped into this process, whose cblas calls MLX then makes.

    numpy's bundled `libscipy_openblas64_` does not count: its symbols are
    prefixed, so MLX still calls the reference BLAS beside it.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line[line.find("/") :] if "/" in line else ""
        if path.rsplit("/", 1)[-1].startswith("libopenblas"):
            return Path(path)
    return None


def openblas_active() -> bool:
    """Whether an OpenBLAS is mapped, and so serves MLX's cblas calls."""
    return mapped_openblas() is not None


def fallback_reason() -> str | None:
    """Why this process did not preload OpenBLAS, where it tried and failed or was told not to."""
    return _fallback
