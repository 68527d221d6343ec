"""The Makefile's Python (tools/venv.sh), with fake interpreters on PATH.

A stock Mac's `python3` is Apple's 3.9, which pip refuses for this project,
and a `.venv` made by it survives a later run with another Python. Each fake
`python3.X` says its version when asked and is this test's own Python for
everything else (the platform check, `-m venv`), so what is chosen is real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "venv.sh"
# What the script and make need besides the interpreters under test.
UTILITIES = ("sh", "dirname", "rm", "grep", "make")


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_python(path: Path, version: str, preflight: str | None = None) -> Path:
    """A Python that says it is `version`; `preflight` is what the platform check says."""
    check = f'echo "{preflight}" >&2; exit 1' if preflight else f'exec {sys.executable} "$@"'
    return write_executable(
        path,
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"    *version_info*) echo {version} ;;\n"
        f"    -I\\ *preflight.py) {check} ;;\n"
        f'    *) exec {sys.executable} "$@" ;;\n'
        "esac\n",
    )


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """PATH's only directories: fakes here, the utilities in ../utilities."""
    utilities = tmp_path / "utilities"
    utilities.mkdir()
    for name in UTILITIES:
        found = shutil.which(name)
        assert found, name
        (utilities / name).symlink_to(found)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    return fakes


def venv_sh(
    bin_dir: Path, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}:{bin_dir.parent / 'utilities'}"
    return subprocess.run(
        ["/bin/sh", str(SCRIPT), *args],
        env={"PATH": path, "HOME": str(bin_dir.parent / "user"), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_picks_the_newest_python_that_can_run_pensieve(bin_dir: Path) -> None:
    fake_python(bin_dir / "python3", "3.9")
    fake_python(bin_dir / "python3.12", "3.12")
    newest = fake_python(bin_dir / "python3.13", "3.13")
    picked = venv_sh(bin_dir, "pick")
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout == f"{newest}\n"


def test_skips_a_broken_or_old_python(bin_dir: Path) -> None:
    write_executable(bin_dir / "python3.13", "#!/bin/sh\nexit 127\n")  # a dangling install
    fake_python(bin_dir / "python3.12", "3.10")
    chosen = fake_python(bin_dir / "python3.11", "3.11")
    fake_python(bin_dir / "python3", "3.9")
    assert venv_sh(bin_dir, "pick").stdout == f"{chosen}\n"


def test_a_stock_mac_is_told_what_to_install_in_one_line(bin_dir: Path) -> None:
    fake_python(bin_dir / "python3", "3.9")  # the Command Line Tools' python3
    refused = venv_sh(bin_dir, "pick")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith("make: Pensieve needs Python 3.11 or newer")
    assert "(python3 is Python 3.9)" in refused.stderr
    assert "brew install python@3.13" in refused.stderr
    assert "make PYTHON=" in refused.stderr


def test_uv_is_the_fallback(bin_dir: Path) -> None:
    fake_python(bin_dir / "python3", "3.9")
    write_executable(bin_dir / "uv", "#!/bin/sh\nexit 0\n")
    assert venv_sh(bin_dir, "pick").stdout == "uv\n"


def test_an_explicit_python_must_pass_too(bin_dir: Path) -> None:
    old = fake_python(bin_dir / "python3", "3.9")
    good = fake_python(bin_dir / "python3.12", "3.12")
    refused = venv_sh(bin_dir, "pick", PYTHON=str(old))
    assert refused.returncode == 1
    assert refused.stderr == f"make: PYTHON={old} cannot run Pensieve: {old} is Python 3.9\n"
    assert venv_sh(bin_dir, "pick", PYTHON=str(good)).stdout == f"{good}\n"


def test_the_platform_checks_sentence_is_passed_on(bin_dir: Path) -> None:
    """An x86_64 Python on an Apple-silicon Mac: the check's own sentence, not pip's."""
    sentence = "Pensieve needs a Mac with Apple silicon: this Python runs under Rosetta."
    fake_python(bin_dir / "python3.13", "3.13", preflight=sentence)
    fake_python(bin_dir / "python3", "3.9")
    refused = venv_sh(bin_dir, "pick")
    assert refused.returncode == 1
    assert refused.stderr == f"make: python3.13: {sentence}\n"


def test_a_venv_made_by_a_wrong_python_is_made_again(bin_dir: Path, tmp_path: Path) -> None:
    """`python3.12 -m venv .venv` over a 3.9 venv would keep bin/python -> 3.9."""
    venv = tmp_path / ".venv"
    fake_python(venv / "bin" / "python", "3.9")
    (venv / "left-by-3.9").touch()
    fake_python(bin_dir / "python3.12", "3.12")
    made = venv_sh(bin_dir, "create", str(venv))
    assert made.returncode == 0, made.stderr
    assert f"{venv} cannot run Pensieve ({venv}/bin/python is Python 3.9)" in made.stderr
    assert not (venv / "left-by-3.9").exists()
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout == "True\n"
    # A good one is kept as it is.
    (venv / "kept").touch()
    assert venv_sh(bin_dir, "create", str(venv)).returncode == 0
    assert (venv / "kept").exists()


def test_check_forgets_the_stamp_of_a_venv_that_cannot_run(bin_dir: Path, tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    stamp = venv / ".installed-stamp"
    fake_python(venv / "bin" / "python", "3.12")
    stamp.touch()
    venv_sh(bin_dir, "check", str(venv), str(stamp))
    assert stamp.exists()
    # Homebrew removed the Python this venv was made with.
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3.12")
    venv_sh(bin_dir, "check", str(venv), str(stamp))
    assert not stamp.exists()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile and what it runs, copied: make runs there, not in this checkout."""
    copy = tmp_path / "checkout"
    for name in ("Makefile", "pyproject.toml", "tools/venv.sh"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, copy / name)
    preflight = Path("daemon/pensieved/service/preflight.py")
    (copy / preflight).parent.mkdir(parents=True)
    shutil.copy(ROOT / preflight, copy / preflight)
    return copy


def make(bin_dir: Path, checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}:{bin_dir.parent / 'utilities'}"
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        env={"PATH": path, "HOME": str(bin_dir.parent / "user")},
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_rebuilds_a_venv_left_by_apples_python(bin_dir: Path, checkout: Path) -> None:
    """The venv Apple's 3.9 left (stamp and all) is made again by the next `make`."""
    fake_python(checkout / ".venv" / "bin" / "python", "3.9")
    stamp = checkout / ".venv" / ".installed-stamp"
    stamp.touch()
    fake_python(bin_dir / "python3.12", "3.12")
    planned = make(bin_dir, checkout, "-n", "setup")
    assert planned.returncode == 0, planned.stderr
    assert not stamp.exists()
    assert planned.stdout.splitlines()[0] == "sh tools/venv.sh create .venv"


@pytest.mark.parametrize(
    "service_file",
    ["Library/LaunchAgents/dev.pensieve.daemon.plist", ".config/systemd/user/pensieve.service"],
)
def test_make_clean_warns_when_the_login_service_runs_this_venv(
    bin_dir: Path, checkout: Path, service_file: str
) -> None:
    fake_python(checkout / ".venv" / "bin" / "python", "3.12")
    installed = bin_dir.parent / "user" / service_file
    installed.parent.mkdir(parents=True)
    installed.write_text(f"<string>{checkout}/.venv/bin/pensieved</string>\n")
    cleaned = make(bin_dir, checkout, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (checkout / ".venv").exists()
    assert cleaned.stderr == (
        f"make: warning: the login service {installed} runs {checkout}/.venv/bin/pensieved, "
        "which make clean deletes: run make uninstall first (or make install again after)\n"
    )
    # Another checkout's service is none of this one's business.
    fake_python(checkout / ".venv" / "bin" / "python", "3.12")
    installed.write_text("<string>/elsewhere/.venv/bin/pensieved</string>\n")
    assert make(bin_dir, checkout, "clean").stderr == ""
