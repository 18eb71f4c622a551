"""OpenAI and OpenAI-compatible upstreams: the body passes through with the model renamed.

Streams ask the upstream for a final usage chunk (`stream_options.include_usage`) so billing
uses the vendor's numbers; the extra chunk is dropped again if the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from core.config import ModelRoute
from core.errors import GatewayError, bad_gateway
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamFailure, UpstreamStream
from core.sse import DONE, SseSplitter, encode_event, event_data
from core.usage import usage_from_openai

MAX_ERROR_BODY = 64 * 1024
# Upstream statuses that say nothing about the client's request: the provider is overloaded,
# broken, or misconfigured by the operator (bad vendor key, unknown upstream model name).
RETRYABLE_STATUSES = frozenset({401, 403, 404, 408, 409, 429})


class OpenAIAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        route = call.route
        url = f"{route.provider.base_url}/{call.endpoint}"
        headers = {"Authorization": f"Bearer {call.upstream_key}", "Content-Type": JSON_CONTENT_TYPE, **route.provider.headers}
        payload = json.dumps(upstream_body(call), ensure_ascii=False).encode()
        if call.stream:
            return await _open_stream(http, url, headers, payload, call)
        try:
            async with asyncio.timeout(route.timeout):
                async with http.post(url, data=payload, headers=headers) as response:
                    body = await response.read()
                    status = response.status
        except TimeoutError:
            raise UpstreamFailure.timeout(route) from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure.unreachable(route, exc) from None
        if status != 200:
            raise failure_from_status(route, status, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamFailure(bad_gateway(f"Provider '{route.provider.name}' returned a response that is not JSON."), retryable=True) from None
        return Reply(200, body, usage_from_openai(data))


def upstream_body(call: UpstreamCall) -> dict[str, Any]:
    body = dict(call.body)
    body["model"] = call.route.upstream_name
    if call.stream and call.endpoint != "embeddings":
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return body


async def _open_stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str], payload: bytes, call: UpstreamCall) -> UpstreamStream:
    route = call.route
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=route.timeout, sock_read=route.timeout)
    try:
        async with asyncio.timeout(route.timeout):
            response = await http.post(url, data=payload, headers=headers, timeout=timeout)
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
    return OpenAIStream(response, route, call.client_wants_usage)


def failure_from_status(route: ModelRoute, status: int, body: bytes) -> UpstreamFailure:
    """Classify a non-200 upstream answer; pass an OpenAI-shaped error body through when safe."""
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
    passed = _openai_error(body)
    if passed is not None:
        message, type_, code = passed
        client_status = status if status == 429 or not retryable else 502
        return UpstreamFailure(GatewayError(client_status, type_, code, message), retryable=retryable, upstream_status=status)
    if retryable:
        client_status = 429 if status == 429 else 502
        error = GatewayError(client_status, "api_error", "upstream_error", f"Provider '{name}' answered HTTP {status}.")
        return UpstreamFailure(error, retryable=True, upstream_status=status)
    return UpstreamFailure(
        GatewayError(status, "invalid_request_error", "upstream_rejected", f"Provider '{name}' rejected the request (HTTP {status})."),
        retryable=False,
        upstream_status=status,
    )


def _openai_error(body: bytes) -> tuple[str, str, str] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return error["message"], str(error.get("type") or "api_error"), str(error.get("code") or "upstream_error")


class OpenAIStream(UpstreamStream):
    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, client_wants_usage: bool):
        super().__init__()
        self._response = response
        self._route = route
        self._client_wants_usage = client_wants_usage
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.content.iter_any():
                out = [event for event in splitter.feed(chunk) if self._observe(event)]
                if out:
                    yield b"".join(out)
            self._finished = True
        except TimeoutError:
            self.error = GatewayError(
                504, "api_error", "upstream_timeout", f"Provider '{self._route.provider.name}' stopped sending for {self._route.timeout:g}s."
            )
        except aiohttp.ClientError:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if self.error is None and splitter.rest().strip():
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' ended the stream mid-event.", "upstream_stream_broken")
        if self.error is not None:
            yield encode_event(json.dumps(self.error.body()).encode())

    def _observe(self, event: bytes) -> bool:
        """Record usage and streamed text from one event; say whether the client should see it."""
        data = event_data(event)
        if data is None or data == DONE:
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        usage = usage_from_openai(chunk)
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            self.completion_text_bytes += sum(_choice_text_bytes(choice) for choice in choices)
        return self._client_wants_usage or usage is None or bool(choices)

    def close(self) -> None:
        # A stream cut short must drop its connection (that is what cancels the upstream
        # generation); a finished one goes back to the pool.
        if self._finished:
            self._response.release()
        else:
            self._response.close()


def _choice_text_bytes(choice: Any) -> int:
    if not isinstance(choice, dict):
        return 0
    delta = choice.get("delta")
    if isinstance(delta, dict):
        size = len((delta.get("content") or "").encode()) if isinstance(delta.get("content"), str) else 0
        for tool_call in delta.get("tool_calls") or ():
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                size += len(function["arguments"].encode())
        return size
    text = choice.get("text")
    return len(text.encode()) if isinstance(text, str) else 0
