"""The accounts API: accounts made, changed and deleted through `/v1/accounts`, stored in the
ledger database over api.yaml's `accounts:` like the keys API's keys, and in force at once
for every key in them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from core.config import ledger_id
from core.keys.records import AccountRecord
from core.ledger.database import open_ledger, parse_database
from main import create_app
from test.conftest import ADMIN_KEY, RunningGateway
from test.postgres import PostgresServer
from test.servers import ServerThread

ONE, TWO = "sk-acme-one-0001", "sk-acme-two-0002"
MESSAGES = [{"role": "user", "content": "hi"}]

CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o]
preferences:
  model_price: {{default: "1,2"}}
accounts:
  - name: acme
    preferences: {{billing_mode: count, count_credits: 2}}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {ONE}
    name: acme-one
    account: acme
  - api: {TWO}
    name: acme-two
    account: acme
"""


def call(gateway: RunningGateway, method: str, path: str, body: Any = None) -> Any:
    answer = gateway.http(method, path, key=ADMIN_KEY, json=body)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def error(gateway: RunningGateway, method: str, path: str, body: Any = None, key: str = ADMIN_KEY) -> tuple[int, dict[str, Any]]:
    answer = gateway.http(method, path, key=key, json=body)
    return answer.status_code, answer.json()["error"]


def served(gateway: RunningGateway, secret: str, count: int) -> int:
    return gateway.fire(secret, count, model="gpt-4o", messages=MESSAGES).count(200)


def test_an_account_made_through_the_api_is_shared_by_the_keys_made_in_it(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    made = gateway.http("POST", "/v1/accounts", key=ADMIN_KEY, json={"name": "team", "preferences": {"billing_mode": "count", "count_credits": 3}})
    assert made.status_code == 201, made.text
    view = made.json()
    assert view["defined_in"] == "api" and view["status"] == "active" and view["state"]["remaining_count_credits"] == 3
    first = call(gateway, "POST", "/v1/api_keys", {"name": "team-a", "account": "team"})
    second = call(gateway, "POST", "/v1/api_keys", {"name": "team-b", "account": "team"})
    assert first["key"]["account"] == "team"

    assert served(gateway, first["api"], 2) == 2
    assert served(gateway, second["api"], 3) == 1  # the account's third and last count credit
    team = call(gateway, "GET", "/v1/accounts/team")
    assert team["state"]["remaining_count_credits"] == 0 and {key["name"] for key in team["keys"]} == {"team-a", "team-b"}


def test_an_accounts_new_credits_reach_every_key_in_it_at_once(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    assert served(gateway, ONE, 3) == 2
    patched = call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 5}})
    assert patched["defined_in"] == "api.yaml" and patched["api_changes"] == {"preferences": {"count_credits": 5}}
    assert patched["state"]["remaining_count_credits"] == 3
    states = call(gateway, "GET", "/v1/api_keys_states")["api_keys_states"]
    assert states[ONE]["remaining_count_credits"] == states[TWO]["remaining_count_credits"] == 3  # the same shape as before accounts
    assert served(gateway, TWO, 4) == 3  # no reload, no restart: the next request sees the new terms


def test_config_status_lists_the_accounts_made_and_changed_through_the_api(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    call(gateway, "POST", "/v1/accounts", {"name": "team", "preferences": {"credits": 1}})
    call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 5}})
    changes = gateway.status()["account_changes"]
    assert changes == [
        {"name": "acme", "defined_in": "api.yaml", "changes": {"preferences": {"count_credits": 5}}, "deleted": False, "problem": None},
        {"name": "team", "defined_in": "api", "changes": None, "deleted": False, "problem": None},
    ]


def test_an_accounts_limits_changed_through_the_api_apply_to_its_keys_together(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("count_credits: 2", "count_credits: 100"), upstream)
    call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"rate_limit": "2/min"}})
    assert served(gateway, ONE, 1) + served(gateway, TWO, 3) == 2


def test_accounts_made_and_changed_through_the_api_survive_a_restart(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    call(gateway, "POST", "/v1/accounts", {"name": "team", "preferences": {"credits": 1}})
    made = call(gateway, "POST", "/v1/api_keys", {"name": "team-a", "account": "team"})
    call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 4}})
    assert served(gateway, ONE, 1) == 1
    gateway.server.stop()

    again = start_gateway(gateway.config_path.read_text(), upstream)
    assert call(again, "GET", "/v1/accounts/team")["preferences"] == {"credits": 1}
    assert call(again, "GET", "/v1/accounts/acme")["state"]["remaining_count_credits"] == 3
    assert served(again, made["api"], 1) == 1 and served(again, TWO, 4) == 3


def test_an_api_change_of_an_api_yaml_account_stays_over_the_file_when_it_is_edited(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 4}})
    gateway.rewrite_config(gateway.config_path.read_text().replace("name: acme-two", "name: acme-renamed"))
    acme = call(gateway, "GET", "/v1/accounts/acme")
    assert acme["preferences"]["count_credits"] == 4 and {key["name"] for key in acme["keys"]} == {"acme-one", "acme-renamed"}
    assert served(gateway, TWO, 5) == 4


@pytest.mark.parametrize(
    ("body", "param", "reason"),
    [
        ({"name": "x", "preferences": {"credit": 5}}, "preferences.credit", "did you mean 'credits'?"),
        ({"name": "x", "preferences": {"credits": -5}}, "preferences.credits", "-5"),
        ({"name": "x", "preferences": {"self_service_keys": "maybe"}}, "preferences.self_service_keys", "true or false"),
        ({"name": "no spaces"}, "name", "letters, digits"),
        ({"preferences": {}}, "name", "required"),
        ({"name": "x", "keys": []}, "keys", "unknown key"),
    ],
)
def test_a_wrong_account_entry_is_refused_naming_the_field_and_nothing_is_stored(start_gateway, upstream, body, param, reason):
    gateway = start_gateway(CONFIG, upstream)
    status, refused = error(gateway, "POST", "/v1/accounts", body)
    assert status == 400 and refused["code"] == "invalid_account_entry" and refused["param"] == param
    assert reason in refused["message"]
    assert [account["name"] for account in call(gateway, "GET", "/v1/accounts")["data"]] == ["acme"]


def test_an_account_name_is_taken_once_and_never_changes(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    status, refused = error(gateway, "POST", "/v1/accounts", {"name": "acme"})
    assert status == 409 and refused["code"] == "duplicate_account"
    status, refused = error(gateway, "PATCH", "/v1/accounts/acme", {"name": "other"})
    assert status == 400 and refused["code"] == "immutable_field" and refused["param"] == "name"
    assert error(gateway, "PATCH", "/v1/accounts/nope", {"preferences": {}})[1]["code"] == "account_not_found"
    status, refused = error(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": -3}})
    assert status == 400 and refused["param"] == "preferences.count_credits"
    assert call(gateway, "GET", "/v1/accounts/acme")["api_changes"] is None  # a refused change stores nothing


def test_an_account_with_live_keys_cannot_be_deleted_and_a_deleted_one_keeps_its_history(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    status, refused = error(gateway, "DELETE", "/v1/accounts/acme")
    assert status == 409 and refused["code"] == "account_in_use" and "acme-one" in refused["message"]

    call(gateway, "POST", "/v1/accounts", {"name": "team", "preferences": {"billing_mode": "count", "count_credits": 3}})
    made = call(gateway, "POST", "/v1/api_keys", {"name": "team-a", "account": "team"})
    assert served(gateway, made["api"], 1) == 1
    assert error(gateway, "DELETE", "/v1/accounts/team")[1]["code"] == "account_in_use"
    call(gateway, "DELETE", f"/v1/api_keys/{made['id']}")
    deleted = call(gateway, "DELETE", "/v1/accounts/team")
    assert deleted["deleted"] is True and deleted["account"]["status"] == "deleted"

    listed = {account["name"]: account for account in call(gateway, "GET", "/v1/accounts")["data"]}
    assert listed["team"]["status"] == "deleted" and listed["team"]["state"]["request_count"] == 1
    assert call(gateway, "GET", f"/v1/api_keys/{made['id']}")["status"] == "deleted"  # the key's history stays readable
    assert error(gateway, "POST", "/v1/accounts/team/credits", {"amount": 1})[1]["code"] == "account_deleted"
    assert error(gateway, "PATCH", "/v1/accounts/team", {"preferences": {}})[1]["code"] == "account_deleted"
    assert error(gateway, "POST", "/v1/accounts", {"name": "team"})[1]["code"] == "duplicate_account"
    assert error(gateway, "POST", "/v1/api_keys", {"name": "late", "account": "team"})[1]["param"] == "account"


def test_every_account_action_is_audited_with_its_admin(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    call(gateway, "POST", "/v1/accounts", {"name": "team", "preferences": {"credits": 1}})
    call(gateway, "PATCH", "/v1/accounts/team", {"preferences": {"credits": 2}})
    call(gateway, "DELETE", "/v1/accounts/team")
    entries = [e for e in call(gateway, "GET", "/v1/audit_log?key=account:team")["entries"]]
    assert [e["action"] for e in reversed(entries)] == ["create_account", "update_account", "delete_account"]
    assert {e["actor_key_id"] for e in entries} == {ledger_id(ADMIN_KEY)}
    update = entries[1]
    assert json.loads(update["before"])["entry"]["preferences"] == {"credits": 1}
    assert json.loads(update["after"])["entry"]["preferences"] == {"credits": 2}


def test_only_admins_make_change_or_delete_accounts(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    for method, path, body in (
        ("POST", "/v1/accounts", {"name": "mine"}),
        ("PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 1000}}),  # a holder never raises their own balance
        ("DELETE", "/v1/accounts/acme", None),
        ("POST", "/v1/accounts/acme/credits", {"amount": 5, "kind": "count_credits"}),
    ):
        status, refused = error(gateway, method, path, body, key=ONE)
        assert (status, refused["code"]) == (403, "admin_required"), (method, path)
    assert call(gateway, "GET", "/v1/accounts/acme")["state"]["count_credits"] == 2


def test_accounts_are_stored_and_shared_in_postgresql(tmp_path, upstream):
    """Fleet mode: account records live in PostgreSQL, and the poll that applies the keys API's
    records applies them too (one version for both). An account's own limits are refused there,
    as in api.yaml."""
    postgres = PostgresServer().init().start()
    try:
        url = postgres.new_database()

        async def store_and_watch() -> list[Any]:
            writer, watcher = await open_ledger(parse_database(url)), await open_ledger(parse_database(url))
            seen: list[Any] = []
            watcher.watch_key_records(lambda keys, accounts: seen.append(accounts))
            await writer.change_account_record("team", lambda stored: AccountRecord("team", "api", {"name": "team"}, created_at=1.0, updated_at=1.0))
            for _ in range(100):
                if seen and "team" in seen[-1]:
                    break
                await asyncio.sleep(0.05)
            stored = await writer.account_records()
            await writer.close()
            await watcher.close()
            return [stored, seen[-1]]

        stored, polled = asyncio.run(store_and_watch())
        assert stored["team"].entry == {"name": "team"} and polled["team"] == stored["team"]

        config = tmp_path / "api.yaml"
        config.write_text(CONFIG.replace("{fake:p1}", upstream.base_url("p1")))
        server = ServerThread(create_app(config, url)).start()
        try:
            gateway = RunningGateway(server, config)
            assert served(gateway, ONE, 3) == 2
            call(gateway, "PATCH", "/v1/accounts/acme", {"preferences": {"count_credits": 3}})
            assert served(gateway, TWO, 2) == 1  # the new terms, on PostgreSQL's balance
            assert call(gateway, "GET", "/v1/accounts/team")["defined_in"] == "api"
        finally:
            server.stop()
    finally:
        postgres.destroy()
