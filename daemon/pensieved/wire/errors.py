"""Anthropic-shaped errors: the one place that names error types and builds bodies."""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """An error the API reports to the client as `{"type": "error", ...}`."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    # `error.details`: an `error_code` the SDKs act on (a lost thread is replayed).
    details: ClassVar[dict[str, Any] | None] = None

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    error_type = "authentication_error"


class PermissionDenied(ApiError):
    status = 403
    error_type = "permission_error"


class NotFound(ApiError):
    status = 404
    error_type = "not_found_error"


class RequestTooLarge(ApiError):
    status = 413
    error_type = "request_too_large"


class RequestTimeout(ApiError):
    """The body did not arrive in time (`[server] body_timeout`).

    The API has no 408 of its own; `timeout_error` is its type for a request
    that ran out of time, and the SDKs retry a 408.
    """

    status = 408
    error_type = "timeout_error"


class RateLimited(ApiError):
    status = 429
    error_type = "rate_limit_error"


class EngineFailure(ApiError):
    status = 500
    error_type = "api_error"


class Overloaded(ApiError):
    """Refused for memory, load or shutdown: Anthropic's 529, which clients back off and retry.

    Claude Code and the SDKs retry a 529 `overloaded_error` with backoff; a
    503 reads to them as a server fault. Every refusal says when to retry.
    """

    status = 529
    error_type = "overloaded_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, {"retry-after": "5", **(headers or {})})


class Busy(Overloaded):
    """Every place in the batch and the queue is taken."""


# Falcon raises its own HTTPErrors for routing problems; map them by status.
_TYPES_BY_STATUS = {
    cls.status: cls.error_type
    for cls in (
        InvalidRequest,
        AuthenticationFailed,
        PermissionDenied,
        NotFound,
        RequestTimeout,
        RequestTooLarge,
        RateLimited,
        EngineFailure,
    )
}
_TYPES_BY_STATUS[405] = "invalid_request_error"
_TYPES_BY_STATUS[503] = "overloaded_error"
_TYPES_BY_STATUS[529] = "overloaded_error"


# Client values quoted in errors and logs are cut to this many characters.
SHOWN_CHARS = 200
# A whole error message, at most: a net for client values quoted uncut.
MESSAGE_CHARS = 1000


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` cut to `limit` characters, saying how long it was: for quoting client values.

    A client value can be 32 MB; an error message or a log line quoting it
    whole would be as big.
    """
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value)} characters)"


def error_type_for_status(status: int) -> str:
    if status in _TYPES_BY_STATUS:
        return _TYPES_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(
    error_type: str,
    message: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": shown(message, MESSAGE_CHARS)}
    if details is not None:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": request_id}


def prompt_too_long(prompt_tokens: int, maximum: int) -> InvalidRequest:
    # Claude Code auto-compacts only on this exact wording.
    return InvalidRequest(f"prompt is too long: {prompt_tokens} tokens > {maximum} maximum")
