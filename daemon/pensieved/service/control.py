"""The control socket: JSON lines over a Unix socket, served inside the daemon.

One request object per line (`{"command": "status"}`), one response object
per line (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`). The socket
is 0600 in a 0700 directory of this user's, and a peer of another uid is
refused (SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS). A socket file left
by a crash is found by a connect probe and replaced; one that answers means a
daemon is already running, and it is never taken over. A path too long for
`sun_path` (paths.py keeps the default ones short) is refused with a sentence,
not a traceback: under launchd a traceback would be a respawn every 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pensieved.paths import max_socket_path, private_dir, socket_path_fits

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 64 * 1024


class ControlSocketError(RuntimeError):
    """The control socket cannot be served; the message says why (a startup error)."""


class AlreadyRunning(ControlSocketError):
    """Another daemon answers on the control socket."""


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end, where the OS tells it."""
    if sys.platform == "linux":
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    if sys.platform == "darwin":
        local_peercred, sol_local = 0x001, 0  # <sys/un.h>
        creds = sock.getsockopt(sol_local, local_peercred, struct.calcsize("IIh16I"))
        return int(struct.unpack_from("II", creds)[1])
    return None


class ControlServer:
    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        uid: int | None = None,
        *,
        platform: str = sys.platform,
    ) -> None:
        self._path = path
        self._handlers = handlers
        self._uid = os.getuid() if uid is None else uid
        self._platform = platform  # whose sun_path limit applies
        self._server: asyncio.base_events.Server | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def start(self) -> None:
        path = self._path
        if not socket_path_fits(path, self._platform):
            raise ControlSocketError(
                f"the control socket path {path} is {len(os.fsencode(path))} bytes, longer than "
                f"the {max_socket_path(self._platform)} a Unix socket path may have on "
                f"{self._platform}; use a shorter PENSIEVE_HOME"
            )
        try:
            private_dir(path.parent)
        except OSError as exc:
            raise ControlSocketError(
                f"cannot use {path.parent} for the control socket: {exc}"
            ) from exc
        if path.exists() or path.is_symlink():
            if socket_answers(path):
                raise AlreadyRunning(
                    f"a Pensieve daemon is already running (its control socket {path} "
                    "answers); `pensievectl stop` stops it"
                )
            log.info("removing stale control socket %s", path)
            path.unlink()
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(path), limit=MAX_LINE
            )
        except OSError as exc:
            raise ControlSocketError(f"cannot serve the control socket {path}: {exc}") from exc
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid is not None and uid != self._uid:
                log.warning("refused a control connection from uid %d", uid)
                await self._send(writer, {"ok": False, "error": "permission denied: another user"})
                return
            while line := await reader.readline():
                await self._send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that went away or sent an over-long line
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "expected one JSON object per line"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'expected {"command": NAME, ...}'}
        handler = self._handlers.get(request["command"])
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return {
                "ok": False,
                "error": f"unknown command {request['command']!r} (known: {known})",
            }
        try:
            return {"ok": True, **await handler(request)}
        except Exception as exc:
            # The client prints the reason; the log gets one line of it too.
            log.error("control command %s failed: %s", request["command"], exc)
            log.debug("control command %s failed", request["command"], exc_info=True)
            return {"ok": False, "error": str(exc)}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response).encode() + b"\n")
        await writer.drain()


def call(path: Path, command: str, timeout: float = 10.0, **arguments: Any) -> dict[str, Any]:
    """Send one command to the daemon at `path` and return its answer (blocking; for clients)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # Refused before we spoke? Its answer is still there to read.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
