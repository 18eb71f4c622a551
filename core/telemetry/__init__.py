"""Observability: Prometheus metrics, the request log line, OpenTelemetry traces.

All three are made from one `RequestFacts` per proxied request (facts.py), once, when the
request has been answered: the request's path only fills in a few attributes. Tracing is
optional (requirements-otel.txt) and off unless the standard OTEL_* variables ask for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from core.telemetry.facts import CLIENT_CLOSED, RequestFacts
from core.telemetry.metrics import Metrics
from core.telemetry.request_log import log_request

if TYPE_CHECKING:
    from core.config.reload import ConfigStore
    from core.telemetry.tracing import Tracing

log = logging.getLogger("tollgate.telemetry")

__all__ = ["TRACE_HEADERS", "RequestFacts", "Telemetry"]

# W3C trace context, read by the proxy endpoints with their other headers (one pass).
TRACE_HEADERS = (b"traceparent", b"tracestate")
_TRACE_HEADER_NAMES = tuple(name.decode() for name in TRACE_HEADERS)


class Telemetry:
    """The app's metrics, request log and tracing."""

    def __init__(self, store: ConfigStore):
        self.store = store
        self.metrics = Metrics()
        self.tracing: Tracing | None = None  # set by the serving process's lifespan (main.py)

    def start(self, facts: RequestFacts) -> None:
        self.metrics.inflight.add(1)

    def read_trace_headers(self, facts: RequestFacts, headers: Mapping[str, str]) -> None:
        """Keep an incoming trace context when tracing is on: the request's span continues it."""
        if self.tracing is not None:
            facts.trace_headers = {name: headers[name] for name in _TRACE_HEADER_NAMES if name in headers}

    def finish(self, facts: RequestFacts) -> None:
        """Count, log and trace the request. Never raises: the answer has been sent, and a
        failure here must not turn into an error the client sees or a lost settle."""
        facts.ended = time.perf_counter()
        if not facts.status:  # ended before any answer was recorded (cancelled): the client left
            facts.status = CLIENT_CLOSED
        try:
            self.metrics.inflight.add(-1)
            self.metrics.request_finished(facts, self.store.current.preferences.metrics.per_key)
            log_request(facts)
            if self.tracing is not None:
                self.tracing.record(facts)
        except Exception:
            log.exception("%s: recording the request's metrics, log line or trace failed", facts.request_id)

    def close(self) -> None:
        self.metrics.close()
        if self.tracing is not None:
            self.tracing.shutdown()
