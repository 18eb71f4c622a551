"""OpenAI's Responses API, native: OpenAI, Azure and OpenAI-compatible upstreams that serve it.

The body passes through untouched but for `model`, renamed to the route's upstream name:
`store`, `previous_response_id`, tools, reasoning and the rest are the upstream's business.
A stream is relayed event for event; only the events billing needs are parsed.

Azure serves the Responses API on its v1 API only: `{endpoint}/openai/v1/responses` with the
`api-key` header and the deployment's name in the body's `model`, and no `api-version` (the
deployment-scoped `/openai/deployments/{name}/...?api-version=` paths chat uses do not
have it; the older `/openai/responses?api-version=2025-03-01-preview` was its preview).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from core.config import DEFAULT_MAX_RESPONSE_BODY, ModelRoute, Provider
from core.deadlines import Deadline
from core.errors import GatewayError, bad_gateway
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamFailure, UpstreamStream, final_body
from core.providers.client_headers import openai_headers
from core.providers.http import MAX_ERROR_BODY, open_stream, post_json, too_large_answer, vendor_error
from core.providers.relay import RelayedEvents
from core.sse import event_data
from core.usage import text_bytes, usage_from_responses

# The events that end a response, each carrying the final `response` (and its usage).
TERMINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def responses_url(provider: Provider) -> str:
    """Where a provider serves `/responses` (and `/responses/{id}` below it)."""
    if provider.engine == "azure":
        return f"{provider.base_url}/openai/v1/responses"
    return f"{provider.base_url}/responses"


def auth_headers(provider: Provider, upstream_key: str) -> dict[str, str]:
    if provider.engine == "azure":
        return {"api-key": upstream_key, **provider.headers}
    return {"Authorization": f"Bearer {upstream_key}", **provider.headers}


class NativeResponsesAdapter:
    """POST `{base}/responses` with the client's body; the answer as the upstream gave it."""

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        provider = call.route.provider
        url = responses_url(provider)
        headers = {**openai_headers(call.forwarded), **auth_headers(provider, call.upstream_key), "Content-Type": JSON_CONTENT_TYPE}
        payload = orjson.dumps(final_body(call, {**call.body, "model": call.route.upstream_name}))
        if call.stream:
            return ResponsesStream(await open_stream(http, url, headers, payload, call), call)
        body, data = await post_json(http, url, headers, payload, call)
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            raise UpstreamFailure.invalid(call.route)
        _report_stored(call, data)
        return Reply(200, body, usage_from_responses(data))


def _report_stored(call: UpstreamCall, response: Any) -> None:
    """Tell the gateway the id of a response the upstream keeps (see UpstreamCall.stored)."""
    if call.stored is not None and isinstance(response, dict) and isinstance(response.get("id"), str) and response["id"]:
        call.stored(response["id"])


async def call_stored(
    http: aiohttp.ClientSession, route: ModelRoute, upstream_key: str, method: str, path: str, query: str = "", limit: int = DEFAULT_MAX_RESPONSE_BODY
) -> Reply:
    """Forward a call on a stored response (`path` below `/responses`: `{id}`, `{id}/cancel`,
    `{id}/input_items`, with the client's query) to the provider holding it. A 200 (or any
    2xx) is relayed as it is; the upstream's own refusals (404 for a deleted response, 400 for
    cancelling one not in the background) keep their status and message; its failures are 502s."""
    provider = route.provider
    url = f"{responses_url(provider)}/{path}" + (f"?{query}" if query else "")
    try:
        with Deadline(route.timeout):
            async with http.request(method, url, headers=auth_headers(provider, upstream_key)) as response:
                status, content_type = response.status, response.headers.get("Content-Type", JSON_CONTENT_TYPE)
                cap = limit if 200 <= status < 300 else MAX_ERROR_BODY
                body = b""
                while len(body) <= cap and not response.content.at_eof():
                    body += await response.content.read(cap + 1 - len(body))
                if 200 <= status < 300 and len(body) > limit:
                    raise too_large_answer(route, limit).error
    except TimeoutError:
        raise UpstreamFailure.timeout(route).error from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure.unreachable(route, exc).error from None
    if 200 <= status < 300:
        return Reply(status, body, None, content_type)
    raise _stored_call_error(route, status, body)


def _stored_call_error(route: ModelRoute, status: int, body: bytes) -> GatewayError:
    name = route.provider.name
    if status in (401, 403):  # the gateway's credentials, not the client's: never passed on
        return bad_gateway(f"Provider '{name}' rejected the gateway's credentials (HTTP {status}).", "upstream_auth_failed")
    passed = vendor_error(body)
    if status >= 500 or status == 429 or passed is None:
        return GatewayError(429 if status == 429 else 502, "api_error", "upstream_error", f"Provider '{name}' answered HTTP {status}.")
    message, type_, code, param = passed
    return GatewayError(status, type_, code, message, param=param)


def responses_error_event(error: GatewayError) -> bytes:
    """An `error` event as the Responses API streams one (`type`, `code`, `message`, `param`),
    for a stream the gateway ends itself: the openai SDK yields it as a ResponseErrorEvent,
    as it does OpenAI's own. (Unnumbered: the vendor numbered the events before it.)"""
    data = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


class ResponsesStream(RelayedEvents):
    """Relays a Responses stream unchanged, reading only what billing needs: the id from
    `response.created`, the usage from the terminal event (`response.completed`,
    `.incomplete`, `.failed`), and, kept unparsed until an estimate needs them, the `delta`
    events whose text a stream cut short is billed for."""

    def __init__(self, response: aiohttp.ClientResponse, call: UpstreamCall):
        self._deltas: list[bytes] = []  # delta events not yet counted (see completion_text_bytes)
        self._deltas_size = 0
        super().__init__(response, call.route)
        self._call = call
        self._error_relayed = False

    @property  # type: ignore[override]
    def completion_text_bytes(self) -> int:
        if self._deltas:
            self._count_deltas()
        return self._text_bytes

    @completion_text_bytes.setter
    def completion_text_bytes(self, value: int) -> None:
        self._text_bytes = value

    def _relay(self, events: list[bytes]) -> list[bytes]:
        for event in events:
            self._observe(event)
        return events

    def error_event(self, error: GatewayError) -> bytes | None:
        return None if self._error_relayed else responses_error_event(error)

    def _observe(self, event: bytes) -> None:
        """Record what billing needs from one event (named by its `event:` line)."""
        kind = _event_name(event)
        if kind.endswith(b".delta"):
            data = event_data(event)
            if data is not None:
                self._deltas.append(data)
                self._deltas_size += len(data)
                if self._deltas_size > MAX_UNREAD_BYTES:
                    self._count_deltas()
        elif kind in TERMINAL_EVENTS:
            response = self._response_of(event)
            self.usage = usage_from_responses(response) or self.usage
            self.complete = True
        elif kind == b"response.created":
            _report_stored(self._call, self._response_of(event))
        elif kind == b"error":
            self._error_relayed = True  # the client has the upstream's own error event
            data = self._parsed(event)
            message = data.get("message") if isinstance(data, dict) else None
            self.error = bad_gateway(message if isinstance(message, str) else "The upstream stream failed.", "upstream_stream_error")

    def _response_of(self, event: bytes) -> Any:
        data = self._parsed(event)
        return data.get("response") if isinstance(data, dict) else None

    @staticmethod
    def _parsed(event: bytes) -> Any:
        data = event_data(event)
        try:
            return orjson.loads(data) if data is not None else None
        except ValueError:
            return None

    def _count_deltas(self) -> None:
        """Count the text of the delta events kept so far (bounded: called past MAX_UNREAD_BYTES)."""
        for data in self._deltas:
            try:
                delta = orjson.loads(data)
            except ValueError:
                continue
            self._text_bytes += text_bytes(delta.get("delta")) if isinstance(delta, dict) else 0
        self._deltas.clear()
        self._deltas_size = 0


MAX_UNREAD_BYTES = 256 * 1024


def _event_name(event: bytes) -> bytes:
    """The `event:` line's value (the Responses API names every event); the `type` in the data
    for an upstream that sends none, which costs a parse."""
    if event.startswith(b"event:"):
        end = event.find(b"\n")
        return event[6:end].strip()
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    data = event_data(event)
    if data is None:
        return b""
    try:
        kind = orjson.loads(data).get("type")
    except (ValueError, AttributeError):
        return b""
    return kind.encode() if isinstance(kind, str) else b""
