"""The request path: admit → upstream (with failover) → settle, streaming included."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from core.config import ApiKey, Config, ModelRoute
from core.errors import bad_gateway, bad_request
from core.metering import CLIENT_DISCONNECTED, ERROR, OK, Meter, Outcome, Ticket
from core.providers import adapter_for, messages_adapter_for
from core.providers.base import Reply, UpstreamCall, UpstreamFailure, UpstreamStream
from core.providers.messages import anthropic_error_body, anthropic_event
from core.request_checks import check_request
from core.routing import Scheduler, routes_for
from core.sse import encode_event
from core.usage import Usage, estimate_prompt_tokens, estimate_text_tokens, message_text, tokens_for_bytes

log = logging.getLogger("tollgate.proxy")

ENDPOINTS = ("chat/completions", "completions", "embeddings", "messages")
_REQUIRED_FIELD = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input", "messages": "messages"}


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    request_id: str


def parse_proxy_request(endpoint: str, body: Any) -> ProxyRequest:
    """Check the fields the gateway itself relies on (core/request_checks.py); the upstream validates the rest."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field is required and must be a string.", "missing_model")
    required = _REQUIRED_FIELD[endpoint]
    if body.get(required) is None:
        raise bad_request(f"The '{required}' field is required.", f"missing_{required}")
    if endpoint in ("chat/completions", "messages") and not isinstance(body["messages"], list):
        raise bad_request("The 'messages' field must be a list of messages.", "invalid_messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("The 'stream' field must be true or false.", "invalid_stream")
    if stream and endpoint == "embeddings":
        raise bad_request("Embeddings cannot be streamed.", "invalid_stream")
    check_request(endpoint, body)
    return ProxyRequest(endpoint, body, model, stream, new_request_id())


_REQUEST_PREFIX = f"req_{secrets.token_hex(6)}"
_request_numbers = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes and restarts (random prefix) without a syscall per request."""
    return f"{_REQUEST_PREFIX}{next(_request_numbers):x}"


@dataclass(slots=True)
class CompletedCall:
    reply: Reply
    route: ModelRoute
    headers: dict[str, str]


class Gateway:
    """Runs one proxied request against the routes of the config it started with."""

    def __init__(self, http: aiohttp.ClientSession, scheduler: Scheduler, meter: Meter):
        """Created on the loop it serves (the HTTP session is bound to it anyway)."""
        self.http = http
        self.loop = asyncio.get_running_loop()
        self.scheduler = scheduler
        self.meter = meter

    async def handle(self, config: Config, key: ApiKey, request: ProxyRequest) -> CompletedCall | MeteredStream:
        routes = routes_for(config, request.model, key)
        ticket = await self.meter.admit(config, key, request)
        try:
            answer, route = await self._first_answer(config, request, routes)
        except BaseException:
            ticket.release()
            raise
        if isinstance(answer, UpstreamStream):
            return MeteredStream(answer, route, request, ticket, ticket.start_headers(), config.preferences.max_response_body_bytes)
        usage = answer.usage or _estimate(request, answer.body)
        headers = ticket.settle(Outcome(route.provider.name, route.upstream_name, usage, OK))
        return CompletedCall(answer, route, headers)

    async def _first_answer(self, config: Config, request: ProxyRequest, routes: tuple[ModelRoute, ...]) -> tuple[Reply | UpstreamStream, ModelRoute]:
        """Try routes in scheduling order until one answers; failover only on retryable failures."""
        prefs = config.preferences
        ordered = self.scheduler.order(request.model, routes, prefs.scheduling_algorithm)
        if not prefs.auto_retry:
            ordered = ordered[:1]
        failure: UpstreamFailure | None = None
        for route in ordered:
            call = UpstreamCall(
                request.endpoint,
                request.body,
                request.stream,
                route,
                self.scheduler.next_upstream_key(route.provider),
                prefs.max_response_body_bytes,
                self.loop,
            )
            try:
                adapter = messages_adapter_for(route.provider.engine) if request.endpoint == "messages" else adapter_for(route.provider.engine)
                answer = await adapter.send(call, self.http)
            except UpstreamFailure as exc:
                log.warning("%s: %s failed: %s", request.request_id, route.label, exc.error.message)
                if not exc.retryable:
                    raise exc.error from None
                self.scheduler.cool_down(route, prefs.cooldown_period)
                failure = exc
                continue
            self.scheduler.recovered(route)
            return answer, route
        raise failure.error if failure else bad_gateway("No provider could serve the request.")


def _estimate(request: ProxyRequest, body: bytes) -> Usage:
    """Usage for an answer that reported none: estimated from the prompt and the reply text."""
    try:
        choices = json.loads(body).get("choices") or []
    except (ValueError, AttributeError):
        choices = []
    text = "".join(message_text((c.get("message") or {}).get("content")) or str(c.get("text") or "") for c in choices if isinstance(c, dict))
    return Usage(prompt_tokens=estimate_prompt_tokens(request.body), completion_tokens=estimate_text_tokens(text), estimated=True)


class MeteredStream:
    """An upstream stream that settles its ticket exactly once, however it ends."""

    def __init__(self, upstream: UpstreamStream, route: ModelRoute, request: ProxyRequest, ticket: Ticket, headers: dict[str, str], max_bytes: int):
        self.upstream = upstream
        self.route = route
        self.request = request
        self.headers = headers  # sent with the stream's start: limits and quota as admitted
        self.max_bytes = max_bytes
        self._ticket: Ticket | None = ticket

    @property
    def content_type(self) -> str:
        return self.upstream.content_type

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.upstream.__aiter__()

    def cut_off(self) -> bytes:
        """End a stream that passed `max_bytes` (the relay counts; nothing is buffered): the
        upstream is closed and the client's last event is the error."""
        self.upstream.close()
        message = f"Provider '{self.route.provider.name}' sent a stream over the gateway's limit of {self.max_bytes} bytes."
        error = self.upstream.error = bad_gateway(message, "upstream_response_too_large")
        if self.request.endpoint == "messages":  # Anthropic's clients expect its error event
            return anthropic_event("error", anthropic_error_body(error))
        return encode_event(orjson.dumps(error.body()))

    def finish(self, disconnected: bool) -> None:
        """Close the upstream and settle. Synchronous: runs inside cancellation too."""
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        self.upstream.close()
        upstream = self.upstream
        status = CLIENT_DISCONNECTED if disconnected else ERROR if upstream.error else OK
        usage = upstream.usage
        if usage is None:
            usage = Usage(
                prompt_tokens=estimate_prompt_tokens(self.request.body),
                completion_tokens=tokens_for_bytes(upstream.completion_text_bytes),
                estimated=True,
            )
        if upstream.error is not None and usage.estimated and upstream.completion_text_bytes == 0:
            ticket.release()  # failed before any output: nothing to charge
            return
        ticket.settle(Outcome(self.route.provider.name, self.route.upstream_name, usage, status))
