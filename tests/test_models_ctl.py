"""Getting and managing models from pensievectl: name resolution's 404 rule, `pull`
from a local Hugging Face cache, `import` from an Ollama store, `models`, `rm`,
`setup-claude` and `env --model-tiers`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from safetensors.numpy import save_file

from pensieved.config import default_paths, parse_config
from pensieved.models import ollama
from pensieved.models.registry import ModelRegistry
from pensieved.wire.errors import NotFound
from tests.daemon import daemon_env, run_pensievectl, start_daemon
from tests.ggufs import write_llama_gguf

REPO_ID = "mlx-community/Tiny-Coder-4bit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

TWO_TIERS = {
    "models": {
        "coder": {"source": REPO_ID, "aliases": ["claude-*opus*", "claude-*sonnet*"]},
        "quick": {"source": "/models/quick", "aliases": ["claude-*haiku*"]},
    }
}


def write_config(home: Path, config: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(config))


def ctl(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`pensievectl ARGS` as the user runs it (a fresh process reads HF_* and OLLAMA_* anew)."""
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", *args],
        env=daemon_env(home),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


# Resolution


def registry(models: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry(parse_config({"models": models}, default_paths()))


def test_unmatched_name_is_404_when_aliases_route_and_no_model_is_default() -> None:
    tiers = registry(TWO_TIERS["models"])
    assert tiers.resolve("claude-opus-4-8").name == "coder"
    assert tiers.resolve("claude-haiku-4-5").name == "quick"
    assert tiers.resolve("quick").name == "quick"
    assert tiers.fallback is None
    with pytest.raises(NotFound) as raised:
        tiers.resolve("gpt-4o")
    assert raised.value.status == 404 and raised.value.error_type == "not_found_error"
    assert "'gpt-4o'" in raised.value.message


def test_default_true_catches_unmatched_names() -> None:
    models = {**TWO_TIERS["models"], "quick": {**TWO_TIERS["models"]["quick"], "default": True}}
    assert registry(models).resolve("gpt-4o").name == "quick"


def test_without_aliases_the_first_model_serves_every_name() -> None:
    plain = registry({"a": {"source": "/a"}, "b": {"source": "/b"}})
    assert plain.resolve("claude-opus-4-8").name == "a"
    assert plain.resolve("b").name == "b"


def test_a_star_alias_is_an_explicit_catch_all() -> None:
    models = {**TWO_TIERS["models"], "any": {"source": "/any", "aliases": ["*"]}}
    assert registry(models).resolve("gpt-4o").name == "any"
    assert registry(models).resolve("claude-haiku-4-5").name == "quick"  # order still counts


def test_the_daemon_answers_an_unmatched_name_with_404(tmp_path: Path, tiny_dir: Path) -> None:
    models = {
        "coder": {"source": str(tiny_dir), "aliases": ["claude-*opus*"]},
        "quick": {"source": str(tiny_dir), "aliases": ["claude-*haiku*"]},
    }
    daemon = start_daemon(tmp_path / "home", {"models": models})
    try:
        with daemon.http() as http:
            body = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            missing = http.post("/v1/messages", json={**body, "model": "gpt-4o"})
            assert missing.status_code == 404, missing.text
            error = missing.json()["error"]
            assert error["type"] == "not_found_error" and "'gpt-4o'" in error["message"]
            served = http.post("/v1/messages", json={**body, "model": "claude-haiku-4-5"})
            assert served.status_code == 200 and served.json()["model"] == "quick"
    finally:
        daemon.stop()


# pull


def hf_cache_with(cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """A Hugging Face cache holding `repo_id` as the hub client lays it out."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    weights = repo / "blobs" / "weights"
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}, str(weights))
    config = repo / "blobs" / "config"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (snapshot / "model.safetensors").symlink_to(Path("../..") / "blobs" / "weights")
    (snapshot / "config.json").symlink_to(Path("../..") / "blobs" / "config")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_pull_offline_finds_the_repo_in_the_local_cache(hf_cache: Path, tmp_path: Path) -> None:
    snapshot = hf_cache_with(hf_cache, REPO_ID)
    result = ctl(tmp_path / "home", "pull", REPO_ID)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(snapshot)
    snippet = result.stdout[result.stdout.index("[models.") :]
    assert tomli_w.dumps({"models": {"tiny-coder-4bit": {"source": REPO_ID}}}).strip() in snippet

    pinned = ctl(tmp_path / "home", "pull", REPO_ID, "--revision", COMMIT, "--name", "coder")
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.splitlines()[0] == str(snapshot)
    assert "[models.coder]" in pinned.stdout


def test_pull_offline_of_an_uncached_repo_says_so(hf_cache: Path, tmp_path: Path) -> None:
    result = ctl(tmp_path / "home", "pull", "mlx-community/Not-Here-4bit")
    assert result.returncode == 1
    assert "mlx-community/Not-Here-4bit: not in the local Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_refuses_a_repo_that_is_not_an_mlx_model(hf_cache: Path, tmp_path: Path) -> None:
    snapshot = hf_cache_with(hf_cache, "someone/gguf-only")
    (snapshot / "model.safetensors").unlink()
    result = ctl(tmp_path / "home", "pull", "someone/gguf-only")
    assert result.returncode == 1 and "not an MLX model" in result.stderr


# import from an Ollama store


def ollama_store(root: Path, gguf: Path, name: str = "tinyllama", tag: str = "1b") -> Path:
    """An Ollama store as `ollama pull` leaves it: a manifest naming content-addressed blobs."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    shutil.copyfile(gguf, blobs / f"sha256-{digest}")
    template = b"{{ .Prompt }}"
    template_digest = hashlib.sha256(template).hexdigest()
    (blobs / f"sha256-{template_digest}").write_bytes(template)
    layer = "application/vnd.ollama.image"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [
            {"mediaType": f"{layer}.model", "digest": f"sha256:{digest}", "size": 1},
            {"mediaType": f"{layer}.template", "digest": f"sha256:{template_digest}", "size": 1},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf)
    root = tmp_path / "ollama-models"
    ollama_store(root, gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def test_ollama_names_resolve_through_the_manifest_to_the_gguf_blob(
    store: Path, tmp_path: Path
) -> None:
    digest = hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()
    for reference in (
        "ollama:tinyllama:1b",
        "ollama:library/tinyllama:1b",
        "ollama:registry.ollama.ai/library/tinyllama:1b",
        str(store / "manifests" / "registry.ollama.ai" / "library" / "tinyllama" / "1b"),
    ):
        found = ollama.find(reference)
        assert found.blob == store / "blobs" / f"sha256-{digest}", reference
        assert found.name == "tinyllama-1b"
    assert ollama.is_reference(str(store / "blobs" / f"sha256-{digest}"))
    assert not ollama.is_reference(str(tmp_path / "tiny.gguf"))
    with pytest.raises(ollama.OllamaError, match="ollama pull"):
        ollama.find("ollama:tinyllama")  # :latest is not in the store
    with pytest.raises(ollama.OllamaError, match="ollama:NAME"):
        ollama.find("ollama:../../etc")


def test_import_from_the_ollama_store(store: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = ctl(home, "import", "ollama:tinyllama:1b")
    assert result.returncode == 0, result.stderr
    target = home / "models" / "tinyllama-1b"
    assert result.stdout.strip() == str(target)
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()

    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tinyllama" / "1b"
    by_path = ctl(home, "import", str(manifest), "--name", "by-path")
    assert by_path.returncode == 0, by_path.stderr
    assert (home / "models" / "by-path" / "model.safetensors").is_file()

    missing = ctl(home, "import", "ollama:qwen2.5-coder:7b")
    assert missing.returncode == 1 and "not in the Ollama store" in missing.stderr


# models and rm


def test_models_lists_configured_downloaded_and_imported(
    hf_cache: Path, tmp_path: Path, tiny_dir: Path
) -> None:
    home = tmp_path / "home"
    hf_cache_with(hf_cache, REPO_ID)
    shutil.copytree(tiny_dir, home / "models" / "my-import")
    write_config(
        home,
        {
            "models": {
                **TWO_TIERS["models"],
                "coder": {**TWO_TIERS["models"]["coder"], "context_length": 4096},
            }
        },
    )
    result = ctl(home, "models")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"coder  ({REPO_ID}; aliases claude-*opus*, claude-*sonnet*; context 4096;" in out
    assert "quick  (/models/quick; aliases claude-*haiku*)" in out
    assert "my-import  (imported, " in out and f"{REPO_ID}  (hugging face, " in out
    assert "loaded: none (the daemon is not running)" in out

    report = json.loads(ctl(home, "models", "--json").stdout)
    downloaded = {d["name"]: d for d in report["downloaded"]}
    assert downloaded["my-import"]["size_bytes"] == sum(
        f.stat().st_size for f in tiny_dir.iterdir()
    )
    assert downloaded[REPO_ID]["size_bytes"] > 0
    coder = next(m for m in report["configured"] if m["name"] == "coder")
    assert coder["on_disk"] == str(hf_cache / "models--mlx-community--Tiny-Coder-4bit")


def test_rm_asks_then_deletes_a_cached_repo(hf_cache: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    hf_cache_with(hf_cache, REPO_ID)
    declined = ctl(home, "rm", REPO_ID, stdin="n\n")
    assert declined.returncode == 1 and "Aborted" in declined.stderr
    assert (hf_cache / "models--mlx-community--Tiny-Coder-4bit").exists()
    accepted = ctl(home, "rm", REPO_ID, stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert not (hf_cache / "models--mlx-community--Tiny-Coder-4bit").exists()
    assert ctl(home, "rm", REPO_ID, "--yes").returncode == 1  # gone


def test_rm_refuses_the_embedded_model(tmp_path: Path) -> None:
    result = ctl(tmp_path / "home", "rm", "smollm2-135m-instruct", "--yes")
    assert result.returncode == 1 and "embedded model" in result.stderr


def test_rm_refuses_a_loaded_model_until_it_is_unloaded(tmp_path: Path, tiny_dir: Path) -> None:
    home = tmp_path / "home"
    imported = home / "models" / "mine"
    shutil.copytree(tiny_dir, imported)
    daemon = start_daemon(home, {"models": {"mine": {"source": str(imported), "default": True}}})
    try:
        shown = run_pensievectl(daemon, "models")
        assert shown.returncode == 0, shown.stderr
        loaded = shown.stdout[shown.stdout.index("loaded:") :]
        assert "mine  (" in loaded and "GB, context" in loaded

        refused = run_pensievectl(daemon, "rm", "mine", "--yes")
        assert refused.returncode == 1 and "is loaded as mine" in refused.stderr
        assert imported.is_dir()
        assert run_pensievectl(daemon, "unload", "--model", "mine").returncode == 0
        removed = run_pensievectl(daemon, "rm", "mine", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert not imported.exists() and "still configured: mine" in removed.stdout
    finally:
        daemon.stop()


# Claude Code: env --model-tiers and setup-claude


def test_env_prints_the_tiers_in_bash_and_fish(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_config(home, TWO_TIERS)
    plain = ctl(home, "env").stdout.splitlines()
    assert [line.split("=")[0] for line in plain[:2]] == [
        "export ANTHROPIC_BASE_URL",
        "export ANTHROPIC_AUTH_TOKEN",
    ]
    # Neither model is on disk: their contexts are unknown, so no compaction window.
    assert plain[2:] == [
        "export ANTHROPIC_DEFAULT_OPUS_MODEL=coder",
        "export ANTHROPIC_DEFAULT_SONNET_MODEL=coder",
        "export ANTHROPIC_DEFAULT_HAIKU_MODEL=quick",
        "export ANTHROPIC_MODEL=coder",
    ]
    assert ctl(home, "env", "--model-tiers").stdout.splitlines() == plain
    fish = ctl(home, "env", "--shell", "fish").stdout.splitlines()
    assert fish[-1] == "set -gx ANTHROPIC_MODEL coder"


@pytest.fixture
def claude_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "claude"
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(folder))
    return folder


def test_setup_claude_merges_env_keeps_the_rest_and_undo_restores_bytes(
    tmp_path: Path, claude_dir: Path
) -> None:
    home = tmp_path / "home"
    write_config(home, TWO_TIERS)
    claude_dir.mkdir()
    settings = claude_dir / "settings.json"
    # The user's own formatting and keys, which a JSON round trip would not keep.
    original = (
        b'{"permissions": {"allow": ["Bash(ls:*)"]},\n  "env": {"FOO": "bar", '
        b'"ANTHROPIC_MODEL": "claude-opus-4-8"}, "theme": "dark"}'
    )
    settings.write_bytes(original)
    settings.chmod(0o640)

    first = ctl(home, "setup-claude")
    assert first.returncode == 0, first.stderr
    assert "backed up" in first.stdout
    merged = json.loads(settings.read_bytes())
    token = (home / "token").read_text().strip()
    assert merged["permissions"] == {"allow": ["Bash(ls:*)"]} and merged["theme"] == "dark"
    assert merged["env"] == {
        "FOO": "bar",
        "ANTHROPIC_MODEL": "coder",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:7777",
        "ANTHROPIC_AUTH_TOKEN": token,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "coder",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "coder",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "quick",
    }
    # It holds the token now: private, whatever mode it had (undo puts that back).
    assert os.stat(settings).st_mode & 0o777 == 0o600

    # A second run (say after changing the tiers) keeps the first backup.
    second = ctl(home, "setup-claude")
    assert second.returncode == 0 and "backed up" not in second.stdout
    assert (claude_dir / "settings.json.pensieve-backup").read_bytes() == original

    undone = ctl(home, "setup-claude", "--undo")
    assert undone.returncode == 0, undone.stderr
    assert settings.read_bytes() == original
    assert os.stat(settings).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in claude_dir.iterdir()) == ["settings.json"]
    again = ctl(home, "setup-claude", "--undo")
    assert again.returncode == 1 and "nothing to undo" in again.stderr


def test_setup_claude_without_a_settings_file_and_undo_removes_it(
    tmp_path: Path, claude_dir: Path
) -> None:
    home = tmp_path / "home"
    result = ctl(home, "setup-claude")
    assert result.returncode == 0, result.stderr
    settings = claude_dir / "settings.json"
    env = json.loads(settings.read_text())["env"]
    # The default config: one model, aliases claude-*, the default: every tier is it.
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "smollm2-135m-instruct"
    assert os.stat(settings).st_mode & 0o777 == 0o600  # it holds the token
    assert ctl(home, "setup-claude", "--undo").returncode == 0
    assert not claude_dir.joinpath("settings.json").exists()
    assert list(claude_dir.iterdir()) == []


def test_setup_claude_leaves_a_broken_settings_file_alone(tmp_path: Path, claude_dir: Path) -> None:
    claude_dir.mkdir()
    (claude_dir / "settings.json").write_text("{not json")
    result = ctl(tmp_path / "home", "setup-claude")
    assert result.returncode == 1 and "not valid JSON" in result.stderr
    assert (claude_dir / "settings.json").read_text() == "{not json"
    assert sorted(p.name for p in claude_dir.iterdir()) == ["settings.json"]
