"""Request helpers shared by the routes: authentication, bounded JSON bodies, error rendering."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from core.auth_throttle import AuthThrottle
from core.config import ApiKey, Config
from core.errors import GatewayError, bad_request, forbidden, too_large, unauthorized
from core.limits import check_access, client_ip
from core.request_checks import check_nesting

log = logging.getLogger("tollgate.http")

_STATUS_CODES = {404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}


def current_config(request: Request) -> Config:
    """The config this request uses from start to end (a reload swaps the store, not this)."""
    config: Config = request.app.state.store.current
    return config


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or None


def caller_ip(request: Request, config: Config) -> str | None:
    return client_ip(_peer(request), request.headers.get("x-forwarded-for"), config.preferences.trusted_proxies)


def authenticate(request: Request, config: Config) -> ApiKey:
    """The key presented, if it exists and may be used from here, now, by this client."""
    state = request.app.state
    return authenticate_headers(config, request.headers, _peer(request), state.clock(), state.auth_throttle)


def authenticate_headers(config: Config, headers: Mapping[str, str], peer: str | None, now: float, throttle: AuthThrottle) -> ApiKey:
    """`authenticate` from the parts of a request (the proxy endpoints have no Request object).
    An address that keeps presenting bad keys is throttled (core/auth_throttle.py)."""
    limit = config.preferences.auth_failure_limit
    address = client_ip(peer, headers.get("x-forwarded-for"), config.preferences.trusted_proxies)
    throttle.check(address, limit)
    secret = presented_key(headers)
    key = config.key_index.find(secret, now) if secret else None
    if key is None:
        throttle.failed(address, limit)
        raise unauthorized("Invalid API key." if secret else "Missing API key: send 'Authorization: Bearer <key>'.")
    check_key_access(key, headers, address, now)
    return key


def check_key_access(key: ApiKey, headers: Mapping[str, str], address: str | None, now: float) -> None:
    """`address` is the client's, as `client_ip` resolves it (computed once per request)."""
    check_access(key, now, address, headers.get("user-agent") if key.limits.allowed_clients else None)


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


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
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive: Receive, declared_length: str | None, limit: int, sink: Callable[[bytes], None] | None = None) -> bytes:
    """`read_body` on a raw ASGI receive channel; ClientDisconnect if the client leaves.
    With a `sink` (a multipart parser) each chunk goes there as it arrives instead of being
    kept, under the same limit, and b"" is returned."""
    if declared_length and declared_length.isascii() and declared_length.isdigit() and int(declared_length) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if sink is None:
            chunks.append(chunk)
        else:
            sink(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def request_headers(scope: Scope, names: frozenset[bytes]) -> dict[str, str]:
    """The headers of `names` picked out of the ASGI scope in one pass (ASGI servers give
    names lowercased); the first of repeats, as Starlette's Headers.get does."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in names:
            found.setdefault(name.decode(), value.decode("latin-1"))
    return found


MAX_DIGITS = 18  # below 2**63: what SQLite stores, and far beyond any page, id or count


def whole_number(raw: str | None) -> int | None:
    """`raw` as a non-negative int if it is 1-18 ASCII digits, else None. (str.isdigit()
    also accepts digits such as '²' that int() refuses, and an int past 2**63 fails in SQLite.)"""
    if raw and len(raw) <= MAX_DIGITS and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def parse_json(body: bytes) -> Any:
    """The body as JSON, nested no deeper than what every later reader and writer of it takes."""
    try:
        value = orjson.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.", "invalid_json") from None
    check_nesting(value, body)
    return value


def error_response(error: GatewayError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def http_error(exc: HTTPException) -> GatewayError:
    """Starlette's own 404/405 as our error type."""
    type_, code = _STATUS_CODES.get(exc.status_code, ("invalid_request_error", "http_error"))
    return GatewayError(exc.status_code, type_, code, str(exc.detail))


def internal_error(request: Request, exc: Exception) -> GatewayError:
    """A bug: logged with its traceback; the 500 to answer reveals nothing of it. The caller
    renders it in the shape the path's clients read (Anthropic's on /v1/messages)."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return GatewayError(500, "api_error", "internal_error", "The gateway hit an internal error; it has been logged.")
