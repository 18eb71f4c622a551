"""HTTP plumbing every vendor adapter shares: timeouts, connection errors, and the
classification of non-200 answers into retryable or final, OpenAI-shaped failures."""

from __future__ import annotations

import functools
import json
from typing import Any

import aiohttp
import orjson

from core.config import ModelRoute
from core.deadlines import Deadline
from core.errors import GatewayError, bad_gateway
from core.providers.base import UpstreamCall, UpstreamFailure

MAX_ERROR_BODY = 64 * 1024
# Upstream statuses that say nothing about the client's request: the provider is overloaded,
# broken, or misconfigured by the operator (bad vendor key, unknown upstream model name).
RETRYABLE_STATUSES = frozenset({401, 403, 404, 408, 409, 429, 529})
# Vendors' error types mapped to OpenAI's, where they differ.
_ERROR_TYPES = {"INVALID_ARGUMENT": "invalid_request_error", "RESOURCE_EXHAUSTED": "rate_limit_error", "overloaded_error": "api_error"}


async def post_json(http: aiohttp.ClientSession, url: str, headers: dict[str, str], payload: bytes, call: UpstreamCall) -> tuple[bytes, Any]:
    """POST and return the body and parsed JSON of a 200 answer, or raise UpstreamFailure."""
    body, _ = await post(http, url, headers, payload, call)
    route = call.route
    try:
        return body, orjson.loads(body)
    except ValueError:
        raise UpstreamFailure(bad_gateway(f"Provider '{route.provider.name}' returned a response that is not JSON."), retryable=True) from None


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str], data: bytes | aiohttp.MultipartWriter, call: UpstreamCall) -> tuple[bytes, str]:
    """POST and return the body and content type of a 200 answer, or raise UpstreamFailure.
    An answer over `call.max_response_bytes` is refused as soon as it is known to be, not after reading it."""
    route, limit = call.route, call.max_response_bytes
    try:
        with Deadline(route.timeout, call.loop):
            async with _post(http, url, data, headers, route) as response:
                status = response.status
                if (response.content_length or 0) > limit:
                    raise too_large_answer(route, limit)
                body = await response.content.read(limit + 1)
                while len(body) <= limit and not response.content.at_eof():
                    body += await response.content.read(limit + 1 - len(body))
                if len(body) > limit:
                    raise too_large_answer(route, limit)
                content_type = response.headers.get("Content-Type", "")
    except TimeoutError:
        raise UpstreamFailure.timeout(route) from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure.unreachable(route, exc) from None
    if status != 200:
        raise failure_from_status(route, status, body)
    return body, content_type


async def open_stream(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], payload: bytes | aiohttp.MultipartWriter, call: UpstreamCall
) -> aiohttp.ClientResponse:
    """POST (a JSON body, or an upload's form) and return a 200 response whose body is still to be read (a stream)."""
    route = call.route
    timeout = _stream_timeout(route.timeout)
    try:
        with Deadline(route.timeout, call.loop):
            response = await _post(http, url, payload, headers, route, timeout=timeout)
            if response.status != 200:
                try:
                    body = await response.content.read(MAX_ERROR_BODY)
                finally:
                    response.release()
                raise failure_from_status(route, response.status, body)
    except TimeoutError:
        raise UpstreamFailure.timeout(route) from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure.unreachable(route, exc) from None
    return response


def _post(http: aiohttp.ClientSession, url: str, data: Any, headers: dict[str, str], route: ModelRoute, **options: Any) -> Any:
    """The shared session's POST, through the provider's proxy if it has one (`proxy`)."""
    proxy = route.provider.proxy
    if proxy is None:
        return http.post(url, data=data, headers=headers, **options)
    if proxy.request_headers:
        headers = {**headers, **proxy.request_headers}
    return http.post(url, data=data, headers=headers, proxy=proxy.url, proxy_headers=proxy.connect_headers, **options)


@functools.lru_cache(maxsize=64)
def _stream_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """A stream has no total deadline, only one on connecting and on each read (few distinct values)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


def too_large_answer(route: ModelRoute, limit: int) -> UpstreamFailure:
    error = bad_gateway(f"Provider '{route.provider.name}' sent an answer over the gateway's limit of {limit} bytes.", "upstream_response_too_large")
    return UpstreamFailure(error, retryable=False)


def failure_from_status(route: ModelRoute, status: int, body: bytes) -> UpstreamFailure:
    """Classify a non-200 upstream answer; pass a vendor's error message through when safe."""
    name = route.provider.name
    if status in (401, 403):
        # Never pass these through: the client's Tollgate key is fine, and the vendor's
        # message may quote part of the operator's vendor key.
        return UpstreamFailure(
            bad_gateway(f"Provider '{name}' rejected the gateway's credentials (HTTP {status}).", "upstream_auth_failed"),
            retryable=True,
            upstream_status=status,
        )
    retryable = status in RETRYABLE_STATUSES or status >= 500
    passed = vendor_error(body)
    if passed is not None:
        message, type_, code, param = passed
        client_status = status if status == 429 or not retryable else 502
        return UpstreamFailure(GatewayError(client_status, type_, code, message, param=param), retryable=retryable, upstream_status=status)
    if retryable:
        client_status = 429 if status == 429 else 502
        error = GatewayError(client_status, "api_error", "upstream_error", f"Provider '{name}' answered HTTP {status}.")
        return UpstreamFailure(error, retryable=True, upstream_status=status)
    return UpstreamFailure(
        GatewayError(status, "invalid_request_error", "upstream_rejected", f"Provider '{name}' rejected the request (HTTP {status})."),
        retryable=False,
        upstream_status=status,
    )


def vendor_error(body: bytes) -> tuple[str, str, str, str | None] | None:
    """(message, type, code, param) from OpenAI's, Anthropic's or Google's error bodies."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, list) and data:  # Gemini sometimes wraps the error in a list
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    vendor_type = str(error.get("type") or error.get("status") or "api_error")
    code, param = error.get("code"), error.get("param")
    return (
        error["message"],
        _ERROR_TYPES.get(vendor_type, vendor_type),
        str(code if isinstance(code, str) else vendor_type.lower()),
        param if isinstance(param, str) else None,
    )
