"""Request helpers shared by the routes: authentication, bounded JSON bodies, error rendering."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.config import ApiKey, Config
from core.errors import GatewayError, bad_request, forbidden, too_large, unauthorized
from core.limits import check_access, client_ip

log = logging.getLogger("tollgate.http")

_STATUS_CODES = {404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}


def current_config(request: Request) -> Config:
    """The config this request uses from start to end (a reload swaps the store, not this)."""
    config: Config = request.app.state.store.current
    return config


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or None


def caller_ip(request: Request, config: Config) -> str | None:
    peer = request.client.host if request.client else None
    return client_ip(peer, request.headers.get("x-forwarded-for"), config.preferences.trusted_proxies)


def authenticate(request: Request, config: Config) -> ApiKey:
    """The key presented, if it exists and may be used from here, now, by this client."""
    secret = presented_key(request)
    key = config.key_index.find(secret) if secret else None
    if key is None:
        raise unauthorized("Invalid API key." if secret else "Missing API key: send 'Authorization: Bearer <key>'.")
    check_request_access(request, config, key)
    return key


def check_request_access(request: Request, config: Config, key: ApiKey) -> None:
    """The key's access rules (enabled, expiry, addresses, clients) for this request."""
    limits = key.limits
    ip = caller_ip(request, config) if limits.allowed_ips else None  # most keys: no address rules
    check_access(key, request.app.state.clock(), ip, request.headers.get("user-agent") if limits.allowed_clients else None)


def require_admin(request: Request, config: Config) -> ApiKey:
    key = authenticate(request, config)
    if not key.is_admin:
        raise forbidden("This endpoint needs an admin key.", "admin_required")
    return key


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.", "invalid_json") from None


def error_response(error: GatewayError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def http_error(exc: HTTPException) -> GatewayError:
    """Starlette's own 404/405 as our error type."""
    type_, code = _STATUS_CODES.get(exc.status_code, ("invalid_request_error", "http_error"))
    return GatewayError(exc.status_code, type_, code, str(exc.detail))


def unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered with a 500 that reveals nothing."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(GatewayError(500, "api_error", "internal_error", "The gateway hit an internal error; it has been logged."))


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    return unexpected_error(request, exc)
