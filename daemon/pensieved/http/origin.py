"""Who may talk to the daemon: loopback `Host` only, and never a browser page.

Local LLM servers have been driven from web pages through DNS rebinding
(CVE-2024-28224): a page on evil.example resolves its own name to 127.0.0.1
and its requests then reach the local server with `Host: evil.example`. So
only `Host` values that name a loopback address with our port are served, and
any request carrying an `Origin` header (which browsers add to cross-origin
and to all non-GET fetches) is refused; no CORS header is ever sent. Claude
Code and the SDKs send no `Origin`.
"""

from __future__ import annotations

import ipaddress

import falcon.asgi

from pensieved.wire.errors import PermissionDenied


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """`[::1]:7777` → (`::1`, 7777); `localhost` → (`localhost`, None)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    # isdigit() alone accepts "²", which int() refuses.
    return host, int(port) if port.isascii() and port.isdigit() else None


class HostOriginGuard:
    def __init__(self, port: int, allow_remote: bool) -> None:
        self._port = port
        self._allow_remote = allow_remote

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.get_header("Origin") is not None:
            raise PermissionDenied(
                "requests from web pages (with an Origin header) are refused: "
                "Pensieve serves local tools, not browsers"
            )
        if self._allow_remote:
            return  # the token still guards every route
        host, port = split_host(req.get_header("Host") or "")
        if not is_loopback(host) or (port or 80) != self._port:
            raise PermissionDenied(
                f"Host {req.get_header('Host')!r} is not this server: use "
                f"127.0.0.1:{self._port} or localhost:{self._port}"
            )
