"""Where files go on each platform: a control socket that always fits, caches Time Machine skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pensieved import paths
from tests.test_control import long_home


def test_on_macos_models_and_saved_caches_live_where_time_machine_does_not_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PENSIEVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    mac = paths.default_paths("darwin")
    library = tmp_path / "Library"
    # ~/Library/Caches is excluded from Time Machine backups by default; the
    # models (gigabytes, made again from their sources) and the saved prefix
    # caches (rewritten at every stop) go there.
    assert mac.models_dir == library / "Caches" / "Pensieve" / "models"
    # The config, token and socket stay in Application Support, the logs in Logs.
    support = library / "Application Support" / "Pensieve"
    assert (mac.config_file, mac.token_file) == (support / "config.toml", support / "token")
    assert mac.runtime_dir == paths.runtime_dir(support / "run", "darwin")
    assert mac.log_dir == library / "Logs" / "Pensieve"
    # Linux keeps its models with its data (XDG), as before.
    linux = paths.default_paths("linux")
    assert linux.models_dir == linux.data_dir / "models"


def test_a_long_home_gets_a_short_private_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its socket path is 106 bytes: it fits Linux's 108-byte sun_path, not macOS's 104.
    home = long_home(tmp_path, 88)
    monkeypatch.setenv("PENSIEVE_HOME", str(home))
    on_linux, on_macos = paths.default_paths("linux"), paths.default_paths("darwin")
    assert on_linux.runtime_dir == home / "run"
    socket_path = on_macos.control_socket
    assert socket_path.parent.parent == Path("/tmp")
    assert socket_path.parent.name.startswith(f"pensieve-{os.getuid()}-")
    assert len(os.fsencode(socket_path)) <= 103
    # Everything else stays under the home; the socket's dir is fixed for
    # that home, so that pensievectl finds the daemon's.
    assert on_macos.config_file.parent == home and on_macos.models_dir.parent == home
    assert paths.default_paths("darwin") == on_macos
    monkeypatch.setenv("PENSIEVE_HOME", str(long_home(tmp_path, 89)))
    assert paths.default_paths("darwin").runtime_dir != on_macos.runtime_dir
    monkeypatch.setenv("PENSIEVE_HOME", "/tmp/pv-short")
    assert paths.default_paths("darwin").runtime_dir == Path("/tmp/pv-short/run")


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another user takes root")
def test_a_runtime_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "run"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)  # nobody's, as if planted in /tmp
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        paths.private_dir(planted)
    link = tmp_path / "link"
    link.symlink_to(planted)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        paths.private_dir(link)
