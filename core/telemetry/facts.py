"""What one proxied request did, gathered as it happens and reported once when it ends.

The proxy endpoints create a `RequestFacts` when a request arrives; the gateway fills in the
route, the upstream attempts and the billing ticket; the endpoint hands it to the telemetry
(core/telemetry/__init__.py) when the answer has been sent. Metrics, the request log line and
the trace are all made from it then, in one place, so the request's path only stores a few
attributes and the three views can never disagree.

Times are `time.perf_counter()` readings; `wall_ns` anchors them to the wall clock (spans).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.errors import GatewayError
    from core.ledger import UsageRecord
    from core.metering import Ticket

# An upstream attempt's outcome (tollgate_upstream_requests_total{outcome}): it answered; it
# failed and the request moved on to another provider; it failed and was the request's last;
# no call was made, the provider being at its max_connections (core/upstream_gate.py).
OK, FAILOVER, ERROR, TIMEOUT, BUSY = "ok", "failover", "error", "timeout", "busy"
# How an attempt that found its provider at max_connections ended its wait for a slot
# (tollgate_upstream_waits_total{result}): it got one; refused (503 upstream_busy); the client left.
SERVED, LEFT = "served", "left"
# The status recorded for a client that left before it was answered (nginx's convention).
CLIENT_CLOSED = 499
# Statuses that refuse a request before any provider is called: no key, no credit, not
# allowed, too fast (tollgate_admission_refusals_total).
_REFUSALS = frozenset({401, 402, 403, 429})


class Attempt:
    """One call to one provider."""

    __slots__ = ("ended", "engine", "model", "outcome", "provider", "started", "upstream_model", "wait")

    def __init__(self, provider: str, engine: str, model: str, upstream_model: str, started: float):
        self.provider = provider
        self.engine = engine  # the provider's API: openai, azure, anthropic, gemini, ...
        self.model = model  # the public model name
        self.upstream_model = upstream_model
        self.started = started
        self.ended = started
        self.outcome = OK
        self.wait = ""  # SERVED, BUSY or LEFT when the provider was at its max_connections

    def end(self, outcome: str) -> None:
        self.outcome = outcome
        self.ended = time.perf_counter()


class RequestFacts:
    """Filled in along the request's path; read once, by `Telemetry.finish`."""

    __slots__ = (
        "attempts",
        "ended",
        "endpoint",
        "error_code",
        "first_byte",
        "key_name",
        "model",
        "provider",
        "refused",
        "request_id",
        "started",
        "status",
        "stream",
        "ticket",
        "trace_headers",
        "wall_ns",
    )

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.wall_ns = time.time_ns()
        self.ended = self.started
        self.request_id = ""
        # Labels come from the config only (the route resolved, the key found): a client's
        # made-up model name never becomes a label value (unbounded series).
        self.model = ""
        self.provider = ""
        self.key_name = ""
        self.status = 0
        self.error_code = ""  # the GatewayError code of an error answer
        self.refused = False  # refused before any upstream call (401/402/403/429)
        self.stream = False
        self.first_byte: float | None = None  # streams: when the first chunk went to the client
        self.attempts: list[Attempt] = []
        self.ticket: Ticket | None = None
        self.trace_headers: dict[str, str] | None = None  # traceparent / tracestate, when tracing is on

    def failed(self, error: GatewayError) -> None:
        """The request was answered with `error`."""
        self.status, self.error_code = error.status, error.code
        self.refused = not self.attempts and error.status in _REFUSALS

    def attempt(self, provider: str, engine: str, upstream_model: str) -> Attempt:
        """Start an attempt; the previous one, having failed, is now a failover (a busy one
        stays busy: the provider was not called)."""
        if self.attempts and self.attempts[-1].outcome not in (OK, BUSY):
            self.attempts[-1].outcome = FAILOVER
        attempt = Attempt(provider, engine, self.model, upstream_model, time.perf_counter())
        self.attempts.append(attempt)
        return attempt

    @property
    def failovers(self) -> int:
        """Attempts after which the request moved on: every one but the last (an attempt that
        answers ends the search), busy providers included."""
        return len(self.attempts) - 1 if self.attempts else 0

    @property
    def settled(self) -> UsageRecord | None:
        """The ledger row the request was charged by (None: nothing was charged)."""
        return self.ticket.settled if self.ticket is not None else None

    def seconds(self, at: float) -> float:
        return at - self.started

    def wall_time_ns(self, at: float) -> int:
        """A perf_counter reading as nanoseconds since the epoch (span start and end times)."""
        return self.wall_ns + int((at - self.started) * 1e9)
