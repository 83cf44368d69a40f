"""Typed exceptions for conductor API errors.

Every error response of the API has the body ``{"error": {"code", "message", "field"}}``.
:func:`error_from_response` turns it into the matching exception class, chosen by HTTP
status, so callers can write ``except NotFoundError:`` and still read the server's
``code``, ``message`` and ``field``.
"""

from __future__ import annotations

from typing import Any, Optional

import httpx

__all__ = [
    "ConductorError",
    "ConnectionFailedError",
    "ValidationError",
    "AuthError",
    "NotFoundError",
    "NoWorkspaceError",
    "ConflictError",
    "ResourceExhaustedError",
    "EnvironmentUnavailableError",
    "ServiceUnavailableError",
    "error_from_response",
]


class ConductorError(RuntimeError):
    """An error reported by conductor (or on the way to it).

    It is a :class:`RuntimeError`, as the errors of the original ``WorkspaceIsolationManager``
    (a failed ``podman`` call) were, so ``except RuntimeError:`` written for it still works.

    Attributes:
        code: the server's stable error code, e.g. ``"invalid_request"`` or ``"not_found"``.
        message: the server's human-readable message.
        field: the request field at fault (e.g. ``"commands[1]"``), when the server names one.
        status: the HTTP status, or ``None`` when no response arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        field: Optional[str] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"field={self.field!r}, status={self.status!r})"
        )


class ConnectionFailedError(ConductorError):
    """The service could not be reached (not running, wrong address, connection lost)."""


class ValidationError(ConductorError):
    """400: the request was invalid; ``field`` names the offending input."""


class AuthError(ConductorError):
    """401 (missing or wrong token) or 403 (``Host`` header refused)."""


class NotFoundError(ConductorError):
    """404: no such workspace, task, snapshot or endpoint."""


class NoWorkspaceError(NotFoundError, ValueError):
    """:class:`conductor.workspace_isolation.WorkspaceIsolationManager`: the agent has no
    workspace. Also a :class:`ValueError`, which the original manager raised for it."""


class ConflictError(ConductorError):
    """409: the request conflicts with the current state (e.g. the workspace is not running)."""


class ResourceExhaustedError(ConductorError):
    """429: a configured limit such as ``cleanup.max_containers`` is reached."""


class EnvironmentUnavailableError(ConductorError):
    """422: the environment's image could not be built or pulled."""


class ServiceUnavailableError(ConductorError):
    """503: the container engine failed or the service is shutting down."""


_BY_STATUS = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    415: ValidationError,
    422: EnvironmentUnavailableError,
    429: ResourceExhaustedError,
    503: ServiceUnavailableError,
}


def error_from_response(response: httpx.Response) -> ConductorError:
    """The exception for an error response (any status >= 400)."""
    code, message, field = "http_error", response.reason_phrase or "request failed", None
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        code = str(detail.get("code") or code)
        message = str(detail.get("message") or message)
        field = detail.get("field")
    elif response.text:
        message = response.text[:500]
    cls = _BY_STATUS.get(response.status_code, ConductorError)
    return cls(message, code=code, field=field, status=response.status_code)
