"""The memory guard at the door: new work refused before its body is read.

At the reject or shutdown level, or while draining, a new `/v1/messages`
request gets 529 before its body is read or a model loaded; so does one
whose body, with the others being read, would take available memory below
the reject line (memory/bodies.py). A request let in carries its body's
`BodyLease`.
"""

from __future__ import annotations

from collections.abc import Callable

import falcon.asgi

from pensieved.memory.bodies import BODY_TIMEOUT, BodyAdmission, BodyLease
from pensieved.memory.guard import MemoryGuard

ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})

BODY_KEY = "pensieve.body"


class AdmissionMiddleware:
    """New work is refused at the reject and shutdown levels, while draining, and for its body.

    A request it admits carries its `BodyLease` (`body_lease`); the body
    reader fills it, the resource releases it once the request reaches the
    engine, and this releases it at the latest when the responder returns.
    """

    def __init__(
        self, guard: MemoryGuard, body_timeout: Callable[[], float] = lambda: BODY_TIMEOUT
    ) -> None:
        self._guard = guard
        self.bodies = BodyAdmission(guard, body_timeout)

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.method == "POST" and req.path.rstrip("/") in ROUTES:
            refusal = self._guard.refusal() or self.bodies.refusal(req.content_length or 0)
            if refusal is not None:
                raise refusal
            req.scope[BODY_KEY] = self.bodies.lease()

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        lease = body_lease(req)
        if lease is not None:
            lease.release()


def body_lease(req: falcon.asgi.Request) -> BodyLease | None:
    """The lease `AdmissionMiddleware` gave `req`'s body, if it gave one."""
    lease: BodyLease | None = req.scope.get(BODY_KEY)
    return lease
