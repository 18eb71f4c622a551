"""The contract every provider adapter fulfils.

An adapter turns one `UpstreamCall` into either a finished `Reply` or a started
`UpstreamStream`, or raises `UpstreamFailure` saying whether another provider may be tried.
Billing never looks inside vendor formats: it reads `Usage` from these objects.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from core.config import DEFAULT_MAX_RESPONSE_BODY, ModelRoute
from core.errors import GatewayError, bad_gateway, gateway_timeout
from core.uploads import Upload
from core.usage import Usage

SSE_CONTENT_TYPE = "text/event-stream"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    endpoint: str  # "chat/completions" | "completions" | "embeddings" | "messages" (to Anthropic natively) | "responses"
    body: dict[str, Any]
    stream: bool
    route: ModelRoute
    upstream_key: str
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BODY  # preferences.max_response_body_bytes
    # The event loop the call runs on, when the caller knows it: finding it again costs a
    # getpid() syscall per lookup in Python 3.11 (see core.deadlines.Deadline).
    loop: asyncio.AbstractEventLoop | None = None
    # Called with the id of a response the upstream keeps (a Responses create that may be
    # stored), as soon as the id is known: follow-ups on it must reach this provider.
    stored: Callable[[str], None] | None = None
    upload: Upload | None = None  # the multipart endpoints' form, sent again on each attempt
    forwarded: dict[str, str] | None = None  # client headers for vendors that read them (ProxyRequest.forwarded)

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class Reply:
    """A complete upstream answer, already in OpenAI's format."""

    status: int
    body: bytes
    usage: Usage | None
    content_type: str = JSON_CONTENT_TYPE


class UpstreamFailure(Exception):
    """The upstream did not give a usable answer. `retryable` means another provider may."""

    def __init__(self, error: GatewayError, *, retryable: bool, upstream_status: int | None = None):
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.upstream_status = upstream_status

    @classmethod
    def timeout(cls, route: ModelRoute) -> UpstreamFailure:
        return cls(gateway_timeout(f"Provider '{route.provider.name}' did not answer within {route.timeout:g}s."), retryable=True)

    @classmethod
    def invalid(cls, route: ModelRoute) -> UpstreamFailure:
        """A 200 that is no answer (not the shape its endpoint promises): another provider may do better."""
        return cls(invalid_answer(route), retryable=True)

    @classmethod
    def unreachable(cls, route: ModelRoute, exc: BaseException) -> UpstreamFailure:
        return cls(bad_gateway(f"Provider '{route.provider.name}' could not be reached: {type(exc).__name__}.", "upstream_unreachable"), retryable=True)


def final_body(call: UpstreamCall, body: dict[str, Any]) -> dict[str, Any]:
    """The JSON body to send the vendor: `body` (in its format) with the provider's
    post_body_parameter_overrides applied, resolved at load (core/body_overrides.py)."""
    overrides = call.route.provider.body_overrides
    return body if overrides is None else overrides.apply(call.route.public_name, body)


def invalid_answer(route: ModelRoute) -> GatewayError:
    return bad_gateway(f"Provider '{route.provider.name}' sent an answer the gateway cannot read.", "upstream_invalid_response")


class UpstreamStream(ABC):
    """A stream the upstream has started (status 200). Iterate it for the bytes to send.

    When iteration ends, `usage` holds what the upstream reported (None if it did not;
    marked estimated, a count 0, if it lacked one: see usage.complete_usage),
    `completion_text_bytes` how much text was streamed (for estimates), and `error` any
    failure that cut the stream short. `partial_usage` holds what the upstream reported on
    the way (Anthropic's prompt counts in `message_start`), so a stream cut off or abandoned
    before its final report still bills the vendor's figures. All of these are final once
    `close()` has run (a translating stream takes them from the stream it wraps only then).
    `close()` is synchronous so it can run during cancellation, when awaiting is no longer possible.

    `complete` turns True just before the stream yields its end marker (`data: [DONE]`, or
    `message_stop` on /v1/messages): a client that has that chunk has the whole answer, and
    may hang up before the upstream's own end of stream without it being a disconnect.
    """

    content_type = SSE_CONTENT_TYPE
    # Raw bytes (audio), not events: nothing may be written into it, so a stream that fails
    # is cut off (connection closed) rather than ended with an error event.
    binary = False

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.partial_usage: Usage | None = None
        self.completion_text_bytes = 0
        self.error: GatewayError | None = None
        self.complete = False

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    def close(self) -> None: ...

    def failure_events(self, error: GatewayError, dropped: bool) -> bytes | None:
        """What ends this stream when the gateway cuts it off with `error` (core.proxy), for
        a stream whose format knows better than its endpoint's plain error event; None here.
        `dropped`: the last chunk this stream yielded was not relayed (it passed the limit)."""
        return None


class Adapter(Protocol):
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream: ...


def translate_batch(events: list[bytes], translate: Callable[[bytes], Iterable[bytes]]) -> tuple[list[bytes], Exception | None]:
    """Translate one read's events in order. An event its adapter cannot read stops the batch
    and is handed back to raise, but what the events before it said is still relayed: it was
    counted for billing as it was translated, so the client must get it too."""
    out: list[bytes] = []
    try:
        for event in events:
            out.extend(translate(event))
    except Exception as exc:
        return out, exc
    return out, None
