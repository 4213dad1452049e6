"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, and the HTTP status of
each mesh error code, so OpenAI client libraries raise their usual exception classes."""

from __future__ import annotations

from typing import Any

from qmesh.common import protocol as p
from qmesh.common.errors import BrokerUnreachable, MeshError

INVALID = "invalid_request_error"
SERVER = "server_error"

# mesh code -> (HTTP status, OpenAI error type, OpenAI error code)
_BY_MESH_CODE: dict[int, tuple[int, str, str | None]] = {
    p.BAD_REQUEST: (400, INVALID, None),
    p.FORBIDDEN: (403, "permission_error", "forbidden"),  # the gateway's CURVE key is not on the client list
    p.UNKNOWN_MODEL: (404, INVALID, "model_not_found"),
    p.CLIENT_STALLED: (504, SERVER, "client_stalled"),
    p.TOO_LARGE: (413, INVALID, "request_too_large"),
    p.TOO_MANY_REQUESTS: (429, "rate_limit_error", "rate_limit_exceeded"),
    p.CANCELLED: (499, INVALID, "cancelled"),
    p.WORKER_FAILED: (502, SERVER, "worker_failed"),
    p.QUEUE_FULL: (503, SERVER, "queue_full"),
    p.QUEUE_TIMEOUT: (504, SERVER, "queue_timeout"),
}


class APIError(Exception):
    """An error answered to the HTTP client before any generation started."""

    def __init__(
        self, status: int, message: str, type_: str = INVALID, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, INVALID, param)


def from_mesh(error: MeshError) -> APIError:
    if isinstance(error, BrokerUnreachable):  # the gateway's own trouble, not a request's: whatever its code
        return APIError(503, error.message, SERVER, None, "broker_unreachable")
    status, type_, code = _BY_MESH_CODE.get(error.code, (500, SERVER, None))
    param = error.param or ("model" if error.code == p.UNKNOWN_MODEL else None)
    return APIError(status, error.message, type_, param, code)


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided.", INVALID, None, "invalid_api_key")
