"""Prometheus metrics: what the gateway does, counted as it happens, for `GET /metrics`.

prometheus_client does the counting and the text exposition. Each app has its own registry
(tests build several apps in one process). With `PROMETHEUS_MULTIPROC_DIR` set (`--workers N`
sets it, main.py) each worker writes its values to files there and a scrape of any worker
reads them all: the counts of the whole host, whichever worker answers.

Cheap enough to leave on: a request is counted once, at its end, from its RequestFacts, into
plain dicts (core/telemetry/series.py) that prometheus_client reads at scrape time. Label
values come from the config, never from the client (a made-up model name would otherwise
create a series per request).
"""

from __future__ import annotations

import os
from typing import TypeVar

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from core.pricing import NANOS_PER_USD
from core.telemetry.facts import RequestFacts
from core.telemetry.series import CounterSeries, GaugeSeries, HistogramSeries, Series, SeriesCollector

S = TypeVar("S", CounterSeries, HistogramSeries, GaugeSeries)

# Seconds: LLM calls run from milliseconds (an embedding) to minutes (a long stream).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# (kind label, UsageRecord field): the tokens a request was charged for.
TOKEN_KINDS = (
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("cached", "cached_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)


# No `*_created` series: they would double the exposition and no dashboard here reads them.
disable_created_metrics()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """Every metric the gateway exposes, and the one place that updates them."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        shared = self.multiprocess
        self.series: list[Series] = []

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), divisor: int = 1) -> CounterSeries:
            return self._add(CounterSeries(name, doc, labels, shared, divisor))

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = BUCKETS) -> HistogramSeries:
            return self._add(HistogramSeries(name, doc, labels, buckets, shared))

        def gauge(name: str, doc: str) -> GaugeSeries:
            return self._add(GaugeSeries(name, doc, shared))

        route = ("endpoint", "model", "provider")
        self.requests = counter("tollgate_requests", "Proxied requests, by the HTTP status answered (499: the client left).", (*route, "status_code"))
        self.duration = histogram("tollgate_request_duration_seconds", "Proxied requests: arrival to the last byte sent.", route)
        self.first_byte = histogram("tollgate_time_to_first_byte_seconds", "Streamed requests: arrival to the first chunk sent.", route)
        self.upstream = counter(
            "tollgate_upstream_requests",
            "Calls to providers, by outcome: ok, failover (failed, the request moved on), error or timeout (failed, the request's last),"
            " busy (not called: the provider was at its max_connections).",
            ("provider", "model", "outcome"),
        )
        self.waits = counter(
            "tollgate_upstream_waits",
            "Requests that found a provider at its max_connections, by how their wait for a slot ended: served, busy (503 upstream_busy) or left.",
            ("provider", "result"),
        )
        self.tokens = counter("tollgate_tokens", "Tokens charged, by kind (prompt and completion include cached and reasoning).", ("model", "kind"))
        self.cost = counter("tollgate_cost_usd", "US dollars charged (the ledger holds the exact amounts).", ("model", "cost_type"), NANOS_PER_USD)
        self.vendor_cost = counter(
            "tollgate_vendor_cost_usd",
            "US dollars the providers charge for the requests served (vendor prices; requests of unknown vendor cost add nothing).",
            ("provider", "model"),
            NANOS_PER_USD,
        )
        self.refusals = counter("tollgate_admission_refusals", "Requests refused before any provider was called, by error code.", ("code",))
        self.inflight = gauge("tollgate_inflight_requests", "Proxied requests in progress.")
        self.unwritten = gauge("tollgate_ledger_unwritten_rows", "Charges in memory waiting to be written to the ledger.")
        self.commit = histogram("tollgate_ledger_commit_seconds", "Ledger write transactions (one per group commit).", (), COMMIT_BUCKETS)
        self.reloads = counter("tollgate_config_reloads", "Config reloads, by result: ok, or error (the previous config kept serving).", ("result",))
        self.alerts = counter("tollgate_alerts", "Alert thresholds crossed, by metric.", ("metric",))
        self.key_requests = counter("tollgate_key_requests", "Proxied requests per key name (preferences.metrics.per_key).", ("key", "model"))
        self.key_tokens = counter("tollgate_key_tokens", "Tokens charged per key name (preferences.metrics.per_key).", ("key", "model", "kind"))
        self.key_cost = counter("tollgate_key_cost_usd", "US dollars charged per key name (preferences.metrics.per_key).", ("key", "model"), NANOS_PER_USD)
        self.registry = CollectorRegistry(auto_describe=False)
        if not self.multiprocess:
            self.registry.register(SeriesCollector(self.series))

    def _add(self, series: S) -> S:
        self.series.append(series)
        return series

    def request_finished(self, facts: RequestFacts, per_key: bool) -> None:
        endpoint, model, provider = facts.endpoint, facts.model, facts.provider
        route = (endpoint, model, provider)
        self.requests.inc((endpoint, model, provider, str(facts.status)))
        self.duration.observe(route, facts.ended - facts.started)
        if facts.first_byte is not None:
            self.first_byte.observe(route, facts.first_byte - facts.started)
        for attempt in facts.attempts:
            self.upstream.inc((attempt.provider, attempt.model, attempt.outcome))
            if attempt.wait:
                self.waits.inc((attempt.provider, attempt.wait))
        if facts.refused:
            self.refusals.inc((facts.error_code,))
        key = facts.key_name if per_key and facts.key_name else None
        if key is not None:
            self.key_requests.inc((key, model))
        record = facts.settled
        if record is None:
            return
        for kind, field in TOKEN_KINDS:
            count = getattr(record, field)
            if count:
                self.tokens.inc((model, kind), count)
                if key is not None:
                    self.key_tokens.inc((key, model, kind), count)
        if record.vendor_cost_nanos:
            self.vendor_cost.inc((record.provider, record.upstream_model), record.vendor_cost_nanos)
        if record.cost_nanos:
            self.cost.inc((model, record.cost_type), record.cost_nanos)  # counted in nanos, shown in dollars
            if key is not None:
                self.key_cost.inc((key, model), record.cost_nanos)

    def upstream_outcomes(self) -> dict[str, dict[str, int]]:
        """Calls per provider and outcome since this process started (the Providers page); empty
        under --workers, where each worker counts its own (Prometheus sums them)."""
        outcomes: dict[str, dict[str, int]] = {}
        for (provider, _, outcome), count in self.upstream.values.items():
            by_outcome = outcomes.setdefault(str(provider), {})
            by_outcome[str(outcome)] = by_outcome.get(str(outcome), 0) + int(count)
        return outcomes

    def ledger_committed(self, seconds: float | None, unwritten: int) -> None:
        """A group commit ended (`seconds` None: it failed and will be retried)."""
        if seconds is not None:
            self.commit.observe((), seconds)
        self.unwritten.set(unwritten)

    def config_reloaded(self, ok: bool) -> None:
        self.reloads.inc(("ok" if ok else "error",))

    def alert_fired(self, metric: str) -> None:
        self.alerts.inc((metric,))

    def exposition(self) -> bytes:
        """The text format: this process's series, or under --workers every worker's."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """A worker stopping: its live gauges leave the host's sums."""
        if self.multiprocess:
            mark_process_dead(os.getpid())
