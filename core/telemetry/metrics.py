"""Prometheus metrics: what the gateway does, counted as it happens, for `GET /metrics`.

prometheus_client does the counting and the text exposition. Each app has its own registry
(tests build several apps in one process). With `PROMETHEUS_MULTIPROC_DIR` set (`--workers N`
sets it, main.py) each worker writes its values to files there and a scrape of any worker
reads them all: the counts of the whole host, whichever worker answers.

Cheap enough to leave on: a request is counted once, at its end, from its RequestFacts, and
labelled children are kept in dicts (prometheus_client's `labels()` validates and locks on
every call). Label values come from the config, never from the client (a made-up model name
would otherwise create a series per request).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from core.telemetry.facts import RequestFacts

# Seconds: LLM calls run from milliseconds (an embedding) to minutes (a long stream).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
NANOS_PER_USD = 1_000_000_000
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
        self.registry = CollectorRegistry(auto_describe=False)
        self.multiprocess = multiprocess_dir() is not None

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

        route = ("endpoint", "model", "provider")
        self.requests = counter("tollgate_requests", "Proxied requests, by the HTTP status answered (499: the client left).", (*route, "status_code"))
        self.duration = histogram("tollgate_request_duration_seconds", "Proxied requests: arrival to the last byte sent.", route)
        self.first_byte = histogram("tollgate_time_to_first_byte_seconds", "Streamed requests: arrival to the first chunk sent.", route)
        self.upstream = counter(
            "tollgate_upstream_requests",
            "Calls to providers, by outcome: ok, failover (failed, the request moved on), error or timeout (failed, the request's last).",
            ("provider", "model", "outcome"),
        )
        self.tokens = counter("tollgate_tokens", "Tokens charged, by kind (prompt and completion include cached and reasoning).", ("model", "kind"))
        self.cost = counter("tollgate_cost_usd", "US dollars charged (the ledger holds the exact amounts).", ("model", "cost_type"))
        self.refusals = counter("tollgate_admission_refusals", "Requests refused before any provider was called, by error code.", ("code",))
        self.inflight = Gauge("tollgate_inflight_requests", "Proxied requests in progress.", registry=self.registry, multiprocess_mode="livesum")
        self.unwritten = Gauge(
            "tollgate_ledger_unwritten_rows", "Charges in memory waiting to be written to the ledger.", registry=self.registry, multiprocess_mode="livesum"
        )
        self.commit = histogram("tollgate_ledger_commit_seconds", "Ledger write transactions (one per group commit).", (), COMMIT_BUCKETS)
        self.reloads = counter("tollgate_config_reloads", "Config reloads, by result: ok, or error (the previous config kept serving).", ("result",))
        self.alerts = counter("tollgate_alerts", "Alert thresholds crossed, by metric.", ("metric",))
        self.key_requests = counter("tollgate_key_requests", "Proxied requests per key name (preferences.metrics.per_key).", ("key", "model"))
        self.key_tokens = counter("tollgate_key_tokens", "Tokens charged per key name (preferences.metrics.per_key).", ("key", "model", "kind"))
        self.key_cost = counter("tollgate_key_cost_usd", "US dollars charged per key name (preferences.metrics.per_key).", ("key", "model"))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """The labelled child, made once per label values."""
        handle = (id(metric), *labels)
        child = self._children.get(handle)
        if child is None:
            child = self._children[handle] = metric.labels(*labels)
        return child

    def request_finished(self, facts: RequestFacts, per_key: bool) -> None:
        child = self._child
        endpoint, model, provider = facts.endpoint, facts.model, facts.provider
        child(self.requests, endpoint, model, provider, str(facts.status)).inc()
        child(self.duration, endpoint, model, provider).observe(facts.ended - facts.started)
        if facts.first_byte is not None:
            child(self.first_byte, endpoint, model, provider).observe(facts.first_byte - facts.started)
        for attempt in facts.attempts:
            child(self.upstream, attempt.provider, attempt.model, attempt.outcome).inc()
        if facts.refused:
            child(self.refusals, facts.error_code).inc()
        key = facts.key_name if per_key and facts.key_name else None
        if key is not None:
            child(self.key_requests, key, model).inc()
        record = facts.settled
        if record is None:
            return
        for kind, field in TOKEN_KINDS:
            count = getattr(record, field)
            if count:
                child(self.tokens, model, kind).inc(count)
                if key is not None:
                    child(self.key_tokens, key, model, kind).inc(count)
        if record.cost_nanos:
            usd = record.cost_nanos / NANOS_PER_USD
            child(self.cost, model, record.cost_type).inc(usd)
            if key is not None:
                child(self.key_cost, key, model).inc(usd)

    def ledger_committed(self, seconds: float | None, unwritten: int) -> None:
        """A group commit ended (`seconds` None: it failed and will be retried)."""
        if seconds is not None:
            self.commit.observe(seconds)
        self.unwritten.set(unwritten)

    def config_reloaded(self, ok: bool) -> None:
        self._child(self.reloads, "ok" if ok else "error").inc()

    def alert_fired(self, metric: str) -> None:
        self._child(self.alerts, metric).inc()

    def exposition(self, refresh: Callable[[], None] | None = None) -> bytes:
        """The text format; `refresh` first sets the gauges read at scrape time."""
        if refresh is not None:
            refresh()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """A worker stopping: its live gauges leave the host's sums."""
        if self.multiprocess:
            mark_process_dead(os.getpid())
