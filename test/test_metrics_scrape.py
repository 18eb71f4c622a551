"""GET /metrics after real traffic, read with prometheus_client's own parser: every counter
moved by exactly what the test sent (issue #18). And the Grafana dashboard in deploy/: it
charts every metric the gateway exposes, and only metrics it exposes.

The gateway is the real app on uvicorn, driven by the openai and anthropic SDKs; the vendors
are test/servers.py's fake, which remembers the usage it reported.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from test.conftest import ADMIN_KEY, USER_KEY, RunningGateway, clear_of_window_edge
from test.servers import FakeUpstream, completion_body, fail, hang, held_stream, openai_like
from test.test_upstream_faults import cut_stream

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tollgate-dashboard.json"
COUNT_KEY, BROKE_KEY, THROTTLED_KEY = "sk-metrics-count-0003", "sk-metrics-broke-0004", "sk-metrics-throttled-0005"
MESSAGES = [{"role": "user", "content": "hi"}]
# A non-streamed answer's usage, every kind OpenAI reports; streams report 11 prompt tokens
# and one completion token per word (test/servers.py stream_chunks).
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
STREAM_WORDS = 3  # openai_like streams "Hello", " from", " upstream"

# house-chat on p1; backup-chat on p2 (answers 500) then p3; doomed-chat on p2 alone.
CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: sk-vendor-one
    model: [house-chat]
    preferences: {{cost_price: {{default: '0.5,1'}}}}
  - provider: p2
    base_url: {{fake:p2}}
    api: sk-vendor-two
    model: [backup-chat, doomed-chat]
  - provider: p3
    base_url: {{fake:p3}}
    api: sk-vendor-three
    model: [backup-chat]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
    preferences: {{credits: 10}}
  - api: {COUNT_KEY}
    name: counted
    preferences: {{billing_mode: count, count_credits: 100}}
  - api: {BROKE_KEY}
    name: broke
    preferences: {{credits: 0}}
  - api: {THROTTLED_KEY}
    name: throttled
    preferences: {{credits: 10, rate_limit: '1/day'}}
preferences:
  model_price: {{default: '1,2'}}
  count_billing: {{default_count_price: 0.002}}
  metrics: {{public: false, per_key: false}}
"""


class Exposition:
    """One scrape of /metrics, parsed by prometheus_client."""

    def __init__(self, text: str):
        self.text = text
        self.families: list[Metric] = list(text_string_to_metric_families(text))

    def series(self, sample_name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """Every sample called `sample_name`, by the values of `labels` (which must be all it has)."""
        found: dict[tuple[str, ...], float] = {}
        for family in self.families:
            for sample in family.samples:
                if sample.name == sample_name:
                    assert set(sample.labels) == set(labels), f"{sample_name} has labels {sorted(sample.labels)}"
                    found[tuple(sample.labels[name] for name in labels)] = sample.value
        return found

    def value(self, sample_name: str) -> float:
        (value,) = self.series(sample_name).values()
        return value

    def sample_names(self) -> set[str]:
        return {sample.name for family in self.families for sample in family.samples}

    def family_names(self) -> set[str]:
        """Every metric exposed, samples or not, as PromQL names it (a counter with `_total`)."""
        return {family.name + "_total" if family.type == "counter" else family.name for family in self.families}


def scrape(gateway: RunningGateway, key: str | None = ADMIN_KEY) -> Exposition:
    response = gateway.http("GET", "/metrics", key=key)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Exposition(response.text)


def scrape_when_idle(gateway: RunningGateway) -> Exposition:
    """A scrape once no request is in flight: a request is counted when its handler ends,
    a moment after its client has read the last byte."""
    deadline = time.monotonic() + 10
    while (exposition := scrape(gateway)).value("tollgate_inflight_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return exposition


class ReportingVendor:
    """The fake vendor's answer (test/servers.py openai_like, with every usage kind when not
    streamed), remembering the usage it reported per model."""

    def __init__(self) -> None:
        self.reported: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, body: dict[str, Any], request: Request) -> Response:
        if body.get("stream"):
            self.reported.append((body["model"], {"prompt_tokens": 11, "completion_tokens": STREAM_WORDS}))
            return await openai_like(body, request)
        self.reported.append((body["model"], USAGE))
        return JSONResponse({**completion_body(body), "usage": USAGE})

    def tokens(self, key: str | None = None) -> dict[tuple[str, ...], float]:
        """What tollgate_tokens_total{model, kind} should read (with `key`: tollgate_key_tokens_total)."""
        totals: Counter[tuple[str, ...]] = Counter()
        for model, usage in self.reported:
            kinds = {
                "prompt": usage["prompt_tokens"],
                "completion": usage["completion_tokens"],
                "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                "reasoning": usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0),
            }
            for kind, count in kinds.items():
                if count:
                    totals[(model, kind) if key is None else (key, model, kind)] += count
        return dict(totals)


@pytest.fixture
def vendor(upstream: FakeUpstream) -> ReportingVendor:
    reporting = ReportingVendor()
    upstream.script("p1", reporting)
    upstream.script("p2", fail(500))
    upstream.script("p3", reporting)
    return reporting


def ledger_costs(gateway: RunningGateway, request_ids: list[str]) -> list[int]:
    """The nano-dollars the ledger charged these requests, once their rows are written."""
    database = gateway.config_path.parent / "data" / "tollgate.db"
    marks = ",".join("?" * len(request_ids))
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(database) as db:
            rows = db.execute(f"SELECT cost_nanos FROM usage WHERE request_id IN ({marks})", request_ids).fetchall()
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            assert len(rows) == len(request_ids), f"ledger rows: {rows}"
            return [cost for (cost,) in rows]
        time.sleep(0.05)


def change_config(gateway: RunningGateway, old: str, new: str) -> None:
    """Edit the running gateway's api.yaml and wait for it to be reloaded (or refused)."""
    text = gateway.config_path.read_text()
    assert old in text
    gateway.rewrite_config(text.replace(old, new))


def status_of(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def assert_dollars(measured: dict[tuple[str, ...], float], expected: dict[tuple[str, ...], Decimal]) -> None:
    """Metrics are floats: equal to the exact sums to within the float's precision."""
    assert measured.keys() == expected.keys()
    for labels, dollars in expected.items():
        assert abs(Decimal(repr(measured[labels])) - dollars) < Decimal("1e-12"), (labels, measured[labels], dollars)


def test_counters_move_by_exactly_what_was_sent(start_gateway, upstream, vendor):
    gateway = start_gateway(CONFIG, upstream)
    alice, counted = gateway.client(), gateway.client(COUNT_KEY)
    cost: Counter[tuple[str, ...]] = Counter()  # Decimal dollars, from the x-tollgate-cost headers

    for _ in range(3):
        raw = alice.chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES)
        cost[("house-chat", "token")] += Decimal(raw.headers["x-tollgate-cost"])
    for _ in range(2):
        raw = counted.chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES)
        cost[("house-chat", "count")] += Decimal(raw.headers["x-tollgate-cost"])
    stream_ids = []
    for _ in range(2):
        streamed = alice.chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES, stream=True)
        stream_ids.append(streamed.headers["x-request-id"])
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == "Hello from upstream"
    messages = anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    raw_message = messages.messages.with_raw_response.create(model="house-chat", max_tokens=50, messages=MESSAGES)
    cost[("house-chat", "token")] += Decimal(raw_message.headers["x-tollgate-cost"])
    failed_over = alice.chat.completions.with_raw_response.create(model="backup-chat", messages=MESSAGES)
    assert failed_over.headers["x-tollgate-provider"] == "p3"
    cost[("backup-chat", "token")] += Decimal(failed_over.headers["x-tollgate-cost"])
    doomed = status_of(lambda: alice.chat.completions.create(model="doomed-chat", messages=MESSAGES))
    broke = status_of(lambda: gateway.client(BROKE_KEY).chat.completions.create(model="house-chat", messages=MESSAGES))
    assert (broke.status_code, broke.body["code"]) == (402, "credit_balance_exhausted")
    clear_of_window_edge(86400, margin=5)
    raw = gateway.client(THROTTLED_KEY).chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES)
    cost[("house-chat", "token")] += Decimal(raw.headers["x-tollgate-cost"])
    throttled = status_of(lambda: gateway.client(THROTTLED_KEY).chat.completions.create(model="house-chat", messages=MESSAGES))
    assert (throttled.status_code, throttled.body["code"]) == (429, "rate_limit_exceeded")
    stranger = status_of(lambda: gateway.client("sk-nobody-knows-this").chat.completions.create(model="house-chat", messages=MESSAGES))
    assert stranger.status_code == 401
    for nanos in ledger_costs(gateway, stream_ids):  # streams carry no cost header: the ledger's charge
        cost[("house-chat", "token")] += Decimal(nanos) / 10**9

    metrics = scrape_when_idle(gateway)
    assert metrics.value("tollgate_inflight_requests") == 0
    chat, ok = "chat/completions", "200"
    requests = {
        (chat, "house-chat", "p1", ok): 3 + 2 + 2 + 1,  # alice, counted, alice's streams, throttled's first
        ("messages", "house-chat", "p1", ok): 1,
        (chat, "backup-chat", "p3", ok): 1,
        (chat, "doomed-chat", "", str(doomed.status_code)): 1,  # every provider failed: none answered
        (chat, "house-chat", "", "402"): 1,
        (chat, "house-chat", "", "429"): 1,
        (chat, "", "", "401"): 1,  # no key: never routed, so no model
    }
    assert metrics.series("tollgate_requests_total", "endpoint", "model", "provider", "status_code") == requests
    routes: Counter[tuple[str, ...]] = Counter()
    for (endpoint, model, provider, _), count in requests.items():
        routes[(endpoint, model, provider)] += count
    route_labels = ("endpoint", "model", "provider")
    assert metrics.series("tollgate_request_duration_seconds_count", *route_labels) == routes
    assert metrics.series("tollgate_request_duration_seconds_bucket", *route_labels, "le").keys() >= {(*r, "+Inf") for r in routes}
    assert all(total > 0 for total in metrics.series("tollgate_request_duration_seconds_sum", *route_labels).values())
    assert metrics.series("tollgate_time_to_first_byte_seconds_count", *route_labels) == {(chat, "house-chat", "p1"): 2}
    assert metrics.series("tollgate_upstream_requests_total", "provider", "model", "outcome") == {
        ("p1", "house-chat", "ok"): 3 + 2 + 2 + 1 + 1,
        ("p2", "backup-chat", "failover"): 1,
        ("p3", "backup-chat", "ok"): 1,
        ("p2", "doomed-chat", "error"): 1,
    }
    assert metrics.series("tollgate_tokens_total", "model", "kind") == vendor.tokens()
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # writes every queued ledger row first
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        vendor_costs = db.execute("SELECT provider, upstream_model, SUM(vendor_cost_nanos) FROM usage WHERE vendor_cost_nanos > 0 GROUP BY 1, 2").fetchall()
    # p1's vendor price is known (cost_price), p3's is not (and counts nothing, never $0).
    assert [row[:2] for row in vendor_costs] == [("p1", "house-chat")]
    expected_vendor = {(provider, model): Decimal(nanos) / 10**9 for provider, model, nanos in vendor_costs}
    assert_dollars(metrics.series("tollgate_vendor_cost_usd_total", "provider", "model"), expected_vendor)
    assert_dollars(metrics.series("tollgate_cost_usd_total", "model", "cost_type"), cost)
    assert metrics.series("tollgate_admission_refusals_total", "code") == {
        ("credit_balance_exhausted",): 1,
        ("rate_limit_exceeded",): 1,
        (stranger.body["code"],): 1,
    }
    assert not [name for name in metrics.sample_names() if name.startswith("tollgate_key_")], "per-key series only with per_key: true"


def test_metrics_need_the_admin_key_unless_public(start_gateway, upstream, vendor):
    gateway = start_gateway(CONFIG, upstream)
    unauthorized, forbidden = gateway.http("GET", "/metrics", key=None), gateway.http("GET", "/metrics", key=USER_KEY)
    # A scraper's refusal is the API's JSON error, not an HTML page.
    assert (unauthorized.status_code, unauthorized.json()["error"]["code"]) == (401, "invalid_api_key")
    assert (forbidden.status_code, forbidden.json()["error"]["code"]) == (403, "admin_required")
    assert scrape(gateway).series("tollgate_config_reloads_total", "result") == {}

    change_config(gateway, "public: false", "public: true")
    assert scrape(gateway, key=None).series("tollgate_config_reloads_total", "result") == {("ok",): 1}
    change_config(gateway, "public: true", "public: [not, a, switch]")
    assert scrape(gateway, key=None).series("tollgate_config_reloads_total", "result") == {("ok",): 1, ("error",): 1}


def test_per_key_series_name_the_key_never_its_secret(start_gateway, upstream, vendor):
    gateway = start_gateway(CONFIG.replace("per_key: false", "per_key: true"), upstream)
    alice = gateway.client()
    cost = Decimal(0)
    for _ in range(2):
        cost += Decimal(alice.chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES).headers["x-tollgate-cost"])
    refused = status_of(lambda: gateway.client(BROKE_KEY).chat.completions.create(model="house-chat", messages=MESSAGES))
    assert refused.status_code == 402

    metrics = scrape_when_idle(gateway)
    assert metrics.series("tollgate_key_requests_total", "key", "model") == {("alice", "house-chat"): 2, ("broke", "house-chat"): 1}
    assert metrics.series("tollgate_key_tokens_total", "key", "model", "kind") == vendor.tokens(key="alice")
    assert_dollars(metrics.series("tollgate_key_cost_usd_total", "key", "model"), {("alice", "house-chat"): cost})
    for secret in (USER_KEY, BROKE_KEY, ADMIN_KEY):
        assert secret not in metrics.text


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(within: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    return [p for panel in within for p in (panel, *panels(panel.get("panels", [])))]


def dashboard_queries() -> list[str]:
    board = dashboard()
    variables = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return [target["expr"] for panel in panels(board["panels"]) for target in panel.get("targets", [])] + variables


def charted_metrics() -> set[str]:
    """Metric names in the dashboard's PromQL, histograms by their family name."""
    names = {name for query in dashboard_queries() for name in re.findall(r"tollgate_[a-z_]+", query)}
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_every_charted_metric_is_exposed_and_every_exposed_metric_charted(start_gateway, upstream, vendor):
    config = CONFIG.replace("per_key: false", "per_key: true").replace("{credits: 10}", "{credits: 10, alerts: {thresholds: [0.000001]}}", 1)
    gateway = start_gateway(config, upstream)
    alice = gateway.client()
    alice.chat.completions.create(model="house-chat", messages=MESSAGES)  # crosses alice's alert threshold
    list(alice.chat.completions.create(model="house-chat", messages=MESSAGES, stream=True))
    alice.chat.completions.create(model="backup-chat", messages=MESSAGES)
    assert status_of(lambda: gateway.client(BROKE_KEY).chat.completions.create(model="house-chat", messages=MESSAGES)).status_code == 402
    change_config(gateway, "{cost_price: {default: '0.5,1'}}", "{cost_price: {default: '0.5,1'}, max_connections: 1, max_connections_wait: 0}")
    release = threading.Event()
    upstream.script("p1", held_stream(release, ["Hello", " there"]))
    held = alice.chat.completions.create(model="house-chat", messages=MESSAGES, stream=True)  # p1's one slot
    assert status_of(lambda: alice.chat.completions.create(model="house-chat", messages=MESSAGES)).status_code == 503  # a wait, refused
    release.set()
    list(held)
    change_config(gateway, "public: false", "public: true")

    deadline = time.monotonic() + 10
    while True:  # the ledger commit and the alert follow the requests, in the background
        metrics = scrape_when_idle(gateway)
        with_samples = {re.sub(r"_(bucket|sum|count)$", "", name) for name in metrics.sample_names()}
        if charted_metrics() <= with_samples or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert charted_metrics() - with_samples == set(), "charted, but no such series after traffic"
    assert {name for name in metrics.family_names() if name.startswith("tollgate_")} - charted_metrics() == set(), "exposed but not charted"


def test_dashboard_is_importable_with_a_prometheus_data_source_picked_at_import():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"] == "Tollgate"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("instance", "model"):
        assert variables[name]["type"] == "query" and variables[name]["query"]["query"].startswith("label_values(tollgate_")
    every = panels(board["panels"])
    assert len({panel["id"] for panel in every}) == len(every)
    for panel in every:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    for query in dashboard_queries():
        assert query.count("(") == query.count(")"), query
        for quantile in re.findall(r"histogram_quantile\(.*", query):  # over a rate of buckets, by le
            assert re.search(r"sum by \(le[,)].*rate\(tollgate_[a-z_]+_bucket\{", quantile), quantile


def test_a_provider_timing_out_and_a_stream_breaking_off_are_their_upstream_outcomes(start_gateway, upstream):
    """`timeout`: the provider did not answer within model_timeout (504, the request's last
    attempt); `error`: a stream that had started (200) broke off before its end."""
    upstream.script("p1", hang(3))
    upstream.script("p2", cut_stream)
    gateway = start_gateway(
        f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k1
    model: [slow-chat]
  - provider: p2
    base_url: {{fake:p2}}
    api: k2
    model: [cut-chat]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: alice
    preferences: {{credits: 10}}
preferences:
  AUTO_RETRY: false
  model_timeout: {{default: 0.5}}
  model_price: {{default: '1,2'}}
""",
        upstream,
    )
    alice = gateway.client()
    timed_out = status_of(lambda: alice.chat.completions.create(model="slow-chat", messages=MESSAGES))
    assert (timed_out.status_code, timed_out.body["code"]) == (504, "upstream_timeout")
    with pytest.raises(openai.APIError):  # the stream's last event is the gateway's error
        list(alice.chat.completions.create(model="cut-chat", messages=MESSAGES, stream=True))

    metrics = scrape_when_idle(gateway)
    assert metrics.series("tollgate_upstream_requests_total", "provider", "model", "outcome") == {
        ("p1", "slow-chat", "timeout"): 1,
        ("p2", "cut-chat", "error"): 1,
    }
    assert metrics.series("tollgate_requests_total", "endpoint", "model", "provider", "status_code") == {
        ("chat/completions", "slow-chat", "", "504"): 1,
        ("chat/completions", "cut-chat", "p2", "200"): 1,
    }
    assert metrics.series("tollgate_admission_refusals_total", "code") == {}
