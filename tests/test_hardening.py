"""The second security review's findings #7, #10 and #14, shown fixed against real daemons.

../shared/research/security-2026-12.md has each finding and its probe: a
reload whose default model cannot load (#7), the persisted prompt cache's
file (#10), a missing local model folder taken for a Hub repo id (#14).
#8 (secrets) and #15 (model names) are in tests/test_config.py and
tests/test_models_ctl.py, #12 (/health and /metrics) in tests/test_metrics.py.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import tomli_w

from pensieved.config import ModelConfig
from pensieved.models.registry import check_source, hub_repo
from tests.conftest import TINY_CONTEXT
from tests.daemon import run_pensievectl, run_pensieved, start_daemon

ASK = [{"role": "user", "content": "Say something."}]


def test_a_reload_whose_default_model_cannot_load_changes_nothing(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Before: the working model was unloaded, the broken config kept, every request a 500."""
    config = {"models": {"tiny": {"source": str(tiny_dir), "context_length": TINY_CONTEXT}}}
    daemon = start_daemon(tmp_path / "home", config)
    try:
        unloadable = tmp_path / "unloadable"
        unloadable.mkdir()
        (unloadable / "config.json").write_text('{"model_type": "llama"}')
        (unloadable / "model.safetensors").write_bytes(b"not safetensors")
        broken = {
            "server": {"port": daemon.port},
            "models": {
                **config["models"],
                "broken": {"source": str(unloadable), "default": True},
            },
        }
        daemon.config_path.write_bytes(tomli_w.dumps(broken).encode())
        refused = run_pensievectl(daemon, "reload")
        assert refused.returncode == 1
        assert "not reloaded: the new default model 'broken' did not load" in refused.stderr
        assert "the config in force stays" in refused.stderr
        # Still serving the old config, on the model that was loaded.
        message = daemon.client().messages.create(model="tiny", max_tokens=2, messages=ASK)
        assert message.model == "tiny"
        health = daemon.health()
        assert health["status"] == "ok"
        assert [m["name"] for m in health["models"]] == ["tiny"]
        assert health["models"][0]["loaded"] is True
        # A missing folder is refused before anything loads.
        broken["models"]["broken"]["source"] = str(tmp_path / "gone")
        daemon.config_path.write_bytes(tomli_w.dumps(broken).encode())
        missing = run_pensievectl(daemon, "reload")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        daemon.stop()


def test_health_says_degraded_when_the_default_model_cannot_serve(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Before: `/health` said ok while every request failed with a 500."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    config = {"models": {"tiny": {"source": str(copy), "context_length": TINY_CONTEXT}}}
    daemon = start_daemon(tmp_path / "home", config)
    try:
        assert run_pensievectl(daemon, "unload").returncode == 0
        (copy / "model.safetensors").write_bytes(b"damaged")
        with daemon.http() as http:
            failed = http.post(
                "/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": ASK}
            )
            brief = http.get("/health", headers={"x-api-key": ""}).json()
        assert failed.status_code == 500
        health = daemon.health()
        assert health["status"] == "degraded" and brief == {"status": "degraded"}
        assert "the default model 'tiny' cannot load" in health["reason"]
        doctor = run_pensievectl(daemon, "doctor")
        assert doctor.returncode == 1
        assert "degraded on" in doctor.stdout and "'tiny' cannot load" in doctor.stdout
        shutil.copy(tiny_dir / "model.safetensors", copy / "model.safetensors")
        assert run_pensievectl(daemon, "load").returncode == 0
        assert daemon.health()["status"] == "ok"
    finally:
        daemon.stop()


def test_the_persisted_prompt_cache_is_private_whole_and_tied_to_the_files(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Before: written in place 0644 in a 0755 folder, and known only by path and size."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    config = {
        "engine": {"persist_prompt_cache": True},
        "models": {"tiny": {"source": str(copy), "context_length": 4096}},
    }
    question = [{"role": "user", "content": "one two three " * 40}]
    home = tmp_path / "home"
    for _ in range(2):
        daemon = start_daemon(home, config)
        try:
            daemon.client().messages.create(model="tiny", max_tokens=2, messages=question)
        finally:
            assert daemon.stop() == 0
    folder = home / "models" / ".prompt-cache"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == ["tiny.safetensors"]  # no partial file left
    assert stat.S_IMODE((folder / "tiny.safetensors").stat().st_mode) == 0o600
    # The same folder and weight size, but another chat template: not the same model.
    tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{{ messages[0].content }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    daemon = start_daemon(home, config)
    try:
        assert "was made by another model; ignored" in daemon.log()
        assert "warm from disk" not in daemon.log()
    finally:
        daemon.stop()


def test_a_missing_local_folder_is_never_taken_for_a_hub_repo(tmp_path: Path) -> None:
    """Before: `/missing/dir` (or `models/x`) went to the Hub as a repo id."""
    (tmp_path / "models").mkdir()
    for source in ("/missing/model-dir", "./model", "~/no-such-model", "../up/model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            hub_repo(source)
    assert hub_repo("mlx-community/Qwen2.5-Coder-7B-Instruct-4bit") == (
        "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit"
    )
    assert hub_repo("hf:models/x") == "models/x"  # the hub, said outright
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_source(ModelConfig("m", str(tmp_path / "gone")))


def test_pensieved_says_in_one_line_that_the_model_folder_is_missing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[models.big]\nsource = "{tmp_path}/missing"\ndefault = true\n'
    )
    done = run_pensieved(home, "--config", str(home / "config.toml"))
    assert done.returncode == 1
    assert f"model directory {tmp_path}/missing does not exist" in done.stderr
    assert "Traceback" not in done.stderr and "Repo id" not in done.stderr
