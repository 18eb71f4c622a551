"""The request path: admit → upstream (with failover) → settle, streaming included."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from core.config import ApiKey, Config, ModelRoute, attempts_allowed
from core.errors import GatewayError, bad_gateway, bad_request
from core.metering import CLIENT_DISCONNECTED, ERROR, OK, Meter, Outcome, Ticket
from core.providers import adapter_for, messages_adapter_for, responses_adapter_for
from core.providers.base import Reply, UpstreamCall, UpstreamFailure, UpstreamStream, invalid_answer
from core.providers.media import media_adapter_for
from core.providers.messages import anthropic_error_body, anthropic_event, count_tokens_upstream
from core.providers.responses_native import responses_error_event
from core.providers.uploads import upload_adapter_for
from core.request_checks import check_request, requested_units
from core.routing import Scheduler, routes_for
from core.sse import encode_event
from core.stored_responses import StoredResponses
from core.telemetry.facts import BUSY, LEFT, SERVED, TIMEOUT, Attempt, RequestFacts
from core.telemetry.facts import ERROR as ATTEMPT_FAILED
from core.uploads import UPLOAD_ENDPOINTS, Upload
from core.upstream_gate import ClientLeft, ClientMessages, Lane, UpstreamBusy, UpstreamGate
from core.usage import Usage, complete_usage, estimate_prompt_tokens, estimate_usage, usage_so_far
from core.vendors.months import VendorMonths

log = logging.getLogger("tollgate.proxy")

ENDPOINTS = ("chat/completions", "completions", "embeddings", "messages", "responses", "images/generations", "moderations", "audio/speech")
_REQUIRED_FIELD = {
    "chat/completions": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "messages": "messages",
    "responses": "input",
    "images/generations": "prompt",
    "moderations": "input",
    "audio/speech": "input",
}
# Endpoints whose answer is never a stream of events: `stream: true` is a 400.
_NOT_STREAMED = {"embeddings": "Embeddings", "moderations": "Moderations"}


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """One proxied call. `model` is what the client asked for until routing resolves it to
    the public model name (`up/gpt-4o` is gpt-4o), which is what billing prices and logs."""

    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    request_id: str
    # The media endpoints' units the request asks for at most (`n` images, the characters to
    # read aloud, the upload's longest likely audio), which admission reserves for.
    units: Usage | None = None
    # A multipart endpoint's form (core/uploads): its fields are `body`, its files spooled.
    upload: Upload | None = None
    # The client's headers that vendors of one engine understand and the gateway passes on to
    # them (routes/_http.forwarded_headers): Anthropic's betas, OpenAI's beta and internal flags.
    forwarded: dict[str, str] | None = None


def parse_proxy_request(endpoint: str, body: Any) -> ProxyRequest:
    """Check the fields the gateway itself relies on (core/request_checks.py); the upstream validates the rest."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field is required and must be a string.", "missing_model", "model")
    required = _REQUIRED_FIELD[endpoint]
    if body.get(required) is None:
        raise bad_request(f"The '{required}' field is required.", f"missing_{required}", required)
    if endpoint in ("chat/completions", "messages") and not isinstance(body["messages"], list):
        raise bad_request("The 'messages' field must be a list of messages.", "invalid_messages", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("The 'stream' field must be true or false.", "invalid_stream", "stream")
    if stream and endpoint in _NOT_STREAMED:
        raise bad_request(f"{_NOT_STREAMED[endpoint]} cannot be streamed.", "invalid_stream", "stream")
    check_request(endpoint, body)
    return ProxyRequest(endpoint, body, model, stream, new_request_id(), requested_units(endpoint, body))


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

    def __init__(
        self, http: aiohttp.ClientSession, scheduler: Scheduler, meter: Meter, stored: StoredResponses | None = None, vendors: VendorMonths | None = None
    ):
        """Created on the loop it serves (the HTTP session is bound to it anyway). `stored`
        remembers the responses upstreams store (Responses API), for their follow-ups;
        `vendors` keeps providers' monthly budgets (core/vendors)."""
        self.http = http
        self.loop = asyncio.get_running_loop()
        self.scheduler = scheduler
        self.meter = meter
        self.stored = stored
        self.vendors = vendors
        self.gate = UpstreamGate(self.loop)  # calls in flight per provider: its max_connections

    async def handle(
        self, config: Config, key: ApiKey, request: ProxyRequest, facts: RequestFacts | None = None, client: ClientMessages | None = None
    ) -> CompletedCall | MeteredStream:
        """`facts` (core/telemetry) learns the route, the attempts and the ticket as they happen.
        `client`: the client's ASGI receive, watched for a hang-up while the request waits for
        a provider's slot (ClientLeft)."""
        facts = facts or RequestFacts(request.endpoint)
        facts.request_id, facts.key_name, facts.stream = request.request_id, key.name, request.stream
        routes = routes_for(config, request.model, key, request.endpoint)
        request = _as_public_model(request, routes)
        facts.model = request.model
        if request.endpoint == "responses":
            routes = await self._continuing(config, key, request, routes)
        if config.budgeted and self.vendors is not None:  # a provider that spent its budget is skipped
            routes = await self.vendors.usable(config, routes)
        ticket = facts.ticket = await self.meter.admit(config, key, request)
        streaming = False
        answer: Reply | UpstreamStream | None = None
        lane: Lane | None = None
        try:
            answer, route, lane = await self._first_answer(config, request, routes, key, facts, client)
            facts.provider = route.provider.name
            if isinstance(answer, UpstreamStream):
                stream = MeteredStream(answer, route, request, ticket, ticket.start_headers(), config.preferences.max_response_body_bytes, lane)
                streaming = True  # the stream ends the ticket, and frees its provider's slot, when it finishes
                return stream
            usage = complete_usage(answer.usage, lambda: _estimate(request, answer.body))
            return CompletedCall(answer, route, ticket.settle(Outcome(route.provider.name, route.upstream_name, usage, OK)))
        finally:
            if not streaming:
                ticket.release()  # a no-op once settled; frees every hold if anything above raised
                if isinstance(answer, UpstreamStream) and lane is not None:  # a stream that never reached its relay
                    answer.close()
                    lane.leave()

    async def count_tokens(self, config: Config, key: ApiKey, request: ProxyRequest) -> tuple[bytes, dict[str, str]]:
        """Anthropic's `count_tokens` for a Messages request: the vendor's own count when the
        route the key would be sent to is an Anthropic provider (with the client's betas; the
        next Anthropic route if one fails), else the gateway's estimate, as for a provider of
        another engine. Free (BillingMeter.admit_free), but limited like any request. Returns
        the JSON body and the limit headers."""
        routes = routes_for(config, request.model, key, "messages")
        request = _as_public_model(request, routes)
        ticket = await self.meter.admit_free(key, request)
        try:
            for route in self.scheduler.order(request.model, routes, key.scheduling_algorithm):
                if route.provider.engine != "anthropic":
                    break  # served elsewhere: the estimate is what that provider's request would hold
                upstream_key = self.scheduler.next_upstream_key(route.provider)
                call = UpstreamCall("messages/count_tokens", request.body, False, route, upstream_key, config.preferences.max_response_body_bytes,
                                    self.loop, forwarded=request.forwarded)  # fmt: skip
                try:
                    async with self.gate.slot(route.provider):
                        counted = await count_tokens_upstream(call, self.http)
                    return counted, ticket.settle(_free_outcome(route))
                except UpstreamBusy:
                    continue  # the provider's own log line says it is full (core/upstream_gate.py)
                except UpstreamFailure as exc:
                    if not exc.retryable:
                        raise exc.error from None
                    log.warning("%s: %s could not count tokens: %s", request.request_id, route.label, exc.error.message)
            return orjson.dumps({"input_tokens": estimate_prompt_tokens(request.body)}), ticket.settle(_free_outcome(routes[0]))
        finally:
            ticket.release()

    async def _continuing(self, config: Config, key: ApiKey, request: ProxyRequest, routes: tuple[ModelRoute, ...]) -> tuple[ModelRoute, ...]:
        """A Responses create continuing a stored response (`previous_response_id`) may only go
        to the provider holding it, and only for the key that made it (404 otherwise)."""
        previous = request.body.get("previous_response_id")
        if previous is None or self.stored is None:
            return routes
        return await self.stored.routes_following(config, key, request.model, previous, routes)

    def _on_stored(self, request: ProxyRequest, key_id: str, route: ModelRoute) -> Callable[[str], None] | None:
        """What to call with the id of a response the upstream stores (`store` is not false)."""
        if request.endpoint != "responses" or self.stored is None or request.body.get("store") is False:
            return None
        return functools.partial(self.stored.remember, key_id=key_id, provider=route.provider.name)

    async def _first_answer(
        self, config: Config, request: ProxyRequest, routes: tuple[ModelRoute, ...], key: ApiKey, facts: RequestFacts, client: ClientMessages | None
    ) -> tuple[Reply | UpstreamStream, ModelRoute, Lane]:
        """Try routes in the key's scheduling order until one answers, as many as its AUTO_RETRY
        allows; failover only on retryable failures. A provider at its max_connections is
        waited for, then passed over without a cooldown (busy is not failing). A stream comes
        with the lane whose slot it holds until it ends."""
        prefs = config.preferences
        ordered = self.scheduler.order(request.model, routes, key.scheduling_algorithm)
        if key.auto_retry is not True:
            ordered = ordered[: attempts_allowed(key.auto_retry, len(ordered))]
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
                self._on_stored(request, key.id, route),
                request.upload,
                request.forwarded,
            )
            attempt = facts.attempt(route.provider.name, route.provider.engine, route.upstream_name)
            lane = self.gate[route.provider.name]
            try:
                if not lane.take(route.provider.max_connections):
                    await _wait_for_slot(lane, route, attempt, client)
                answer = await _send(request, call, self.http, lane)
            except UpstreamBusy as exc:
                attempt.end(BUSY)
                failure = exc
                continue
            except ClientLeft:
                attempt.end(BUSY)  # no call was made
                raise
            except UpstreamFailure as exc:
                attempt.end(TIMEOUT if exc.error.code == "upstream_timeout" else ATTEMPT_FAILED)
                log.warning("%s: %s failed: %s", request.request_id, route.label, exc.error.message)
                if not exc.retryable:
                    raise exc.error from None
                self.scheduler.cool_down(route, prefs.cooldown_period)
                failure = exc
                continue
            except BaseException:  # a client error passed on, or the request cancelled
                attempt.end(ATTEMPT_FAILED)
                raise
            attempt.end(OK)
            self.scheduler.recovered(route)
            return answer, route, lane
        raise failure.error if failure else bad_gateway("No provider could serve the request.")


async def _wait_for_slot(lane: Lane, route: ModelRoute, attempt: Attempt, client: ClientMessages | None) -> None:
    """Queue for a slot of a provider at its max_connections; the attempt learns how it ended."""
    try:
        await lane.wait(route.provider, client)
    except UpstreamBusy:
        attempt.wait = BUSY
        raise
    except BaseException:
        attempt.wait = LEFT
        raise
    attempt.wait = SERVED


async def _send(request: ProxyRequest, call: UpstreamCall, http: aiohttp.ClientSession, lane: Lane) -> Reply | UpstreamStream:
    """The adapter's answer. An adapter that chokes on an answer of a shape it did not expect
    (a 200 whose JSON it cannot translate) fails like any unusable answer: a 502 the next
    provider may do better on, never a 500. The call holds a slot of `lane`, freed here unless
    the answer is a stream, which holds it until it ends (MeteredStream.finish)."""
    route = call.route
    streaming = False
    try:
        adapter = _ADAPTER_FOR.get(request.endpoint, adapter_for)(route.provider.engine)
        try:
            answer = await adapter.send(call, http)
        except (UpstreamFailure, GatewayError):
            raise
        except Exception:
            log.exception("%s: %s sent an answer its adapter could not read", request.request_id, route.label)
            raise UpstreamFailure.invalid(route) from None
        streaming = isinstance(answer, UpstreamStream)
        return answer
    finally:
        if not streaming:
            lane.leave()


# Endpoints whose adapters depend on the endpoint as well as the engine (translating ones).
_ADAPTER_FOR = {
    "messages": messages_adapter_for,
    "responses": responses_adapter_for,
    "images/generations": media_adapter_for,
    "moderations": media_adapter_for,
    "audio/speech": media_adapter_for,
    **dict.fromkeys(UPLOAD_ENDPOINTS, upload_adapter_for),
}


def _free_outcome(route: ModelRoute) -> Outcome:
    """What a free request's ticket is settled with (it charges nothing whatever it is told)."""
    return Outcome(route.provider.name, route.upstream_name, Usage(), OK)


def _as_public_model(request: ProxyRequest, routes: tuple[ModelRoute, ...]) -> ProxyRequest:
    """`provider/model` picks one route of a public model; it is priced, limited and logged as
    that model, never as the literal string (which no price entry names)."""
    public = routes[0].public_name
    return request if public == request.model else dataclasses.replace(request, model=public)


def _estimate(request: ProxyRequest, body: bytes) -> Usage:
    """Usage for an answer that reported none: estimated from the prompt and the reply text,
    read leniently (a vendor's odd shape is billed for the text found, never an error)."""
    try:
        reply = orjson.loads(body)  # as the adapter read it; a body nested too deep is a ValueError
    except ValueError:
        reply = None
    return estimate_usage(request.body, reply)


class MeteredStream:
    """An upstream stream that settles its ticket, and frees its provider's slot (`lane`,
    core/upstream_gate.py), exactly once, however it ends."""

    def __init__(self, upstream: UpstreamStream, route: ModelRoute, request: ProxyRequest, ticket: Ticket, headers: dict[str, str], max_bytes: int, lane: Lane):
        self.upstream = upstream
        self.lane = lane
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
        message = f"Provider '{self.route.provider.name}' sent a stream over the gateway's limit of {self.max_bytes} bytes."
        return self._end_with(bad_gateway(message, "upstream_response_too_large"), dropped=True)

    def unreadable(self) -> bytes:
        """End a stream whose reading raised (an event of a shape its adapter did not expect):
        the client's last event is the error; what was relayed is billed as for a cut stream."""
        log.exception("%s: %s sent a stream its adapter could not read", self.request.request_id, self.route.label)
        return self._end_with(invalid_answer(self.route), dropped=False)

    def _end_with(self, error: GatewayError, dropped: bool) -> bytes:
        """The client's last event, in its endpoint's format: Anthropic's `error` event on
        /v1/messages, a Responses `error` event on /v1/responses (as OpenAI ends one; the
        openai SDK yields it as a ResponseErrorEvent), numbered on when the stream translates
        its events itself."""
        self.upstream.close()
        self.upstream.error = error
        if self.upstream.binary:  # no error text inside audio: the relay cuts it off (`aborted`)
            return b""
        own = self.upstream.failure_events(error, dropped)
        if own is not None:
            return own
        if self.request.endpoint == "messages":  # Anthropic's clients expect its error event
            return anthropic_event("error", anthropic_error_body(error))
        if self.request.endpoint == "responses":
            return responses_error_event(error)
        return encode_event(orjson.dumps(error.body()))

    @property
    def aborted(self) -> bool:
        """A binary stream that failed: the client's connection is closed without the end of
        the body, so the client knows it lacks the rest (an ending would say it had it all)."""
        return self.upstream.binary and self.upstream.error is not None

    @property
    def report_every(self) -> float | None:
        return self._ticket.report_every if self._ticket is not None else None

    def report_progress(self) -> None:
        """Tell the ticket what the stream has used so far (fleet mode: billed should this
        process die before the stream ends)."""
        if self._ticket is not None:
            upstream = self.upstream
            usage = upstream.usage  # known from the start when exact (speech's characters)
            if usage is None or usage.estimated:
                usage = usage_so_far(upstream.partial_usage, self.request.body, upstream.completion_text_bytes)
            self._ticket.report(Outcome(self.route.provider.name, self.route.upstream_name, usage, ERROR))

    def finish(self, disconnected: bool) -> None:
        """Close the upstream and settle. Synchronous: runs inside cancellation too. Should
        reading the outcome raise, the stream is billed for its prompt alone; the ticket ends,
        and the provider's slot is freed, exactly once either way."""
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        try:
            self.upstream.close()
            self._settle(ticket, disconnected)
        except Exception:
            log.exception("%s: settling the stream from %s failed; billing the prompt estimate", self.request.request_id, self.route.label)
            ticket.settle(Outcome(self.route.provider.name, self.route.upstream_name, usage_so_far(None, self.request.body, 0), ERROR))
        finally:
            self.lane.leave()
            ticket.release()  # a no-op once settled

    def _settle(self, ticket: Ticket, disconnected: bool) -> None:
        upstream = self.upstream
        status = CLIENT_DISCONNECTED if disconnected else ERROR if upstream.error else OK
        usage = complete_usage(upstream.usage, lambda: usage_so_far(upstream.partial_usage, self.request.body, upstream.completion_text_bytes))
        if upstream.error is not None and usage.estimated and upstream.completion_text_bytes == 0:
            ticket.release()  # failed before any output: nothing to charge
            return
        ticket.settle(Outcome(self.route.provider.name, self.route.upstream_name, usage, status))
