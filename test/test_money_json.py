"""Money in JSON: plain decimal numbers, exact to the nano-dollar, never exponent notation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from routes._json import ExactJSONResponse
from test.conftest import ADMIN_KEY, FREE
from test.test_security import gateway_session

KEY = "sk-tiny-spender-0001"
COUNTED = "sk-tiny-counted-0002"
MESSAGES = [{"role": "user", "content": "hello there"}]

# $0.001 per 1M tokens: one nano-dollar a token, so a request costs some 1.7e-05 USD... of a cent.
CONFIG = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {KEY}
    name: tiny
    preferences: {{credits: 0.00005, quota: 0.00004, quota_type: usd, daily_cost_limit: 0.00003, budget: 0.00002, budget_period: monthly}}
  - api: {COUNTED}
    name: counted
    preferences: {{billing_mode: count, count_credits: 5}}
preferences:
  model_price:
    echo-1: {{token_price: '0.001,0.001', count_price: 0.000017}}
"""


def float_literals(text: str) -> list[str]:
    """Every non-integer number in a JSON document, exactly as written."""
    found: list[str] = []
    json.loads(text, parse_float=lambda literal: found.append(literal) or Decimal(literal))
    return found


def test_money_in_every_api_response_is_plain_decimal(start_gateway):
    gateway = start_gateway(CONFIG)
    usage = gateway.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES).usage
    gateway.client(COUNTED).chat.completions.create(model="echo-1", messages=MESSAGES)
    cost = Decimal(usage.prompt_tokens + usage.completion_tokens) / 10**9
    now = datetime.now(UTC)
    admin = [
        ("GET", "/v1/api_keys_states", {}),
        ("POST", "/v1/add_credits", {"paid_key": KEY, "amount": "0.000017"}),
        ("POST", "/v1/add_count_credits", {"paid_key": COUNTED, "amount": "1"}),
        ("GET", "/v1/token_usage", {}),
        ("GET", "/v1/usage", {"paid_key": COUNTED}),
    ]
    own = [
        ("GET", "/v1/usage", {}),
        ("GET", "/v1/usage/models", {}),
        ("GET", f"/v1/billing/usage/{now.year}/{now.month}", {}),
        ("GET", f"/v1/billing/bill/{now.year}/{now.month}", {}),
        ("GET", "/v1/dashboard/billing/subscription", {}),
        ("GET", "/v1/dashboard/billing/usage", {}),
    ]
    bodies = {}
    for key, calls in ((ADMIN_KEY, admin), (KEY, own)):
        for method, path, params in calls:
            response = gateway.http(method, path, key=key, params=params)
            assert response.status_code == 200, (path, response.text)
            bodies[path] = response.text
            assert [n for n in float_literals(response.text) if "e" in n.lower()] == [], (path, response.text)
    report = gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json={"api_key": KEY, "model": "echo-1", "prompt_tokens": 9, "completion_tokens": 8})
    assert report.status_code == 200 and '"cost":0.000000017,' in report.text

    state = json.loads(bodies["/v1/api_keys_states"], parse_float=Decimal)["api_keys_states"][KEY]
    assert state["total_cost"] == cost and state["credits"] == Decimal("0.00005")
    assert state["remaining_credits"] == Decimal("0.00005") - cost  # exact, not a binary float's neighbour
    assert json.loads(bodies["/v1/dashboard/billing/usage"], parse_float=Decimal)["total_usage"] == cost * 100  # cents


def test_the_largest_config_numbers_are_served_as_json(start_gateway):
    big = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
{FREE}api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {KEY}
    name: big
    preferences: {{count_credits: 1000000000000000, credits: 1000000000000000, quota: 1000000000000000}}
"""
    gateway = start_gateway(big)
    gateway.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES)
    for path in ("/v1/api_keys_states", "/v1/token_usage", f"/v1/usage?paid_key={KEY}"):
        response = gateway.http("GET", path, key=ADMIN_KEY)
        assert response.status_code == 200, (path, response.text)
    state = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][KEY]
    assert state["count_credits"] == 10**15 and state["remaining_count_credits"] == 10**15


def test_an_integer_past_64_bits_is_written_not_a_500():
    assert ExactJSONResponse({"count": 10**20, "list": [-(2**70), True, 1]}).body == b'{"count":100000000000000000000,"list":[-1180591620717411303424,true,1]}'


def test_audit_log_amounts_are_plain_decimals(start_gateway):
    gateway = start_gateway(CONFIG)
    assert gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": KEY, "amount": "0.0000001"}).status_code == 200
    assert gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params={"paid_key": COUNTED, "amount": "1.0"}).status_code == 200
    entries = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    amounts = [json.loads(entry["detail"])["amount"] for entry in reversed(entries)]
    assert amounts == ["0.0000001", "1"]
    with gateway_session(gateway, ADMIN_KEY) as web:
        page = web.get("/admin/audit").text
    assert "+1 · admin top-up" in page and "+1.0" not in page
