"""The one error type of the gateway, rendered once as OpenAI-shaped JSON."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error a client should see: HTTP status plus OpenAI's `{"error": {...}}` body.

    `code` is a stable string clients can match on; `message` is for humans; `param` names
    the request parameter at fault, when there is one (as OpenAI's errors do).
    """

    def __init__(self, status: int, type_: str, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", code, message, param=param)


def unauthorized(message: str = "Invalid or missing API key.") -> GatewayError:
    return GatewayError(401, "invalid_request_error", "invalid_api_key", message)


def forbidden(message: str, code: str) -> GatewayError:
    return GatewayError(403, "permission_error", code, message)


def not_found(message: str, code: str) -> GatewayError:
    return GatewayError(404, "invalid_request_error", code, message)


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "invalid_request_error", "request_too_large", f"Request body exceeds the limit of {limit} bytes.")


def bad_gateway(message: str, code: str = "upstream_error") -> GatewayError:
    return GatewayError(502, "api_error", code, message)


def gateway_timeout(message: str) -> GatewayError:
    return GatewayError(504, "api_error", "upstream_timeout", message)
