"""Typed errors of the rollout client, built in one place from the server's answer.

Each carries the HTTP status, the server's `error_type` and its message, and the route that
answered, so that a trainer can tell "retry later" (sleeping, overloaded) from "my payload is
wrong" (validation) without parsing text.
"""

from __future__ import annotations

import json
from typing import Any


class RolloutError(Exception):
    """A request of the rollout client failed. `status` is None when no HTTP answer came."""

    def __init__(
        self, message: str, *, status: int | None, error_type: str | None, route: str
    ) -> None:
        self.message = message
        self.status = status
        self.error_type = error_type
        self.route = route
        where = f"{route}: {status}" if status is not None else route
        super().__init__(f"{where}: {message}")


class RolloutConnectionError(RolloutError):
    """The server could not be reached, or the connection broke before an answer."""


class AuthenticationError(RolloutError):
    """401: missing or wrong key (the control key on control routes, the API key elsewhere)."""


class RouteNotFoundError(RolloutError):
    """404: the route is not there (control routes need `--enable-rl-control`) or the object
    named (e.g. the request id of /abort_request) is unknown."""


class ConflictError(RolloutError):
    """409: the server's state forbids it now (e.g. an update while the weights are released)."""


class PayloadTooLargeError(RolloutError):
    """413: the body is over the server's limit (lower `bucket_bytes`)."""


class ValidationError(RolloutError):
    """422: the request or payload is invalid; the message names the field or tensor."""


class GenerationError(RolloutError):
    """424: the engine failed while generating."""


class OverloadedError(RolloutError):
    """429: too many requests queued or running in the server."""


class NotSupportedError(RolloutError):
    """501: the running engine cannot do this (the message names the engine)."""


class SleepingError(RolloutError):
    """503 with error_type `sleeping`: memory is released; call resume_memory first."""


class UnavailableError(RolloutError):
    """503: the executor is not connected, the request waited too long, or the server is
    shutting down."""


class AbortedError(UnavailableError):
    """503 with error_type `aborted`: the request was aborted by /abort_request, a pause in
    mode abort, or an update with abort_all_requests."""


class ServerError(RolloutError):
    """Any other failure status."""


_BY_STATUS: dict[int, type[RolloutError]] = {
    401: AuthenticationError,
    404: RouteNotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    424: GenerationError,
    429: OverloadedError,
    501: NotSupportedError,
    503: UnavailableError,
}


def _message_and_type(body: Any) -> tuple[str | None, str | None]:
    """The message and error type in either of the router's error shapes: TGI's
    `{"error": str, "error_type": str}` or OpenAI's `{"error": {"message", "type", "code"}}`."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if isinstance(error, str):
        kind = body.get("error_type")
        return error, kind if isinstance(kind, str) else None
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("code") or error.get("type")
        return (
            message if isinstance(message, str) else None,
            kind if isinstance(kind, str) else None,
        )
    return None, None


def error_from_response(status: int, text: str, route: str) -> RolloutError:
    """The typed error for a non-2xx answer (`text` is its body as received)."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    message, error_type = _message_and_type(body)
    if message is None:
        message = text.strip()[:500] or "no body"
        if status == 404:
            message += (
                " (the control routes exist only when the server runs with --enable-rl-control)"
            )
    if status == 503 and error_type == "sleeping":
        cls: type[RolloutError] = SleepingError
    elif status == 503 and error_type == "aborted":
        cls = AbortedError
    else:
        cls = _BY_STATUS.get(status, ServerError)
    return cls(message, status=status, error_type=error_type, route=route)
