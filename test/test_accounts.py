"""Accounts: one balance shared by several keys, each key still under its own quota, and the
account's limits over all its keys together (fleet mode: test/test_fleet.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from core.config import build_config
from core.config.yamlsource import ConfigError
from test.conftest import ADMIN_KEY, RunningGateway

ONE, TWO, SOLO = "sk-acme-one-0001", "sk-acme-two-0002", "sk-solo-key-0003"
LAB_ONE, LAB_TWO = "sk-lab-one-00004", "sk-lab-two-00005"
MESSAGES = [{"role": "user", "content": "hi"}]

CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o]
preferences:
  model_price: {{gpt-4o: "1,2"}}  # the catalog prices gpt-4o higher; these tests count on $1/$2 per million
accounts:
  - name: acme
    preferences: {{billing_mode: count, count_credits: 5}}
  - name: lab
    preferences: {{credits: 1, monthly_cost_limit: 0.00003}}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {ONE}
    name: acme-one
    account: acme
  - api: {TWO}
    name: acme-two
    account: acme
    preferences: {{billing_mode: token, quota: 30, quota_type: tokens}}
  - api: {SOLO}
    name: solo
    preferences: {{billing_mode: count, count_credits: 2}}
  - api: {LAB_ONE}
    name: lab-one
    account: lab
  - api: {LAB_TWO}
    name: lab-two
    account: lab
"""


def account(gateway: RunningGateway, name: str) -> dict[str, Any]:
    answer = gateway.http("GET", f"/v1/accounts/{name}", key=ADMIN_KEY)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def key_state(gateway: RunningGateway, secret: str) -> dict[str, Any]:
    return gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][secret]  # type: ignore[no-any-return]


def fire_from(gateway: RunningGateway, per_key: dict[str, int]) -> dict[str, list[int]]:
    """Send every key's requests at once (all keys together); each key's HTTP statuses."""

    async def all_at_once() -> dict[str, list[int]]:
        async def one(client: openai.AsyncOpenAI) -> int:
            try:
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        clients = {secret: gateway.async_client(secret) for secret in per_key}
        tasks = {secret: [one(clients[secret]) for _ in range(count)] for secret, count in per_key.items()}
        results = await asyncio.gather(*(asyncio.gather(*calls) for calls in tasks.values()))
        return dict(zip(tasks, (list(r) for r in results), strict=True))

    return asyncio.run(all_at_once())


def test_an_accounts_count_credits_stop_its_keys_while_a_key_of_its_own_keeps_its_balance(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    statuses = fire_from(gateway, {ONE: 30, SOLO: 5})
    served = statuses[ONE].count(200)
    assert served == 5 and statuses[SOLO].count(200) == 2  # the account's 5, the solo key's own 2
    assert set(statuses[ONE]) == {200, 402}

    state = account(gateway, "acme")["state"]
    assert state["remaining_count_credits"] == 0 and state["request_count"] == 5


def test_fifty_concurrent_requests_over_two_keys_serve_exactly_the_accounts_count_credits(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("billing_mode: token, quota: 30", "billing_mode: count, quota: 0"), upstream)
    statuses = fire_from(gateway, {ONE: 25, TWO: 25})
    assert statuses[ONE].count(200) + statuses[TWO].count(200) == 5
    ones, twos = key_state(gateway, ONE), key_state(gateway, TWO)
    assert ones["remaining_count_credits"] == twos["remaining_count_credits"] == 0  # one balance, seen from either key
    acme = account(gateway, "acme")
    assert acme["state"]["remaining_count_credits"] == 0
    assert {key["name"] for key in acme["keys"]} == {"acme-one", "acme-two"}


def test_a_top_up_goes_to_the_account_and_every_key_of_it_can_spend_it(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    assert fire_from(gateway, {ONE: 6})[ONE].count(200) == 5
    top_up = gateway.http("POST", "/v1/accounts/acme/credits", key=ADMIN_KEY, json={"amount": 3, "kind": "count_credits"}, headers={"Idempotency-Key": "t1"})
    assert top_up.status_code == 200, top_up.text
    assert top_up.json()["applied"] is True and top_up.json()["account"]["state"]["remaining_count_credits"] == 3
    again = gateway.http("POST", "/v1/accounts/acme/credits", key=ADMIN_KEY, json={"amount": 3, "kind": "count_credits"}, headers={"Idempotency-Key": "t1"})
    assert again.json()["applied"] is False  # a retry adds nothing
    assert fire_from(gateway, {ONE: 4})[ONE].count(200) == 3

    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert any(e["action"] == "add_count_credits" and e["target_key_id"] == "account:acme" for e in audit)
    refused = gateway.http("POST", "/v1/accounts/acme/credits", key=ONE, json={"amount": 3})
    assert refused.status_code == 403  # a key holder never raises their own balance
    assert gateway.http("POST", "/v1/accounts/nope/credits", key=ADMIN_KEY, json={"amount": 3}).json()["error"]["code"] == "account_not_found"


def test_a_top_up_of_a_key_in_an_account_is_refused_and_names_the_account(start_gateway, upstream):
    """The key spends the account's balance: a grant to the key itself would never count."""
    gateway = start_gateway(CONFIG, upstream)
    refused = gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params={"paid_key": ONE, "amount": "7"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "key_in_account" and "account 'acme'" in error["message"] and "/v1/accounts/acme/credits" in error["message"]
    assert key_state(gateway, ONE)["count_credits"] == 5 and account(gateway, "acme")["state"]["remaining_count_credits"] == 5
    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert not any(e["action"] == "add_count_credits" for e in audit)


def test_a_key_in_an_account_shows_the_accounts_credits_with_its_top_ups(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.http("POST", "/v1/accounts/acme/credits", key=ADMIN_KEY, json={"amount": 3, "kind": "count_credits"})
    gateway.http("POST", "/v1/accounts/lab/credits", key=ADMIN_KEY, json={"amount": "2.5"})
    for secret, name in ((ONE, "acme"), (LAB_ONE, "lab")):
        shown, held = key_state(gateway, secret), account(gateway, name)["state"]
        for figure in ("credits", "count_credits", "remaining_credits", "remaining_count_credits"):
            assert shown[figure] == held[figure], (secret, figure)
    assert key_state(gateway, ONE)["count_credits"] == 8 and key_state(gateway, LAB_ONE)["credits"] == 3.5
    assert gateway.http("GET", "/v1/usage", key=ONE).json()["balance"]["count_credits"] == 8  # what the key holder reads
    assert gateway.http("GET", "/v1/usage", key=LAB_ONE).json()["balance"]["credits"] == 3.5
    assert gateway.http("GET", "/v1/dashboard/billing/subscription", key=LAB_ONE).json()["hard_limit_usd"] == 3.5


def test_a_keys_own_quota_stops_it_alone_while_its_account_still_serves_the_others(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("billing_mode: count, count_credits: 5", "billing_mode: count, count_credits: 50"), upstream)
    two = gateway.client(TWO)
    for _ in range(2):  # 18 tokens each (the fake's usage): 0 → 18 → 36, over the quota of 30
        two.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as refused:
        two.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.status_code == 402 and refused.value.code == "API_KEY_QUOTA_EXHAUSTED"
    gateway.client(ONE).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


def test_an_accounts_monthly_limit_applies_to_its_keys_together(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(LAB_ONE).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]  # $0.000025
    gateway.client(LAB_TWO).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]  # under $0.00003 before it
    for secret in (LAB_ONE, LAB_TWO):
        with pytest.raises(openai.APIStatusError) as refused:
            gateway.client(secret).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert refused.value.status_code == 402 and refused.value.code == "monthly_cost_limit_exceeded"
        assert "account 'lab'" in refused.value.message
    lab = account(gateway, "lab")["state"]
    assert lab["total_cost"] == pytest.approx(0.00005) and lab["remaining_credits"] == pytest.approx(1 - 0.00005)


def test_an_accounts_balance_survives_a_restart(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    assert fire_from(gateway, {ONE: 3})[ONE].count(200) == 3
    gateway.client(LAB_ONE).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    before = {name: account(gateway, name)["state"] for name in ("acme", "lab")}
    gateway.server.stop()
    again = start_gateway(gateway.config_path.read_text(), upstream)
    after = {name: account(again, name)["state"] for name in ("acme", "lab")}
    assert after == before and after["acme"]["remaining_count_credits"] == 2
    assert fire_from(again, {ONE: 3})[ONE].count(200) == 2  # what was left before the restart, no more


@pytest.mark.parametrize(
    ("key_entry", "reason"),
    [
        ("account: nope", "names account 'nope', which is not defined"),
        ("account: acme\n    preferences: {credits: 5}", "a key in an account draws on the account's balance; set credits on account 'acme'"),
    ],
)
def test_a_key_naming_a_missing_account_or_its_own_balance_is_a_config_error(key_entry, reason):
    text = f"""
providers: [{{provider: e, engine: echo, model: [m]}}]
accounts: [{{name: acme, preferences: {{credits: 1}}}}]
api_keys:
  - api: sk-some-key-0001
    {key_entry}
"""
    with pytest.raises(ConfigError) as error:
        build_config(text, "api.yaml")
    assert reason in error.value.reason and error.value.line is not None
