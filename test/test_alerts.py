"""Threshold alerts: fired once per crossing, delivered with retries, re-armed by top-ups."""

from __future__ import annotations

import logging
import re
import sqlite3
import time

from test.conftest import ADMIN_KEY
from test.test_limits import T0, FakeClock

KEY = "sk-alerted-0001"
MESSAGES = [{"role": "user", "content": "hello there"}]  # 0.02 USD per request at these prices


def config(hook_url: str, prefs: str = "credits: 0.1") -> str:
    return (
        "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
        f"api_keys:\n  - api: {ADMIN_KEY}\n    role: admin\n  - api: {KEY}\n    name: watched\n    preferences: {{{prefs}}}\n"
        f"preferences:\n  model_price: {{default: '1000,2000'}}\n  alerts: {{thresholds: [0.5, 1.0], webhook_url: '{hook_url}'}}\n"
    )


def chat(gateway, n: int) -> None:
    for _ in range(n):
        try:
            gateway.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=5)
        except Exception:
            pass


def events(gateway) -> list[tuple]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # flushes the ledger queue
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT metric, threshold, used, limit_value, status, attempts FROM alert_events ORDER BY id").fetchall()


def test_each_crossing_fires_once(start_gateway, receiver):
    gateway = start_gateway(config(receiver.url), clock=FakeClock(T0))
    chat(gateway, 2)
    assert receiver.received == []
    chat(gateway, 2)  # 0.08 of 0.1: past 50%
    (first,) = receiver.wait_for(1)
    assert first["metric"] == "credits" and first["threshold"] == 0.5 and first["key_name"] == "watched"
    assert (first["used"], first["limit"]) == ("0.06", "0.1")
    assert KEY not in str(first)
    chat(gateway, 3)  # reaches 100%, then the key is refused
    receiver.wait_for(2)
    time.sleep(0.3)
    assert [(e["metric"], e["threshold"]) for e in receiver.received] == [("credits", 0.5), ("credits", 1.0)]
    assert [row[:2] + row[4:] for row in events(gateway)] == [("credits", 0.5, "sent", 1), ("credits", 1.0, "sent", 1)]


def test_a_top_up_rearms_the_alert(start_gateway, receiver):
    gateway = start_gateway(config(receiver.url), clock=FakeClock(T0))
    chat(gateway, 3)
    receiver.wait_for(1)
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": KEY, "amount": "0.1"})  # 0.06 of 0.2: under 50%
    chat(gateway, 1)
    time.sleep(0.2)
    assert len(receiver.received) == 1
    chat(gateway, 1)  # 0.1 of 0.2: at 50% again
    second = receiver.wait_for(2)[1]
    assert (second["metric"], second["threshold"], second["used"], second["limit"]) == ("credits", 0.5, "0.1", "0.2")


def test_delivery_is_retried_with_backoff(start_gateway, receiver):
    receiver.fail_first = 2
    gateway = start_gateway(config(receiver.url), clock=FakeClock(T0))
    gateway.server.app.state.alerts.retry_seconds = 0.05
    chat(gateway, 3)
    receiver.wait_for(1)
    assert receiver.attempts == 3
    deadline = time.monotonic() + 5
    while events(gateway)[0][4:] != ("sent", 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events(gateway)[0][4:] == ("sent", 3)


def test_fired_alerts_survive_a_restart(start_gateway, receiver):
    clock = FakeClock(T0)
    gateway = start_gateway(config(receiver.url), clock=clock)
    chat(gateway, 3)
    receiver.wait_for(1)
    gateway.server.stop()
    again = start_gateway(gateway.config_path.read_text(), clock=clock)
    chat(again, 1)
    time.sleep(0.3)
    assert len(receiver.received) == 1, "the 50% crossing was already reported before the restart"


def test_quota_count_credits_and_budget_thresholds(start_gateway, receiver):
    prefs = "billing_mode: count, count_credits: 4, quota: 40, daily_cost_limit: 0.004"
    gateway = start_gateway(
        config(receiver.url, prefs).replace(
            "model_price: {default: '1000,2000'}", "model_price: {echo-1: {token_price: '0,0'}}\n  count_billing: {default_count_price: 0.001}"
        ),
        clock=FakeClock(T0),
    )
    chat(gateway, 2)  # 2 of 4 count credits, 30 of 40 tokens, 0.002 of 0.004 USD today
    received = receiver.wait_for(3)
    metrics = sorted(e["metric"] for e in received)
    assert metrics == ["count_credits", "daily_cost_limit:2026-03-04", "quota"]


def test_alerts_show_on_the_key_page(start_gateway, receiver, caplog):
    from test.test_web import Browser, key_id

    caplog.set_level(logging.INFO, logger="tollgate.alerts")
    gateway = start_gateway(config(receiver.url), clock=FakeClock(T0))
    chat(gateway, 3)
    receiver.wait_for(1)
    assert any(r.getMessage().endswith("credits crossed 50% ($0.06 of $0.10)") for r in caplog.records if r.name == "tollgate.alerts"), caplog.text
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get(f"/admin/keys/{key_id(KEY)}").text
    assert "Alerts" in page and "credits crossed 50%" in page
    assert "($0.06 of $0.10)" in page  # the page's money format, not the ledger's "0.06 of 0.1"


def test_an_alert_without_webhook_reads_as_recorded(start_gateway):
    from test.test_web import Browser

    gateway = start_gateway(config("").replace(", webhook_url: ''", ""), clock=FakeClock(T0))
    chat(gateway, 3)
    assert events(gateway)[0][4] == "recorded"
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    alerts = browser.get("/admin").text.split("<h2>Alerts</h2>")[1].split("</table>")[0]
    alerts = " ".join(re.sub(r"<[^>]+>", " ", alerts).split())  # the text a reader sees
    assert "recorded (no webhook configured)" in alerts and "attempt" not in alerts


def test_a_failed_delivery_is_logged_without_the_webhooks_secret_path(start_gateway, receiver, caplog):
    receiver.fail_first = 100  # never accepts
    secret_url = f"{receiver.url}/hooks/T0000/B0000/s3cr3t-token"
    gateway = start_gateway(config(secret_url), clock=FakeClock(T0))
    gateway.server.app.state.alerts.retry_seconds = 0.01
    chat(gateway, 3)
    deadline = time.monotonic() + 10
    while not any("failed after" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    failure = next(r.getMessage() for r in caplog.records if "failed after" in r.getMessage())
    assert "127.0.0.1" in failure and "s3cr3t-token" not in failure


def test_an_accounts_balance_alerts_once_as_the_account_not_once_per_key(start_gateway, receiver):
    second = "sk-alerted-0002"
    text = (
        config(receiver.url)
        .replace(
            f"  - api: {KEY}\n    name: watched\n    preferences: {{credits: 0.1}}\n",
            f"  - api: {KEY}\n    name: watched\n    account: team\n  - api: {second}\n    name: other\n    account: team\n",
        )
        .replace("api_keys:\n", "accounts:\n  - name: team\n    preferences: {credits: 0.1}\napi_keys:\n")
    )
    gateway = start_gateway(text, clock=FakeClock(T0))
    for secret in (KEY, second):  # 0.02 each, two keys: 0.04 of the account's 0.1
        gateway.client(secret).chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=5)
    assert receiver.received == []
    gateway.client(second).chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=5)  # 0.06 of 0.1: past 50%
    (first,) = receiver.wait_for(1)
    assert first["metric"] == "credits" and first["threshold"] == 0.5 and first["key_name"] == "team"
    time.sleep(0.3)
    assert len(receiver.received) == 1  # once, as the account: not once per key of it
    refill = gateway.http("POST", "/v1/accounts/team/credits", key=ADMIN_KEY, json={"amount": "1"})
    assert refill.status_code == 200, refill.text
    assert [row[:2] for row in events(gateway)] == [("credits", 0.5)]
