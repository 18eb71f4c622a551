"""Self-service usage endpoints: a key learns about itself, never about another key."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from test.conftest import ADMIN_KEY
from test.test_limits import FakeClock

KEY = "sk-self-0001"
OTHER = "sk-self-other-0002"
MESSAGES = [{"role": "user", "content": "hello there"}]  # echo: 10 prompt + 5 completion = 0.02 USD here
FEB = datetime(2026, 2, 20, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
MAR = datetime(2026, 3, 5, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()

CONFIG = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1, echo-2]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {KEY}
    name: self-user
    preferences: {{credits: 10, rate_limit: '100/min', concurrency_limit: 4, quota: 1000, daily_cost_limit: 5, expires_at: '2027-01-01T00:00:00Z'}}
  - api: {OTHER}
    name: secret-other-user
    preferences: {{credits: 3}}
preferences:
  model_price: {{default: '1000,2000'}}
"""


@pytest.fixture
def gateway_and_clock(start_gateway):
    clock = FakeClock(FEB)
    return start_gateway(CONFIG, clock=clock), clock


def get(gateway, path: str, key: str = KEY, **params):
    response = gateway.http("GET", path, key=key, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_usage_shows_balances_quota_limits_and_totals(gateway_and_clock):
    gateway, _ = gateway_and_clock
    client = gateway.client(KEY)
    client.chat.completions.create(model="echo-1", messages=MESSAGES)
    client.chat.completions.create(model="echo-2", messages=MESSAGES)
    usage = get(gateway, "/v1/usage")
    assert usage["name"] == "self-user" and usage["billing_mode"] == "token"
    assert usage["balance"]["remaining_credits"] == pytest.approx(9.96)
    assert usage["quota"] == {"type": "tokens", "limit": 1000, "used": 30, "remaining": 970}
    limits = {limit["name"]: limit for limit in usage["limits"]}
    assert limits["rate_limit"]["used"] == 2 and limits["rate_limit"]["limit"] == 100 and 0 < limits["rate_limit"]["reset_seconds"] <= 60
    assert limits["concurrency_limit"] == {"name": "concurrency_limit", "limit": 4, "used": 0, "remaining": 4}
    assert limits["daily_cost_limit"]["used"] == pytest.approx(0.04) and limits["daily_cost_limit"]["window_end"] == "2026-02-21T00:00:00+00:00"
    assert usage["totals"] == {
        "requests": 2,
        "prompt_tokens": 20,
        "completion_tokens": 10,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "total_tokens": 30,
        "cost": 0.04,
    }
    assert usage["expires_at"] == "2027-01-01T00:00:00+00:00"


def test_usage_by_model_sorted_by_tokens(gateway_and_clock):
    gateway, clock = gateway_and_clock
    client = gateway.client(KEY)
    client.chat.completions.create(model="echo-1", messages=MESSAGES)
    clock.now = MAR
    client.chat.completions.create(model="echo-2", messages=MESSAGES)
    client.chat.completions.create(model="echo-2", messages=MESSAGES)
    everything = get(gateway, "/v1/usage/models", period="all")["data"]
    assert [(row["model"], row["requests"]) for row in everything] == [("echo-2", 2), ("echo-1", 1)]
    this_month = get(gateway, "/v1/usage/models", period="monthly")["data"]
    assert [row["model"] for row in this_month] == ["echo-2"]
    assert gateway.http("GET", "/v1/usage/models", key=KEY, params={"period": "yearly"}).status_code == 400


def test_monthly_statement_has_line_items_grants_and_balances(gateway_and_clock):
    gateway, clock = gateway_and_clock
    client = gateway.client(KEY)
    client.chat.completions.create(model="echo-1", messages=MESSAGES)  # February: 0.02
    clock.now = MAR
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": KEY, "amount": "1", "reason": "march top-up"})
    client.chat.completions.create(model="echo-1", messages=MESSAGES)
    client.chat.completions.create(model="echo-2", messages=MESSAGES)
    clock.advance(3600)
    bill = get(gateway, "/v1/billing/bill/2026/03")
    assert bill["opening_balance"] == {"credits": pytest.approx(9.98), "count_credits": 0}
    assert bill["closing_balance"] == {"credits": pytest.approx(10.94), "count_credits": 0}
    assert [(item["model"], item["requests"], item["cost"]) for item in bill["line_items"]] == [("echo-1", 1, 0.02), ("echo-2", 1, 0.02)]
    assert bill["grants"] == [{"time": bill["grants"][0]["time"], "kind": "credits", "amount": 1.0, "reason": "march top-up"}]
    february = get(gateway, "/v1/billing/usage/2026/02")
    assert february["totals"]["requests"] == 1 and february["totals"]["cost"] == 0.02
    assert gateway.http("GET", "/v1/billing/usage/2026/13", key=KEY).status_code == 400


def test_legacy_dashboard_endpoints_give_a_consistent_balance(gateway_and_clock):
    gateway, _ = gateway_and_clock
    gateway.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES)
    subscription = get(gateway, "/v1/dashboard/billing/subscription")
    usage = get(gateway, "/v1/dashboard/billing/usage", start_date="2026-02-01", end_date="2026-03-01")
    assert subscription["hard_limit_usd"] == 10
    assert usage["total_usage"] == pytest.approx(2.0)  # cents
    assert subscription["hard_limit_usd"] - usage["total_usage"] / 100 == pytest.approx(get(gateway, "/v1/usage")["balance"]["remaining_credits"])
    day = next(d for d in usage["daily_costs"] if d["line_items"])
    assert day["line_items"] == [{"name": "echo-1", "cost": pytest.approx(2.0)}]
    assert get(gateway, "/dashboard/billing/subscription")["object"] == "billing_subscription"


def test_self_service_never_reveals_another_key(gateway_and_clock):
    gateway, _ = gateway_and_clock
    gateway.client(OTHER).chat.completions.create(model="echo-1", messages=MESSAGES)
    for path in (
        "/v1/usage",
        "/v1/usage/models",
        "/v1/billing/usage/2026/02",
        "/v1/billing/bill/2026/02",
        "/v1/dashboard/billing/subscription",
        "/v1/dashboard/billing/usage",
    ):
        response = gateway.http("GET", path, key=KEY)
        assert response.status_code == 200, path
        assert "secret-other-user" not in response.text and OTHER not in response.text
        assert gateway.http("GET", path, key=KEY, params={"paid_key": OTHER}).status_code == 403, path
    assert get(gateway, "/v1/usage", key=KEY)["totals"]["requests"] == 0
    assert get(gateway, "/v1/usage", key=ADMIN_KEY, paid_key=OTHER)["name"] == "secret-other-user"
