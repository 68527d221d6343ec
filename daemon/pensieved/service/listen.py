"""Where the daemon listens: an address it may use, on a port nothing else serves."""

from __future__ import annotations

import errno
import logging
import socket

from pensieved.config import loopback_for
from pensieved.http.origin import is_loopback

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already serves, with a message saying so.

    Two probes, as neither is enough alone. A connect finds any listener that
    would take this address's connections: on macOS and the BSDs a bind with
    SO_REUSEADDR to 127.0.0.1 succeeds while another process listens on
    *:PORT, and then the two split the port by address. The bind finds what
    a connect cannot (a socket bound but not listening yet); it keeps
    SO_REUSEADDR so that a previous run's TIME_WAIT connections do not count.
    """
    in_use = StartupError(
        f"{host}:{port} is already in use (another Pensieve? "
        "`pensievectl env` shows the configured address)"
    )
    if something_answers(host, port):
        raise in_use
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise in_use from exc
            raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc


def something_answers(host: str, port: int) -> bool:
    """Whether a connection to host:port is accepted (a wildcard host: its loopback)."""
    try:
        with socket.create_connection((loopback_for(host), port), timeout=1.0):
            return True
    except OSError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless `server.allow_remote` asks for it; warn when it does."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise StartupError(
            f"server.host {host!r} is not a loopback address: other machines could "
            "reach the model. Set server.allow_remote = true to mean it."
        )
    log.warning("listening on %s: reachable from other machines (token required)", host)
