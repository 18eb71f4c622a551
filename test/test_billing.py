"""Billing end to end: the real gateway, the openai SDK, a fake upstream, the SQLite ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from test.conftest import ADMIN_KEY
from test.servers import completion_body, fail, sse, streamed_text

TOKEN_KEY = "sk-token-user-0001"
COUNT_KEY = "sk-count-user-0002"
HYBRID_KEY = "sk-hybrid-user-0003"
MESSAGES = [{"role": "user", "content": "hello there"}]

CONFIG = f"""
# Billing test config: comments must survive set_billing_mode.
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o, claude-3-5-sonnet]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {TOKEN_KEY}
    name: tokens   # the token user
    preferences: {{billing_mode: token, credits: 10}}
  - api: {COUNT_KEY}
    name: counts
    preferences: {{billing_mode: count, count_credits: 10}}
  - api: {HYBRID_KEY}
    name: hybrid
    preferences: {{billing_mode: hybrid, credits: 5, count_credits: 3}}
preferences:
  count_billing:
    enabled: true
    default_count_price: 0.001
    model_count_prices: {{gpt-4o: 0.008}}
  model_price:
    gpt-4o: 1000,2000
    claude-3-5-sonnet: 1000,2000
"""
# The fake upstream reports 11 prompt + 7 completion tokens: 11*1000/1M + 7*2000/1M = 0.025 USD.
REPLY_COST = Decimal("0.025")


def states(gateway) -> dict[str, Any]:
    return gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]


def ledger_rows(gateway, sql: str = "SELECT status, cost_type, cost_nanos, count_charged FROM usage ORDER BY id") -> list[tuple]:
    path = gateway.config_path.parent / "data" / "tollgate.db"
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def wait_for_rows(gateway, sql: str) -> list[tuple]:
    """`ledger_rows` once there are any: a stream the client hung up on settles when the gateway notices."""
    deadline = time.monotonic() + 10
    while not (rows := ledger_rows(gateway, sql)) and time.monotonic() < deadline:
        states(gateway)  # flushes the ledger
        time.sleep(0.05)
    return rows


def test_token_key_is_charged_the_reported_usage(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(TOKEN_KEY).chat.completions.with_raw_response.create(model="claude-3-5-sonnet", messages=MESSAGES)
    assert Decimal(raw.headers["x-tollgate-cost"]) == REPLY_COST
    assert Decimal(raw.headers["x-tollgate-credits-remaining"]) == 10 - REPLY_COST
    state = states(gateway)[TOKEN_KEY]
    assert state["remaining_credits"] == pytest.approx(float(10 - REPLY_COST))
    assert state["total_cost"] == 0.025 and state["request_count"] == 1
    assert state["cost_details"]["billing_details"][0] | {} == {
        "model": "claude-3-5-sonnet",
        "cost": 0.025,
        "cost_type": "token",
        "request_count": 1,
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "total_tokens": 18,
        "count_credits_used": 0,
    }


def test_token_key_stream_is_charged_from_the_final_usage_chunk(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)
    # Fake stream usage: 11 prompt + 3 completion tokens.
    expected = (11 * 1000 + 3 * 2000) / 1_000_000
    assert states(gateway)[TOKEN_KEY]["total_cost"] == pytest.approx(expected)
    assert ledger_rows(gateway) == [("ok", "token", int(expected * 1e9), 0)]


def test_count_key_spends_one_credit_per_request_and_records_the_count_price(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(COUNT_KEY).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-tollgate-count-credits-remaining"] == "9"
    assert raw.headers["x-tollgate-cost"] == "0.008"
    state = states(gateway)[COUNT_KEY]
    assert state["remaining_count_credits"] == 9 and state["total_cost"] == 0.008


def test_count_key_rejects_request_after_last_credit(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("count_credits: 10", "count_credits: 2"), upstream)
    client = gateway.client(COUNT_KEY)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 402
    assert caught.value.body == {"message": caught.value.body["message"], "type": "insufficient_quota", "code": "count_credits_exhausted", "param": None}
    assert len(upstream.seen) == 2


def test_hybrid_key_uses_count_billing_only_for_models_with_an_explicit_count_price(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(HYBRID_KEY)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # named count price: count
    client.chat.completions.create(model="claude-3-5-sonnet", messages=MESSAGES)  # default count price only: token
    state = states(gateway)[HYBRID_KEY]
    assert state["remaining_count_credits"] == 2
    assert state["remaining_credits"] == pytest.approx(float(5 - REPLY_COST))
    assert state["total_cost"] == pytest.approx(0.008 + 0.025)


def test_count_billing_disabled_bills_every_key_by_tokens(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("enabled: true", "enabled: false"), upstream)
    gateway.client(COUNT_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    state = states(gateway)[COUNT_KEY]
    assert state["billing_mode"] == "token"
    assert state["remaining_count_credits"] == 10 and state["total_cost"] == 0.025


def test_token_key_with_no_balance_gets_402(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("token, credits: 10}", "token, credits: 0.02}"), upstream)
    client = gateway.client(TOKEN_KEY)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)  # reserve 0.02 fits, costs 0.025
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert caught.value.status_code == 402 and caught.value.body["code"] == "credit_balance_exhausted"


def test_upstream_error_is_not_billed(start_gateway, upstream):
    upstream.script("p1", fail(500))
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.APIStatusError):
        gateway.client(COUNT_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    state = states(gateway)[COUNT_KEY]
    assert state["remaining_count_credits"] == 10 and state["total_cost"] == 0
    assert ledger_rows(gateway) == [("error", "count", 0, 0)]


def test_missing_usage_is_estimated_and_marked(start_gateway, upstream):
    async def no_usage(body: dict[str, Any], request: Request) -> Response:
        data = completion_body(body, "four")
        del data["usage"]
        return JSONResponse(data)

    upstream.script("p1", no_usage)
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    states(gateway)  # reading the states flushes the ledger's write queue
    ((status, cost_type, cost, _),) = ledger_rows(gateway)
    assert status == "estimated" and cost_type == "token"
    # 10 prompt tokens estimated from the messages, 1 completion token for "four".
    assert cost == (10 * 1000 + 1 * 2000) * 1000


# What a usage object without both counts bills: the counts it gives (a missing one worked out
# from total_tokens when it can be) and the estimate for the rest: 10 prompt tokens from the
# messages, 1 completion token for "four".
PARTIAL_USAGE = {
    "total only": ({"total_tokens": 160}, "estimated", 10, 1),
    "empty": ({}, "estimated", 10, 1),
    "prompt only": ({"prompt_tokens": 11}, "estimated", 11, 1),
    "completion only": ({"completion_tokens": 7}, "estimated", 10, 7),
    "prompt and total": ({"prompt_tokens": 11, "total_tokens": 18}, "ok", 11, 7),
    "completion and total": ({"completion_tokens": 7, "total_tokens": 18}, "ok", 11, 7),
}


@pytest.mark.parametrize("usage, status, prompt, completion", PARTIAL_USAGE.values(), ids=PARTIAL_USAGE.keys())
@pytest.mark.parametrize("stream", [False, True])
def test_a_partial_usage_report_is_completed_by_estimate_never_billed_as_zero(start_gateway, upstream, usage, status, prompt, completion, stream):
    from starlette.responses import StreamingResponse

    async def partial(body: dict[str, Any], request: Request) -> Response:
        if not stream:
            return JSONResponse({**completion_body(body, "four"), "usage": usage})
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": "four"}, "finish_reason": "stop"}]}, {**base, "choices": [], "usage": usage}]
        chunks = [sse(e) for e in events] + [sse(b"[DONE]")]
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    upstream.script("p1", partial)
    gateway = start_gateway(CONFIG, upstream)
    gateway.http("POST", "/v1/chat/completions", key=TOKEN_KEY, json={"model": "gpt-4o", "messages": MESSAGES, "stream": stream}).raise_for_status()
    states(gateway)
    assert ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage") == [(status, prompt, completion)]


def test_missing_usage_is_estimated_from_the_reasoning_too(start_gateway, upstream):
    async def no_usage(body: dict[str, Any], request: Request) -> Response:
        answer = completion_body(body, "abcd")
        answer["choices"][0]["message"]["reasoning_content"] = "abcdefgh" * 50  # DeepSeek's field: 100 tokens
        return JSONResponse({k: v for k, v in answer.items() if k != "usage"})

    upstream.script("p1", no_usage)
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    states(gateway)
    assert ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage") == [("estimated", 10, 101)]


def test_client_disconnect_mid_stream_charges_what_was_streamed(start_gateway, upstream):
    from test.test_proxy import test_client_disconnect_cancels_the_upstream_stream as disconnect_scenario

    del disconnect_scenario  # same upstream shape as the proxy test, but checked against the ledger
    from starlette.responses import StreamingResponse

    from test.servers import stream_chunks

    async def endless(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            while True:
                yield stream_chunks(body, ["tick"])[0]
                await asyncio.sleep(0.02)

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", endless)
    gateway = start_gateway(CONFIG, upstream)
    stream = gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    next(iter(stream))
    stream.close()
    ((status, completion_tokens, cost),) = wait_for_rows(gateway, "SELECT status, completion_tokens, cost_nanos FROM usage")
    assert status == "client_disconnected" and completion_tokens >= 1 and cost > 0


def test_concurrent_requests_on_a_count_key_never_overspend(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)

    results = gateway.fire(COUNT_KEY, 50, model="gpt-4o", messages=MESSAGES)
    assert results.count(200) == 10 and results.count(402) == 40
    assert states(gateway)[COUNT_KEY]["remaining_count_credits"] == 0
    assert len(upstream.seen) == 10


def test_concurrent_token_requests_with_max_tokens_never_go_below_zero(start_gateway, upstream):
    # Each request reserves (prompt estimate 10 + max_tokens 7) at 1000/2000 per 1M and costs 0.025.
    gateway = start_gateway(CONFIG.replace("token, credits: 10}", "token, credits: 0.3}"), upstream)

    results = gateway.fire(TOKEN_KEY, 60, model="gpt-4o", messages=MESSAGES, max_tokens=7)
    remaining = states(gateway)[TOKEN_KEY]["remaining_credits"]
    assert remaining >= 0
    assert results.count(200) == round((0.3 - remaining) / 0.025)
    assert results.count(200) >= 10 and set(results) == {200, 402}


def test_balances_survive_a_restart(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(COUNT_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "amount": "1.5"})
    before = states(gateway)
    gateway.server.stop()
    again = start_gateway(gateway.config_path.read_text(), upstream)
    after = states(again)
    for key in (COUNT_KEY, TOKEN_KEY):
        for field in ("remaining_credits", "remaining_count_credits", "total_cost", "request_count", "credits"):
            assert after[key][field] == before[key][field], (key, field)
    assert after[TOKEN_KEY]["remaining_credits"] == pytest.approx(11.5 - 0.025)


def test_top_ups_apply_once_per_idempotency_key(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    params = {"paid_key": COUNT_KEY, "amount": "5"}
    headers = {"Idempotency-Key": "topup-42"}
    first = gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params=params, headers=dict(headers)).json()
    second = gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params=params, headers=dict(headers)).json()
    assert first["applied"] is True and second["applied"] is False
    assert second["api_key_state"]["remaining_count_credits"] == 15
    gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params=params)
    assert states(gateway)[COUNT_KEY]["remaining_count_credits"] == 20


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v1/add_credits", {"paid_key": TOKEN_KEY, "amount": "-1"}, 400, "invalid_amount"),
        ("/v1/add_credits", {"paid_key": TOKEN_KEY, "amount": "NaN"}, 400, "invalid_amount"),
        ("/v1/add_credits", {"paid_key": TOKEN_KEY, "amount": "ten"}, 400, "invalid_amount"),
        ("/v1/add_count_credits", {"paid_key": COUNT_KEY, "amount": "1.5"}, 400, "invalid_amount"),
        ("/v1/add_credits", {"paid_key": "sk-nobody", "amount": "1"}, 404, "key_not_found"),
        ("/v1/add_credits", {"amount": "1"}, 400, "missing_paid_key"),
        ("/v1/set_billing_mode", {"paid_key": TOKEN_KEY, "billing_mode": "free"}, 400, "invalid_billing_mode"),
    ],
)
def test_admin_billing_input_errors(start_gateway, upstream, path, params, status, code):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", path, key=ADMIN_KEY, params=params)
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert ledger_rows(gateway, "SELECT COUNT(*) FROM grants") == [(0,)]


def test_admin_billing_routes_refuse_user_keys(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    assert gateway.http("GET", "/v1/api_keys_states", key=TOKEN_KEY).status_code == 403
    assert gateway.http("POST", "/v1/add_credits", key=TOKEN_KEY, params={"paid_key": TOKEN_KEY, "amount": "5"}).status_code == 403
    assert gateway.http("POST", "/v1/set_billing_mode", key=TOKEN_KEY, params={"paid_key": TOKEN_KEY, "billing_mode": "count"}).status_code == 403
    assert gateway.http("POST", "/v1/usage/report", key=TOKEN_KEY, json={}).status_code == 403


def test_set_billing_mode_rewrites_yaml_keeping_comments(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "billing_mode": "count"})
    assert response.status_code == 200
    assert response.json()["api_key_state"]["billing_mode"] == "count"
    text = gateway.config_path.read_text()
    assert "# Billing test config: comments must survive set_billing_mode." in text
    assert "# the token user" in text
    assert "billing_mode: count, credits: 10" in text
    with pytest.raises(openai.APIStatusError) as caught:  # count mode with no count credits
        gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 402


def test_set_billing_mode_on_an_unwritable_config_gives_409(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    before = gateway.config_path.read_text()
    with read_only_directory(gateway.config_path.parent):
        response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "billing_mode": "count"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "config_not_writable"
    assert gateway.config_path.read_text() == before
    assert states(gateway)[TOKEN_KEY]["billing_mode"] == "token"


@contextlib.contextmanager
def read_only_directory(path):
    """chmod does not stop root, so use the immutable attribute where the tests run as root."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
            pytest.skip("cannot make a directory read-only for root here (no chattr)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)


def test_token_usage_permissions(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    own = gateway.http("GET", "/v1/token_usage", key=TOKEN_KEY)
    assert own.status_code == 200
    (stats,) = own.json()["stats"]
    assert stats["usage"][0]["model"] == "gpt-4o" and stats["usage"][0]["prompt_tokens"] == 11
    assert TOKEN_KEY not in own.text
    other = gateway.http("GET", "/v1/token_usage", key=TOKEN_KEY, params={"api_key_param": COUNT_KEY})
    assert other.status_code == 403
    admin = gateway.http("GET", "/v1/token_usage", key=ADMIN_KEY, params={"api_key_param": TOKEN_KEY, "last_n_days": "1", "model": "gpt-4o"})
    assert admin.json()["stats"][0]["total_cost"] == 0.025
    empty = gateway.http("GET", "/v1/token_usage", key=ADMIN_KEY, params={"api_key_param": TOKEN_KEY, "end_datetime": "2000-01-01T00:00:00Z"})
    assert empty.json()["stats"][0]["usage"] == []


def test_token_usage_answers_in_uniapis_shape_when_asked(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    for key in (TOKEN_KEY, TOKEN_KEY, COUNT_KEY):
        gateway.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gateway.client(TOKEN_KEY).chat.completions.create(model="claude-3-5-sonnet", messages=MESSAGES)
    mine = gateway.http("GET", "/v1/token_usage", key=TOKEN_KEY, params={"format": "uniapi"})
    assert mine.status_code == 200 and TOKEN_KEY not in mine.text
    body = mine.json()
    row = {"api_key_prefix": "sk-…001", "total_prompt_tokens": 22, "total_completion_tokens": 14, "total_tokens": 36, "request_count": 2}
    assert body["usage"] == [
        {**row, "model": "claude-3-5-sonnet", "total_prompt_tokens": 11, "total_completion_tokens": 7, "total_tokens": 18, "request_count": 1},
        {**row, "model": "gpt-4o"},
    ]
    details = body["query_details"]
    start, end = (datetime.fromisoformat(details[name]) for name in ("start_datetime", "end_datetime"))
    assert end - start == timedelta(days=30) and abs(end.timestamp() - time.time()) < 60  # uni-api's default window
    assert {name: details[name] for name in ("api_key_filter", "model_filter", "credits", "total_cost", "balance", "billing_mode")} == {
        "api_key_filter": "self", "model_filter": "all", "credits": "$10.0", "total_cost": "$0.075", "balance": "$9.925", "billing_mode": "token",
    }  # fmt: skip
    assert details["count_credits"] == 0 and details["total_requests"] == 3
    counted = gateway.http(
        "GET", "/v1/token_usage", key=ADMIN_KEY, params={"format": "uniapi", "api_key_param": COUNT_KEY, "model": "gpt-4o", "last_n_days": 1}
    )
    details = counted.json()["query_details"]
    assert details["billing_mode"] == "count" and details["count_credits"] == 10 and details["count_balance"] == 9 and details["total_requests"] == 1
    assert details["api_key_filter"] == "sk-…002" and details["model_filter"] == "gpt-4o" and COUNT_KEY not in counted.text
    everyone = gateway.http("GET", "/v1/token_usage", key=ADMIN_KEY, params={"format": "uniapi", "start_datetime": "0"}).json()  # Unix time, as uni-api takes
    assert [(r["api_key_prefix"], r["model"]) for r in everyone["usage"]] == [
        ("sk-…001", "claude-3-5-sonnet"),
        ("sk-…001", "gpt-4o"),
        ("sk-…002", "gpt-4o"),
    ]
    assert everyone["query_details"]["api_key_filter"] == "all" and everyone["query_details"]["credits"] is None
    assert everyone["query_details"]["start_datetime"] == "1970-01-01T00:00:00+00:00" and everyone["query_details"]["end_datetime"] is None
    unknown = gateway.http("GET", "/v1/token_usage", key=TOKEN_KEY, params={"format": "csv"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_format" and unknown.json()["error"]["param"] == "format"


def test_top_ups_answer_the_new_total_as_uni_api_does(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    counted = gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params={"paid_key": COUNT_KEY, "amount": "100"}).json()
    assert counted["new_count_credits"] == 110 and counted["applied"] is True and counted["api_key_state"]["remaining_count_credits"] == 110
    paid = gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "amount": "2.5"})
    assert paid.json()["new_credits"] == 12.5 and b'"new_credits":12.5' in paid.content


def test_usage_report_bills_external_usage_by_the_same_rules(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    body = {"api_key": TOKEN_KEY, "model": "gpt-4o", "prompt_tokens": 11, "completion_tokens": 7}
    response = gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=body)
    assert response.status_code == 200 and response.json()["cost"] == 0.025
    assert states(gateway)[TOKEN_KEY]["remaining_credits"] == pytest.approx(9.975)
    bad = gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json={**body, "prompt_tokens": -3})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_prompt_tokens"


@pytest.mark.parametrize(
    ("key", "model", "field", "expected"),
    [
        (COUNT_KEY, "gpt-4o", "remaining_count_credits", 9),
        (HYBRID_KEY, "gpt-4o", "remaining_count_credits", 2),
        (HYBRID_KEY, "claude-3-5-sonnet", "remaining_credits", 5 - 0.017),  # stream usage: 11 prompt + 3 completion
    ],
)
def test_streams_are_billed_in_every_mode(start_gateway, upstream, key, model, field, expected):
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(gateway.client(key).chat.completions.create(model=model, messages=MESSAGES, stream=True))
    assert streamed_text(chunks) == "Hello from upstream"
    assert states(gateway)[key][field] == pytest.approx(expected)


def test_created_at_starts_a_new_billing_window(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert states(gateway)[TOKEN_KEY]["remaining_credits"] == pytest.approx(9.975)
    import datetime

    time.sleep(0.01)
    now = datetime.datetime.now(datetime.UTC).isoformat()
    gateway.rewrite_config(CONFIG.replace("token, credits: 10}", f"token, credits: 10, created_at: '{now}'}}").replace("{fake:p1}", upstream.base_url("p1")))
    state = states(gateway)[TOKEN_KEY]
    assert state["remaining_credits"] == 10 and state["total_cost"] == 0 and state["request_count"] == 0
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert states(gateway)[TOKEN_KEY]["remaining_credits"] == pytest.approx(9.975)
    assert len(ledger_rows(gateway)) == 2, "history before the window is kept, just not counted"


@pytest.mark.parametrize(
    ("pieces", "completion_tokens"),
    [
        (["abcd", "efgh"], 2),  # 8 streamed bytes = 2 completion tokens
        (["abcdefgh"] * 5000, 10000),  # long enough that the gateway counts the text as it goes
    ],
)
def test_stream_without_usage_is_estimated_from_the_streamed_text(start_gateway, upstream, pieces, completion_tokens):
    from starlette.responses import StreamingResponse

    from test.servers import stream_chunks

    async def no_usage_stream(body: dict[str, Any], request: Request) -> Response:
        chunks = stream_chunks({**body, "stream_options": None}, pieces)  # an upstream that ignores include_usage

        async def gen():  # type: ignore[no-untyped-def]
            for chunk in chunks:
                yield chunk

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", no_usage_stream)
    gateway = start_gateway(CONFIG, upstream)
    list(gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    rows = wait_for_rows(gateway, "SELECT status, prompt_tokens, completion_tokens, cost_nanos FROM usage")
    # 10 prompt tokens estimated from the messages; 4 streamed bytes per completion token.
    assert rows == [("estimated", 10, completion_tokens, (10 * 1000 + completion_tokens * 2000) * 1000)]


def test_stream_the_client_leaves_after_done_is_not_a_disconnect(start_gateway, upstream):
    from starlette.responses import StreamingResponse

    from test.servers import stream_chunks

    async def done_then_linger(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for chunk in stream_chunks(body, ["abcd", "efgh"]):
                yield chunk
            await asyncio.sleep(1)  # the vendor ends its response well after its [DONE]

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", done_then_linger)
    gateway = start_gateway(CONFIG, upstream)
    # The SDK hangs up as soon as it reads [DONE], while the gateway still waits for the vendor's end.
    list(gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    rows = wait_for_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage")
    assert rows == [("ok", 11, 2)], "everything was delivered: billed as a finished stream"


def test_openai_cached_and_reasoning_tokens_bill_at_their_prices(start_gateway, upstream):
    async def with_details(body: dict[str, Any], request: Request) -> Response:
        data = completion_body(body)
        data["usage"] = {"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
                         "prompt_tokens_details": {"cached_tokens": 1500}, "completion_tokens_details": {"reasoning_tokens": 200}}  # fmt: skip
        return JSONResponse(data)

    upstream.script("p1", with_details)
    config = CONFIG.replace("    gpt-4o: 1000,2000\n", "    gpt-4o: {token_price: '2,8', cache_read_price: 0.5, reasoning_price: 10}\n")
    gateway = start_gateway(config, upstream)
    raw = gateway.client(TOKEN_KEY).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=400)
    # 500 uncached x 2 + 1500 cached x 0.5 + 100 output x 8 + 200 reasoning x 10, per 1M tokens = 0.00455 USD
    assert raw.headers["x-tollgate-cost"] == "0.00455"
    states(gateway)  # flushes the ledger
    rows = ledger_rows(gateway, "SELECT prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost_nanos, unit_prices FROM usage")
    assert rows[0][:5] == (2000, 1500, 300, 200, 4_550_000)
    assert json.loads(rows[0][5]) == {"input": "2", "output": "8", "cache_read": "0.5", "reasoning": "10"}


def test_openai_stream_cut_midway_bills_what_was_streamed(start_gateway, upstream):
    from starlette.responses import StreamingResponse

    from test.servers import stream_chunks

    async def cut(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for chunk in stream_chunks(body, ["abcdefgh", "ijklmnop"])[:2]:
                yield chunk

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", cut)
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.APIError):
        list(gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    states(gateway)
    (row,) = ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens, cost_nanos FROM usage")
    assert row == ("error", 10, 4, (10 * 1000 + 4 * 2000) * 1000)  # 16 streamed bytes: 4 tokens, prompt estimated


def test_a_cut_stream_bills_the_reasoning_it_streamed(start_gateway, upstream):
    from starlette.responses import StreamingResponse

    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    thinking = [{**base, "choices": [{"index": 0, "delta": {"reasoning_content": "abcdefgh" * 50}}]} for _ in range(10)]  # DeepSeek's field
    events = [*thinking, {**base, "choices": [{"index": 0, "delta": {"content": "abcd"}}]}]  # then cut: no finish, no [DONE]

    async def cut(body: dict[str, Any], request: Request) -> Response:
        return StreamingResponse(iter([sse(e) for e in events]), media_type="text/event-stream")

    upstream.script("p1", cut)
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.APIError):
        list(gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    states(gateway)
    (row,) = ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage")
    assert row == ("error", 10, 1001)  # 4,000 bytes of reasoning + 4 of text: 1,001 tokens


QUALIFIED_CONFIG = f"""
providers:
  - provider: up
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {TOKEN_KEY}
    preferences: {{billing_mode: token, credits: 10}}
  - api: {COUNT_KEY}
    preferences: {{billing_mode: count, count_credits: 10}}
  - api: {HYBRID_KEY}
    preferences: {{billing_mode: hybrid, credits: 5, count_credits: 3}}
preferences:
  count_billing: {{enabled: true, default_count_price: 0.002}}
  model_price:
    gpt-4o: {{token_price: "5,20", count_price: 0.01}}
"""


@pytest.mark.parametrize("with_default", [False, True])
def test_provider_qualified_model_is_priced_as_the_public_model(start_gateway, upstream, with_default):
    """`up/gpt-4o` is gpt-4o served by `up`: its price, hybrid choice and ledger name are gpt-4o's."""
    config = QUALIFIED_CONFIG + ('    default: "100,100"\n' if with_default else "")
    gateway = start_gateway(config.replace("{fake:p1}", upstream.base_url("p1")))
    token = gateway.client(TOKEN_KEY).chat.completions.with_raw_response.create(model="up/gpt-4o", messages=MESSAGES)
    assert token.headers["x-tollgate-cost"] == "0.000195"  # 11 x 5 + 7 x 20 per 1M tokens
    count = gateway.client(COUNT_KEY).chat.completions.with_raw_response.create(model="up/gpt-4o", messages=MESSAGES)
    assert count.headers["x-tollgate-cost"] == "0.01"
    hybrid = gateway.client(HYBRID_KEY).chat.completions.with_raw_response.create(model="up/gpt-4o", messages=MESSAGES)
    assert hybrid.headers["x-tollgate-cost"] == "0.01" and hybrid.headers["x-tollgate-count-credits-remaining"] == "2"
    keys = states(gateway)
    assert keys[HYBRID_KEY]["remaining_count_credits"] == 2 and keys[HYBRID_KEY]["remaining_credits"] == 5
    rows = ledger_rows(gateway, "SELECT model, provider, cost_type, cost_nanos FROM usage ORDER BY id")
    assert rows == [("gpt-4o", "up", "token", 195_000), ("gpt-4o", "up", "count", 10_000_000), ("gpt-4o", "up", "count", 10_000_000)]
    report = {"api_key": TOKEN_KEY, "model": "up/gpt-4o", "prompt_tokens": 11, "completion_tokens": 7}
    assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report).json()["cost"] == 0.000195


def test_provider_qualified_model_reserves_at_the_public_models_price(start_gateway, upstream):
    config = QUALIFIED_CONFIG.replace("token, credits: 10", "token, credits: 0.001")
    gateway = start_gateway(config.replace("{fake:p1}", upstream.base_url("p1")))
    for model in ("gpt-4o", "up/gpt-4o"):  # 10 prompt + 1024 completion tokens at 5,20 USD per 1M: 0.02053
        with pytest.raises(openai.APIStatusError) as caught:
            gateway.client(TOKEN_KEY).chat.completions.create(model=model, messages=MESSAGES)
        assert caught.value.status_code == 402, model
    assert upstream.seen == []


def test_a_future_created_at_opens_the_key_at_that_time_and_a_restart_agrees(start_gateway, upstream):
    """Nothing before a key's billing window counts, so nothing is served or granted before it
    opens; from then on the balance in memory, in answers and after a restart is one figure."""
    import datetime

    now = [1_900_000_000.0]
    opens = now[0] + 3600
    created_at = datetime.datetime.fromtimestamp(opens, datetime.UTC).isoformat()
    config = CONFIG.replace("token, credits: 10}", f"token, credits: 10, created_at: '{created_at}'}}")
    gateway = start_gateway(config, upstream, clock=lambda: now[0])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.body["code"] == "billing_window_not_started" and created_at[:19] in caught.value.body["message"]
    top_up = gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "amount": "1.5"})
    assert top_up.status_code == 409 and top_up.json()["error"]["code"] == "billing_window_not_started"
    report = {"api_key": TOKEN_KEY, "model": "gpt-4o", "prompt_tokens": 11, "completion_tokens": 7}
    assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report).status_code == 409
    assert states(gateway)[TOKEN_KEY]["remaining_credits"] == 10 and upstream.seen == [] and ledger_rows(gateway) == []

    now[0] = opens
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    top_up = gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": TOKEN_KEY, "amount": "1.5"}).json()
    assert top_up["applied"] is True and top_up["api_key_state"]["remaining_credits"] == pytest.approx(11.475)
    before = states(gateway)[TOKEN_KEY]
    gateway.server.stop()
    after = states(start_gateway(gateway.config_path.read_text(), upstream, clock=lambda: now[0]))[TOKEN_KEY]
    assert after == before and after["remaining_credits"] == pytest.approx(11.475)


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "param"),
    [
        ("POST", "/v1/add_credits?amount=1", None, "missing_paid_key", "paid_key"),
        ("POST", "/v1/add_credits?paid_key=sk-nobody&amount=1", None, "key_not_found", "paid_key"),
        ("POST", f"/v1/add_credits?paid_key={TOKEN_KEY}&amount=-1", None, "invalid_amount", "amount"),
        ("POST", f"/v1/set_billing_mode?paid_key={TOKEN_KEY}&billing_mode=free", None, "invalid_billing_mode", "billing_mode"),
        ("GET", "/v1/token_usage?last_n_days=0", None, "invalid_last_n_days", "last_n_days"),
        ("GET", "/v1/token_usage?start_datetime=yesterday", None, "invalid_start_datetime", "start_datetime"),
        ("POST", "/v1/usage/report", {"api_key": TOKEN_KEY}, "missing_model", "model"),
        ("POST", "/v1/usage/report", {"api_key": TOKEN_KEY, "model": "gpt-4o", "prompt_tokens": -1}, "invalid_prompt_tokens", "prompt_tokens"),
        ("GET", "/v1/usage/models?period=weekly", None, "invalid_period", "period"),
        ("GET", "/v1/usage?paid_key=sk-nobody", None, "key_not_found", "paid_key"),
        ("GET", "/v1/token_usage?api_key_param=sk-nobody", None, "key_not_found", "api_key_param"),
        ("POST", "/v1/usage/report", {"api_key": "sk-nobody"}, "key_not_found", "api_key"),
        ("GET", "/v1/audit_log?limit=0", None, "invalid_limit", "limit"),
    ],
)
def test_admin_and_usage_parameter_errors_name_the_parameter(start_gateway, upstream, method, path, body, code, param):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http(method, path, key=ADMIN_KEY, json=body)
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param


# --- the output-token limit the reservation covers is the one the vendor gets --------------------

ECHO_CENT = (
    "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
    + f"api_keys:\n  - api: {TOKEN_KEY}\n    preferences: {{credits: 0.01}}\n"
    + "preferences:\n  model_price: {default: '1,1'}\n"
)
LIMIT_BODIES = {
    "messages": ("/v1/messages", {"messages": MESSAGES}),
    "completions": ("/v1/completions", {"prompt": "hello there"}),
    "chat": ("/v1/chat/completions", {"messages": MESSAGES}),
}


@pytest.mark.parametrize("path, body", LIMIT_BODIES.values(), ids=LIMIT_BODIES.keys())
def test_a_small_max_completion_tokens_does_not_shrink_the_reservation(start_gateway, path, body):
    # 100,000 output tokens at $1 per million is $0.10: more than the key's $0.01. Messages and
    # completions send max_tokens on and ignore max_completion_tokens; chat reserves the larger.
    # No cap (max_reserve_completion_tokens: 0), so the reservation is the limit itself.
    gateway = start_gateway(ECHO_CENT + "  max_reserve_completion_tokens: 0\n")
    request = {"model": "echo-1", "max_tokens": 100_000, **body}
    assert gateway.http("POST", path, key=TOKEN_KEY, json=request).status_code == 402
    response = gateway.http("POST", path, key=TOKEN_KEY, json={**request, "max_completion_tokens": 1})
    assert response.status_code == 402, response.text


def test_echo_cuts_a_chat_reply_to_the_larger_of_both_limits(start_gateway):
    gateway = start_gateway(ECHO_CENT)
    client = gateway.client(TOKEN_KEY)
    reply = client.chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=1, max_completion_tokens=50)
    assert reply.choices[0].message.content == "Echo: hello there"
    for smaller, larger in (("max_tokens", "max_completion_tokens"), ("max_completion_tokens", "max_tokens")):
        reply = client.chat.completions.create(model="echo-1", messages=MESSAGES, **{smaller: 1, larger: 2})
        assert reply.choices[0].message.content == "Echo: he", "cut at 2 tokens of 4 bytes, whichever field holds the larger"


# The media endpoints' units, reported from elsewhere and priced at their unit prices.
MEDIA_CONFIG = CONFIG.replace(
    "    claude-3-5-sonnet: 1000,2000\n",
    "    claude-3-5-sonnet: 1000,2000\n    dall-e-3: {image_price: 0.04}\n    whisper-1: {audio_minute_price: 0.006}\n    tts-1: {character_price: 15}\n",
)
MEDIA_REPORTS = [  # 3 images, 12.5 minutes of audio, 2,000 characters read aloud
    {"model": "dall-e-3", "images": 3},
    {"model": "whisper-1", "audio_ms": 750_000},
    {"model": "tts-1", "characters": 2000},
]


def report(gateway, key: str, **body: Any) -> Any:
    return gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json={"api_key": key, **body})


def test_usage_report_bills_media_units_at_their_unit_prices(start_gateway, upstream):
    gateway = start_gateway(MEDIA_CONFIG, upstream)
    costs = [report(gateway, TOKEN_KEY, **body).json()["cost"] for body in MEDIA_REPORTS]
    assert costs == [0.12, 0.075, 0.03]  # 3 x 0.04; 12.5 x 0.006; 2,000 / 1M x 15
    assert states(gateway)[TOKEN_KEY]["remaining_credits"] == 9.775
    rows = ledger_rows(gateway, "SELECT model, images, audio_ms, characters, unit_prices, cost_nanos FROM usage ORDER BY id")
    assert rows == [
        ("dall-e-3", 3, 0, 0, '{"image":"0.04"}', 120_000_000),
        ("whisper-1", 0, 750_000, 0, '{"audio_minute":"0.006"}', 75_000_000),
        ("tts-1", 0, 0, 2000, '{"character":"15"}', 30_000_000),
    ]
    mixed = report(gateway, TOKEN_KEY, model="dall-e-3", images=1, characters=5)
    assert mixed.status_code == 400 and mixed.json()["error"]["code"] == "mixed_units"
    negative = report(gateway, TOKEN_KEY, model="dall-e-3", images=-1)
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "images"
    assert len(ledger_rows(gateway)) == 3


def test_usage_apis_and_statements_show_media_units_exactly(start_gateway, upstream):
    gateway = start_gateway(MEDIA_CONFIG, upstream)
    gateway.client(TOKEN_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    for body in MEDIA_REPORTS:
        report(gateway, TOKEN_KEY, **body)
    report(gateway, HYBRID_KEY, model="whisper-1", audio_ms=1)  # 1/60,000 of a minute
    units = {"dall-e-3": {"images": 3}, "whisper-1": {"audio_minutes": 12.5}, "tts-1": {"characters": 2000}, "gpt-4o": {}}
    unit_names = ("images", "audio_minutes", "characters")

    def shown(row: dict[str, Any]) -> dict[str, Any]:
        return {name: row[name] for name in unit_names if name in row}

    details = states(gateway)[TOKEN_KEY]["cost_details"]["billing_details"]
    assert {row["model"]: shown(row) for row in details} == units
    token_usage = gateway.http("GET", "/v1/token_usage", key=ADMIN_KEY, params={"api_key_param": TOKEN_KEY, "last_n_days": 1}).json()
    assert {row["model"]: shown(row) for row in token_usage["stats"][0]["usage"]} == units
    all_units = {"images": 3, "audio_minutes": 12.5, "characters": 2000}
    assert shown(gateway.http("GET", "/v1/usage", key=TOKEN_KEY).json()["totals"]) == all_units
    by_model = gateway.http("GET", "/v1/usage/models", key=TOKEN_KEY).json()["data"]
    assert {row["model"]: shown(row) for row in by_model} == units
    year, month = time.gmtime()[:2]
    for path in (f"/v1/billing/usage/{year}/{month:02d}", f"/v1/billing/bill/{year}/{month:02d}"):
        statement = gateway.http("GET", path, key=TOKEN_KEY).json()
        assert {item["model"]: shown(item) for item in statement["line_items"]} == units
        assert shown(statement["totals"]) == all_units
    hybrid = gateway.http("GET", f"/v1/billing/bill/{year}/{month:02d}", key=HYBRID_KEY)
    assert '"audio_minutes":0.000017' in hybrid.text.replace(" ", "")  # exact, never 1.7e-05
