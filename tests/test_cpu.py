"""The CPU-backend speed path: OpenBLAS preloaded where it can be, dequantizing
that keeps the model's answers."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from pensieved.engine import cpu, openblas
from tests.daemon import Daemon, daemon_running


def test_dequantized_model_computes_the_same_logits(smollm_dir: Path) -> None:
    quantized, tokenizer = mlx_lm.load(str(smollm_dir))[:2]
    dense = mlx_lm.load(str(smollm_dir))[0]
    assert cpu.should_dequantize("always", dense)
    cpu.dequantize(dense)
    assert not cpu.should_dequantize("always", dense)  # nothing quantized is left
    assert all(p.dtype == mx.float32 for _, p in _leaves(dense.parameters()))
    tokens = mx.array([tokenizer.encode("The capital of France is")])
    expected = quantized(tokens)[0, -1].astype(mx.float32)
    got = dense(tokens)[0, -1]
    assert mx.argmax(got).item() == mx.argmax(expected).item()
    assert mx.abs(got - expected).max().item() < 0.05 * mx.abs(expected).max().item()


def test_never_means_never(smollm_dir: Path) -> None:
    model = mlx_lm.load(str(smollm_dir))[0]
    assert not cpu.should_dequantize("never", model)


def test_auto_follows_the_backend(smollm_dir: Path) -> None:
    model = mlx_lm.load(str(smollm_dir))[0]
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert cpu.should_dequantize("auto", model) == (on_cpu and openblas.openblas_active())


def test_numpys_bundled_openblas_does_not_count() -> None:
    import numpy  # maps libscipy_openblas64_, whose symbols MLX never calls

    assert numpy.__version__
    preloaded = "libopenblas" in os.environ.get("LD_PRELOAD", "")
    assert openblas.openblas_active() == preloaded


def _without_openblas(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less an OpenBLAS preload pytest itself may run with."""
    env = {k: v for k, v in environ.items() if k not in ("LD_LIBRARY_PATH", openblas.REEXEC_MARK)}
    preloads = environ.get("LD_PRELOAD", "").split()
    env["LD_PRELOAD"] = " ".join(p for p in preloads if "libopenblas" not in p)
    return env


def test_daemon_preloads_openblas(tiny_daemon: Daemon) -> None:
    if sys.platform != "linux" or os.environ.get(openblas.SWITCH) == "0":
        pytest.skip("OpenBLAS is for Linux, and PENSIEVE_OPENBLAS=0 turns it off")
    backend = tiny_daemon.health()["backend"]
    assert backend["device"] == "cpu" and backend["openblas"] is True
    assert backend["blas"].startswith("OpenBLAS 0.3")  # and where it came from
    assert backend["blas_kernel"] and backend["blas_fallback"] is None
    assert f"CPU backend: {backend['blas']}, kernel {backend['blas_kernel']}" in tiny_daemon.log()


def test_a_broken_openblas_leaves_the_reference_blas(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform != "linux":
        pytest.skip("OpenBLAS is preloaded on Linux only")
    broken = tmp_path / "libopenblas.so.0"
    broken.write_bytes(b"\x7fELF, but not a library")
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", openblas.REEXEC_MARK):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(openblas.SWITCH, str(broken))  # the daemon's seam: which library to preload
    config = {"models": {"tiny": tiny_config["models"]["tiny"]}}
    with daemon_running(tmp_path / "home", config) as daemon:
        backend = daemon.health()["backend"]
        log = daemon.log()
    assert backend["openblas"] is False
    assert backend["blas"] == "reference BLAS (mlx-cpu wheel)"
    assert backend["blas_fallback"].startswith(f"{broken} failed to load")
    assert f"WARNING pensieved.service.server: CPU backend: {backend['blas']}: {broken}" in log


def test_the_openblas_wheel_is_found() -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("pyproject.toml brings an OpenBLAS wheel on Linux x86_64 and aarch64")
    found = openblas.wheel_openblas()
    assert found is not None, "the OpenBLAS wheel is missing: run `make setup`"
    library, distribution = found
    assert distribution in openblas.WHEELS
    assert library.is_file() and library.name.startswith("libopenblas")


def test_a_wheel_without_its_library_is_not_found(tmp_path: Path) -> None:
    info = tmp_path / "ngsolve_openblas-0.3.33.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ngsolve-openblas\nVersion: 0.3.33\n"
    )
    (info / "RECORD").write_text("ngsolve_openblas/libopenblasp-r0.3.33.so,,\n")
    assert openblas.wheel_openblas([str(tmp_path)]) is None
    assert openblas.wheel_openblas([str(tmp_path / "nothing")]) is None
    (tmp_path / "ngsolve_openblas").mkdir()
    (tmp_path / "ngsolve_openblas" / "libopenblasp-r0.3.33.so").write_bytes(b"")
    found = (tmp_path / "ngsolve_openblas" / "libopenblasp-r0.3.33.so", "ngsolve-openblas")
    assert openblas.wheel_openblas([str(tmp_path)]) == found


def test_no_gfortran_means_no_openblas(tmp_path: Path) -> None:
    with pytest.raises(openblas.NoOpenBLAS, match=r"libgfortran\.so\.5"):
        openblas.gfortran_links(tmp_path)


def _fake_mlx_libs(root: Path, digest: str) -> Path:
    root.mkdir(parents=True)
    for name in (f"libgfortran-{digest}.so.5.0.0", f"libquadmath-{digest}.so.0.0.0"):
        (root / name).write_bytes(b"")
    return root


def test_the_gfortran_links_are_private_and_follow_upgrades(tmp_path: Path) -> None:
    first = openblas.gfortran_links(_fake_mlx_libs(tmp_path / "libs-1", "aaaa1111"))
    assert set(first) == {"libgfortran.so.5", "libquadmath-aaaa1111.so.0.0.0"}
    run = tmp_path / "run"
    shim = openblas.prepare_shim(first, run)
    assert shim.parent == run and shim.name.startswith("blas-")
    for directory in (run, shim):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.stat().st_uid == os.getuid()
    assert {p.name: Path(os.readlink(p)) for p in shim.iterdir()} == first
    assert openblas.prepare_shim(first, run) == shim  # the next start uses it as it is

    # A link pointed elsewhere is not trusted: the directory is made again.
    (shim / "libgfortran.so.5").unlink()
    (shim / "libgfortran.so.5").symlink_to(tmp_path / "elsewhere")
    assert openblas.prepare_shim(first, run) == shim
    assert Path(os.readlink(shim / "libgfortran.so.5")) == first["libgfortran.so.5"]

    # A pip upgrade renames mlx-cpu's hashed copies: a new directory, the old one goes.
    shutil.rmtree(tmp_path / "libs-1")
    second = openblas.gfortran_links(_fake_mlx_libs(tmp_path / "libs-2", "bbbb2222"))
    upgraded = openblas.prepare_shim(second, run)
    assert upgraded != shim and not shim.exists()
    assert [p.name for p in run.iterdir()] == [upgraded.name]  # no staging left behind


def test_the_wheel_loads_through_the_links(tmp_path: Path) -> None:
    found = openblas.wheel_openblas()
    if sys.platform != "linux" or found is None:
        pytest.skip("no OpenBLAS wheel here")
    library, name = found
    shim = openblas.prepare_shim(openblas.gfortran_links(), tmp_path / "run")
    preload = openblas.Preload(library, f"{name} wheel", shim)
    openblas.probe(preload, preload.environment(os.environ))  # a child loads it and multiplies
    if ctypes.util.find_library("gfortran") is None:
        # Without the links the loader cannot resolve libgfortran.so.5: the trial
        # says so, where preloading it would stop the daemon from starting.
        bare = openblas.Preload(library, f"{name} wheel")
        with pytest.raises(openblas.NoOpenBLAS, match=r"libgfortran\.so\.5"):
            openblas.probe(bare, bare.environment(_without_openblas(os.environ)))


_REPORT = """
import json, sys
from pensieved.engine import cpu, openblas
openblas.reexec_with_openblas([sys.executable, "-c", sys.argv[1], sys.argv[1]])
import mlx.core
print(json.dumps({"openblas": openblas.openblas_active(), **cpu.blas_report().health()}))
"""


def _report_from_a_child(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _REPORT, _REPORT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return report


def test_openblas_can_be_turned_off(pensieve_home: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("OpenBLAS is preloaded on Linux only")
    env = {**_without_openblas(os.environ), openblas.SWITCH: "0"}
    assert _report_from_a_child(env) == {
        "openblas": False,
        "blas": "reference BLAS (mlx-cpu wheel)",
        "blas_kernel": None,
        "blas_threads": None,
        "blas_coretype": None,
        "blas_fallback": "turned off by PENSIEVE_OPENBLAS=0",
    }
    if openblas.wheel_openblas() is not None or openblas.system_openblas() is not None:
        env[openblas.SWITCH] = "1"
        env["OPENBLAS_CORETYPE"] = "Haswell"  # OpenBLAS's name for AVX2 kernels
        report = _report_from_a_child(env)
        assert report["openblas"] is True and report["blas_coretype"] == "Haswell"
        assert report["blas_fallback"] is None
        if not any(name in os.environ for name in openblas.THREAD_VARIABLES):
            assert report["blas_threads"] == openblas.openblas_threads()


def test_the_preload_environment_keeps_what_was_there(tmp_path: Path) -> None:
    preload = openblas.Preload(tmp_path / "libopenblas.so.0", "system", tmp_path / "run" / "blas-x")
    env = preload.environment({"LD_PRELOAD": "libother.so", "LD_LIBRARY_PATH": ""})
    assert env["LD_PRELOAD"] == f"{preload.library} libother.so"
    # No empty entry, which would put the current directory on the loader's path.
    assert env["LD_LIBRARY_PATH"] == str(preload.shim)
    assert env["OPENBLAS_NUM_THREADS"] == str(openblas.openblas_threads())
    assert env[openblas.REEXEC_MARK] == str(preload.library)
    chosen = preload.environment({"OMP_NUM_THREADS": "3", "LD_LIBRARY_PATH": "/opt/lib"})
    assert "OPENBLAS_NUM_THREADS" not in chosen
    assert chosen["LD_LIBRARY_PATH"] == f"{preload.shim}:/opt/lib"


def _leaves(tree: object) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(tree))


def test_non_affine_quantization_is_left_alone() -> None:
    import mlx.nn as nn

    class Tiny(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(64, 64)

    model = Tiny()
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4")
    assert type(model.layer).__name__ == "QuantizedLinear"
    # mxfp4 has no (scales, biases) pair to undo: never dequantized, never crashes.
    assert not cpu.should_dequantize("always", model)
    cpu.dequantize(model)
    assert type(model.layer).__name__ == "QuantizedLinear"
