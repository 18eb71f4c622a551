"""The vendor side: what each provider costs the operator, its monthly budget (alert or stop),
and the margin against what keys were billed, through the real app and fake vendors."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest

from core.config import build_config
from core.config.yamlsource import ConfigError
from test.conftest import ADMIN_KEY, USER_KEY, RunningGateway
from test.servers import FakeUpstream, fail
from test.test_limits import FakeClock
from test.test_upstream_faults import cut_stream

MESSAGES = [{"role": "user", "content": "hello there"}]
# The fake vendors report 11 prompt and 7 completion tokens per answer.
BILLED = 11 * 10_000 + 7 * 20_000  # nanos per answer at the keys' price "10,20" per 1M tokens: 0.00025 USD
P1_COST = 11 * 1_000 + 7 * 2_000  # p1's cost_price "1,2": 0.000025 USD
P2_COST = (11 * 3_000 + 7 * 4_000) // 2  # p2's "3,4" x cost_multiplier 0.5: 0.0000305 USD
CATALOG_COST = 11 * 120 + 7 * 480  # the catalog's gpt-4o-mini (0.15, 0.60) x 0.8: 0.00000468 USD
# In Kolkata (UTC+5:30) this is 2026-03-31 23:50: ten minutes before the month ends.
ZONE = ZoneInfo("Asia/Kolkata")
END_OF_MARCH = datetime(2026, 3, 31, 23, 50, tzinfo=ZONE).timestamp()

CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: sk-vendor-one
    model: [chat, house-chat]
    preferences:
      cost_price: {{chat: '1,2', house: '1,2'}}
      monthly_budget: 0.00005
      budget_action: stop
  - provider: p2
    base_url: {{fake:p2}}
    api: sk-vendor-two
    model: [chat, backup-chat]
    preferences:
      cost_price: {{default: '3,4'}}
      cost_multiplier: 0.5
  - provider: p3
    base_url: {{fake:p3}}
    api: sk-vendor-three
    model: [backup-chat, mini: cheap-chat, gpt-4o-mini: catalogued]
    preferences: {{cost_price: {{cheap-chat: '0.1,0.1'}}, cost_multiplier: 0.8}}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
preferences:
  model_price: {{default: '10,20'}}
  timezone: Asia/Kolkata
"""


def ask(gateway: RunningGateway, model: str) -> str:
    """One chat completion; the provider that served it."""
    raw = gateway.client().chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    return raw.headers["x-tollgate-provider"]


def ledger_rows(gateway: RunningGateway) -> list[tuple[Any, ...]]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # writes every queued ledger row first
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT provider, upstream_model, status, cost_nanos, vendor_cost_nanos, vendor_unit_prices FROM usage ORDER BY id").fetchall()


def states(gateway: RunningGateway, **params: str) -> dict[str, Any]:
    response = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY, params=params)
    assert response.status_code == 200, response.text
    return response.json(parse_float=Decimal)


def by_provider(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {state["provider"]: state for state in body["providers"]}


def usd(nanos: int) -> Decimal:
    return Decimal(nanos) / 10**9


def test_each_charge_stores_its_vendor_cost_at_the_serving_providers_prices(start_gateway, upstream: FakeUpstream):
    upstream.script("p2", fail(500))  # backup-chat fails over from p2 to p3
    gateway = start_gateway(CONFIG.replace("monthly_budget: 0.00005", "monthly_budget: 100"), upstream)
    assert ask(gateway, "p1/chat") == "p1"
    assert ask(gateway, "backup-chat") == "p3"  # p2 failed first: nothing of it was billed
    assert ask(gateway, "cheap-chat") == "p3"
    assert ask(gateway, "catalogued") == "p3"
    upstream.script("p1", cut_stream)  # a stream cut after output: the vendor bills what it sent
    with pytest.raises(openai.APIError):
        list(gateway.client().chat.completions.create(model="house-chat", messages=MESSAGES, stream=True))

    rows = ledger_rows(gateway)
    assert [row[:2] + row[4:] for row in rows[:4]] == [
        ("p1", "chat", P1_COST, '{"input":"1","output":"2"}'),
        ("p3", "backup-chat", None, ""),  # p3 prices only cheap-chat, the catalog lists no backup-chat: unknown, never $0
        ("p3", "mini", 11 * 80 + 7 * 80, '{"input":"0.08","output":"0.08"}'),  # found under its public name, x 0.8
        ("p3", "gpt-4o-mini", CATALOG_COST, '{"input":"0.120","output":"0.480","cache_read":"0.0600"}'),  # the catalog's, x 0.8
    ]
    # What keys pay is their own price (the catalog's list price for gpt-4o-mini, by default), whatever the vendor's.
    assert [row[3] for row in rows[:4]] == [BILLED, BILLED, BILLED, 11 * 150 + 7 * 600]
    provider, model, status, billed, cost, prices = rows[4]
    assert (provider, model, status, json.loads(prices)) == ("p1", "house-chat", "error", {"input": "1", "output": "2"})
    assert 0 < cost < billed and billed > 0  # the streamed words' cost at both prices (their ratio is the prices')
    assert [request.provider for request in upstream.seen] == ["p1", "p2", "p3", "p3", "p3", "p1"]


def test_providers_states_are_exact_to_the_nanodollar(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("monthly_budget: 0.00005", "monthly_budget: 0.001"), upstream, clock=FakeClock(END_OF_MARCH))
    for _ in range(3):
        ask(gateway, "p1/chat")
    ask(gateway, "p2/chat")
    ask(gateway, "backup-chat")  # p2 (no failure scripted): 0.5 x "3,4"
    ask(gateway, "p3/backup-chat")  # unknown vendor cost
    body = states(gateway)
    assert (body["month"], body["timezone"]) == ("2026-03", "Asia/Kolkata")
    found = by_provider(body)
    assert list(found) == ["p1", "p2", "p3"]
    p1 = found["p1"]
    assert (p1["requests_today"], p1["requests_this_month"], p1["unknown_cost_requests"]) == (3, 3, 0)
    assert (p1["cost_today"], p1["cost_this_month"]) == (usd(3 * P1_COST), usd(3 * P1_COST))
    assert (p1["billed_this_month"], p1["margin_this_month"]) == (usd(3 * BILLED), usd(3 * (BILLED - P1_COST)))
    assert (p1["monthly_budget"], p1["budget_action"], p1["budget_used"], p1["status"]) == (Decimal("0.001"), "stop", Decimal("0.075"), "ok")
    assert p1["models"] == [
        {
            "model": "chat",
            "requests": 3,
            "prompt_tokens": 33,
            "completion_tokens": 21,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "cost": usd(3 * P1_COST),
            "billed": usd(3 * BILLED),
            "margin": usd(3 * (BILLED - P1_COST)),
            "unknown_cost_requests": 0,
            "errors": 0,
        }
    ]
    p2 = found["p2"]
    assert (p2["cost_this_month"], p2["billed_this_month"], p2["margin_this_month"]) == (usd(2 * P2_COST), usd(2 * BILLED), usd(2 * (BILLED - P2_COST)))
    assert (p2["monthly_budget"], p2["budget_used"], p2["status"]) == (None, None, "ok")
    p3 = found["p3"]  # billed, but what the vendor charges is not known: no cost, no margin (never $0)
    assert (p3["requests_this_month"], p3["cost_this_month"], p3["margin_this_month"], p3["billed_this_month"]) == (1, None, None, usd(BILLED))
    assert p3["models"][0]["cost"] is None and p3["unknown_cost_requests"] == 1

    # Ten minutes later it is April in Kolkata (still March in UTC): a new month, empty.
    gateway_clock(gateway).advance(15 * 60)
    ask(gateway, "p1/chat")
    april = by_provider(states(gateway))
    assert (april["p1"]["requests_this_month"], april["p1"]["cost_this_month"], april["p1"]["requests_today"]) == (1, usd(P1_COST), 1)
    assert april["p2"]["requests_this_month"] == 0 and april["p2"]["cost_this_month"] == Decimal(0)
    march = by_provider(states(gateway, month="2026-03"))
    assert (march["p1"]["requests_this_month"], march["p1"]["cost_this_month"]) == (3, usd(3 * P1_COST))
    assert march["p1"]["status"] == "ok"  # a past month's budget is not this month's status

    for bad in ("2026-13", "March", "2026-3", "9999-12", "1969-12", "２０２６-03"):
        refused = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY, params={"month": bad})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_month")
    assert gateway.http("GET", "/v1/providers_states", key=USER_KEY).status_code == 403
    assert gateway.http("GET", "/v1/providers_states", key=None).status_code == 401


def gateway_clock(gateway: RunningGateway) -> FakeClock:
    clock = gateway.server.app.state.clock
    assert isinstance(clock, FakeClock)
    return clock


def test_a_stop_budget_moves_traffic_to_the_next_provider_until_the_month_ends(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream, clock=FakeClock(END_OF_MARCH))
    assert [ask(gateway, "chat") for _ in range(2)] == ["p1", "p1"]  # 2 x 0.000025: p1's budget of 0.00005 is spent
    assert [ask(gateway, "chat") for _ in range(2)] == ["p2", "p2"]  # fixed priority: p1 is skipped, not tried
    assert [request.provider for request in upstream.seen] == ["p1", "p1", "p2", "p2"]
    p1 = by_provider(states(gateway))["p1"]
    assert (p1["status"], p1["budget_used"], p1["cost_this_month"]) == ("over_budget", Decimal(1), usd(2 * P1_COST))

    # Only p1 serves house-chat: with its budget spent, a clear 503 in OpenAI's shape.
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.client().chat.completions.create(model="house-chat", messages=MESSAGES)
    assert refused.value.status_code == 503
    error = refused.value.body
    assert error["code"] == "provider_budget_exhausted" and error["type"] == "api_error"
    assert "p1" in error["message"] and "2026-04-01T00:00:00+05:30" in error["message"]
    assert len(upstream.seen) == 4  # refused before any vendor was called, and nothing charged
    assert len(ledger_rows(gateway)) == 4

    gateway_clock(gateway).advance(15 * 60)  # April in Kolkata: a new month, a new budget
    assert ask(gateway, "chat") == "p1"


def test_raising_the_budget_on_reload_puts_the_provider_back(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    assert [ask(gateway, "chat") for _ in range(3)] == ["p1", "p1", "p2"]
    gateway.rewrite_config(gateway.config_path.read_text().replace("monthly_budget: 0.00005", "monthly_budget: 0.0001"))
    assert [ask(gateway, "chat") for _ in range(3)] == ["p1", "p1", "p2"]


def test_a_budget_alert_is_delivered_once_naming_the_provider(start_gateway, upstream, receiver):
    config = CONFIG.replace("budget_action: stop", "budget_action: alert") + f"  alerts: {{thresholds: [0.5, 1.0], webhook_url: '{receiver.url}'}}\n"
    gateway = start_gateway(config, upstream)
    ask(gateway, "p1/chat")  # 0.000025 of 0.00005: 50%
    (first,) = receiver.wait_for(1)
    assert {k: first[k] for k in ("event", "provider", "metric", "threshold", "used", "limit")} == {
        "event": "threshold_crossed",
        "provider": "p1",
        "metric": "provider_monthly_budget",
        "threshold": 0.5,
        "used": "0.000025",
        "limit": "0.00005",
    }
    assert "key_id" not in first and "sk-vendor-one" not in json.dumps(first)
    assert [ask(gateway, "p1/chat") for _ in range(3)] == ["p1"] * 3  # alert: over budget, still served
    receiver.wait_for(2)
    time.sleep(0.3)  # time for a wrongly repeated delivery to arrive
    assert [(event["metric"], event["threshold"]) for event in receiver.received] == [("provider_monthly_budget", 0.5), ("provider_monthly_budget", 1.0)]
    assert by_provider(states(gateway))["p1"]["status"] == "over_budget"


def test_a_usage_report_counts_on_its_provider(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("monthly_budget: 0.00005", "monthly_budget: 100"), upstream)
    report = {"api_key": USER_KEY, "model": "chat", "prompt_tokens": 1000, "completion_tokens": 500, "provider": "p2"}
    answered = gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report)
    assert answered.status_code == 200, answered.text
    elsewhere = gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json={**report, "provider": "batch-job"})
    assert elsewhere.status_code == 200
    rows = ledger_rows(gateway)
    reported_cost = (1000 * 3_000 + 500 * 4_000) // 2  # p2's price for chat, x 0.5
    assert [row[:2] + row[3:5] for row in rows] == [("p2", "chat", 1000 * 10_000 + 500 * 20_000, reported_cost), ("batch-job", "chat", 20_000_000, None)]
    found = by_provider(states(gateway))
    assert (found["p2"]["requests_this_month"], found["p2"]["cost_this_month"]) == (1, usd(reported_cost))
    assert (found["batch-job"]["configured"], found["batch-job"]["cost_this_month"], found["batch-job"]["billed_this_month"]) == (False, None, usd(20_000_000))


@pytest.mark.parametrize(
    ("prefs", "problem"),
    [
        ("{budget_action: stop}", "needs a monthly_budget"),
        ("{monthly_budget: 0}", "monthly_budget"),
        ("{monthly_budget: 10, budget_action: halt}", "budget_action"),
        ("{cost_multiplier: -1}", "cost_multiplier"),
        ("{cost_price: {chat: '1,2,3'}}", "cost_price.chat"),
        ("{cost_price: {chat: {tokens: '1,2'}}}", "tokens"),
    ],
)
def test_vendor_settings_that_make_no_sense_are_refused_where_they_are(prefs: str, problem: str):
    text = f"providers:\n  - provider: p1\n    engine: echo\n    model: [chat]\n    preferences: {prefs}\napi_keys:\n  - api: {ADMIN_KEY}\n    role: admin\n"
    with pytest.raises(ConfigError) as refused:
        build_config(text + "preferences:\n  model_price: {default: 1}\n", "api.yaml")
    assert problem in refused.value.reason and refused.value.line == 5


def test_fifty_concurrent_requests_add_up_exactly_and_alert_once(start_gateway, upstream, receiver):
    config = CONFIG.replace("monthly_budget: 0.00005", "monthly_budget: 0.001").replace("budget_action: stop", "budget_action: alert")
    gateway = start_gateway(config + f"  alerts: {{thresholds: [0.5], webhook_url: '{receiver.url}'}}\n", upstream)
    statuses = gateway.fire(USER_KEY, 60, model="p1/chat", messages=MESSAGES)
    assert statuses == [200] * 60
    p1 = by_provider(states(gateway))["p1"]
    assert (p1["requests_this_month"], p1["cost_this_month"], p1["billed_this_month"]) == (60, usd(60 * P1_COST), usd(60 * BILLED))
    assert p1["budget_used"] == Decimal("1.5")
    assert sum(row[4] for row in ledger_rows(gateway)) == 60 * P1_COST
    receiver.wait_for(1)
    time.sleep(0.3)
    assert [(event["provider"], event["threshold"]) for event in receiver.received] == [("p1", 0.5)]  # crossed once, sent once


def test_the_admin_api_shows_each_routes_vendor_price_and_where_it_came_from(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    rows = {(row["provider"], row["model"]): row["vendor_price"] for row in gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["model_prices"]}
    assert {k: rows["p2", "chat"][k] for k in ("source", "source_detail", "input", "output")} == {
        "source": "default",
        "source_detail": "cost_price.default",
        "input": "1.5",  # "3,4" x cost_multiplier 0.5
        "output": "2",
    }
    assert rows["p3", "cheap-chat"]["source_detail"] == "cost_price.cheap-chat" and rows["p3", "backup-chat"] is None
    assert rows["p3", "catalogued"]["source"] == "catalog" and rows["p3", "catalogued"]["input"] == "0.12"
