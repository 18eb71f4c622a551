"""Self-service keys: the keys of an account with `self_service_keys: true` make, list and
revoke keys in their own account (through `/v1/api_keys` and the usage page), never more than
an admin gave them."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from core.config import ledger_id
from test.conftest import ADMIN_KEY, RunningGateway
from test.test_web import Browser

ONE, TWO, LAB, SOLO = "sk-acme-one-0001", "sk-acme-two-0002", "sk-lab-key-00003", "sk-solo-key-0004"
MESSAGES = [{"role": "user", "content": "hi"}]

CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o, gpt-4o-mini]
preferences:
  model_price: {{default: "1,2"}}
accounts:
  - name: acme
    preferences: {{credits: 1, self_service_keys: true}}
  - name: lab
    preferences: {{credits: 1}}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {ONE}
    name: acme-one
    account: acme
    model: [gpt-4o]
  - api: {TWO}
    name: acme-two
    account: acme
  - api: {LAB}
    name: lab-one
    account: lab
  - api: {SOLO}
    name: solo
"""


def ok(gateway: RunningGateway, method: str, path: str, key: str, body: Any = None) -> Any:
    answer = gateway.http(method, path, key=key, json=body)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def refused(gateway: RunningGateway, method: str, path: str, key: str, body: Any = None) -> tuple[int, str]:
    answer = gateway.http(method, path, key=key, json=body)
    return answer.status_code, answer.json()["error"]["code"]


def chat(gateway: RunningGateway, secret: str) -> None:
    gateway.client(secret).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


@pytest.fixture
def gateway(start_gateway, upstream) -> RunningGateway:
    return start_gateway(CONFIG, upstream)  # type: ignore[no-any-return]


def test_a_holders_new_key_works_until_its_own_quota_while_drawing_on_the_accounts_balance(gateway):
    made = gateway.http("POST", "/v1/api_keys", key=ONE, json={"name": "ci", "preferences": {"quota": 30, "quota_type": "tokens"}})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert key["account"] == "acme" and key["role"] == "user" and key["model"] == ["gpt-4o"]  # the maker's models by default
    secret = made.json()["api"]

    for _ in range(2):  # 18 tokens each (the fake's usage): 0 → 18 → 36, over the quota of 30
        chat(gateway, secret)
    with pytest.raises(openai.APIStatusError) as stopped:
        chat(gateway, secret)
    assert stopped.value.status_code == 402 and stopped.value.code == "API_KEY_QUOTA_EXHAUSTED"
    chat(gateway, ONE)  # the account still serves its other keys

    acme = ok(gateway, "GET", "/v1/accounts/acme", ADMIN_KEY)["state"]
    states = ok(gateway, "GET", "/v1/api_keys_states", ADMIN_KEY)["api_keys_states"]
    assert acme["request_count"] == 3 and states[ONE]["remaining_credits"] == acme["remaining_credits"] < 1  # one balance


def test_a_holder_sees_and_revokes_only_the_keys_of_their_own_account(gateway):
    lab_key = ok(gateway, "POST", "/v1/api_keys", ADMIN_KEY, {"name": "lab-two", "account": "lab"})
    mine = ok(gateway, "POST", "/v1/api_keys", ONE, {"name": "mine"})

    listed = ok(gateway, "GET", "/v1/api_keys", ONE)
    assert {key["name"] for key in listed["data"]} == {"acme-one", "acme-two", "mine"} and listed["total"] == 3
    for method in ("GET", "DELETE"):  # another account's key: as if no key had that id
        assert refused(gateway, method, f"/v1/api_keys/{lab_key['id']}", ONE) == (404, "key_not_found")
    chat(gateway, lab_key["api"])  # still works

    assert ok(gateway, "GET", f"/v1/api_keys/{mine['id']}", ONE)["name"] == "mine"
    assert ok(gateway, "DELETE", f"/v1/api_keys/{mine['id']}", ONE)["deleted"] is True
    with pytest.raises(openai.AuthenticationError):
        chat(gateway, mine["api"])
    assert {key["name"]: key["status"] for key in ok(gateway, "GET", "/v1/api_keys", TWO)["data"]}["mine"] == "deleted"


def test_keys_of_an_account_without_self_service_and_keys_without_an_account_may_not(gateway):
    for method, path in (
        ("POST", "/v1/api_keys"),
        ("GET", "/v1/api_keys"),
        ("GET", f"/v1/api_keys/{ledger_id(LAB)}"),
        ("DELETE", f"/v1/api_keys/{ledger_id(LAB)}"),
    ):
        assert refused(gateway, method, path, LAB, {"name": "x"} if method == "POST" else None) == (403, "self_service_disabled")
        assert refused(gateway, method, path, SOLO, {"name": "x"} if method == "POST" else None) == (403, "admin_required")
    chat(gateway, LAB)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"name": "x", "role": "admin"}, "admin_required", "role"),
        ({"name": "x", "account": "lab"}, "not_your_account", "account"),
        ({"name": "x", "model": ["gpt-4o-mini"]}, "model_not_allowed", "model"),
        ({"name": "x", "model": ["*"]}, "model_not_allowed", "model"),
        ({"name": "x", "api": "sk-guessable-0001"}, "admin_required", "api"),
        ({"name": "x", "id": "pinned"}, "admin_required", "id"),
        ({"name": "x", "preferences": {"credits": 100}}, "admin_required", "preferences.credits"),
        ({"name": "x", "preferences": {"billing_mode": "count"}}, "admin_required", "preferences.billing_mode"),
    ],
)
def test_a_holder_cannot_make_a_key_with_more_than_their_own(gateway, body, code, param):
    answer = gateway.http("POST", "/v1/api_keys", key=ONE, json=body)
    assert answer.status_code == 403, answer.text
    assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == (code, param)
    assert ok(gateway, "GET", "/v1/api_keys", ONE)["total"] == 2  # nothing was made


def test_a_holders_wrong_value_is_a_400_naming_the_field(gateway):
    answer = gateway.http("POST", "/v1/api_keys", key=ONE, json={"name": "x", "preferences": {"quota": -5}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "preferences.quota"


def test_a_holder_never_raises_their_own_balance_nor_changes_or_rotates_keys(gateway):
    mine = ok(gateway, "POST", "/v1/api_keys", ONE, {"name": "mine", "preferences": {"quota": 10}})
    for method, path, body in (
        ("POST", "/v1/accounts/acme/credits", {"amount": 100}),
        ("PATCH", "/v1/accounts/acme", {"preferences": {"credits": 1000}}),
        ("PATCH", f"/v1/api_keys/{mine['id']}", {"preferences": {"quota": 1000}}),
        ("POST", f"/v1/api_keys/{mine['id']}/rotate", None),
        ("POST", "/v1/accounts", {"name": "mine"}),
    ):
        assert refused(gateway, method, path, ONE, body) == (403, "admin_required"), path
    assert ok(gateway, "GET", "/v1/accounts/acme", ADMIN_KEY)["state"]["credits"] == 1


def test_a_holders_actions_are_audited_with_the_holder_as_the_actor(gateway):
    mine = ok(gateway, "POST", "/v1/api_keys", ONE, {"name": "mine"})
    ok(gateway, "DELETE", f"/v1/api_keys/{mine['id']}", TWO)
    entries = ok(gateway, "GET", f"/v1/audit_log?key={mine['id']}", ADMIN_KEY)["entries"]
    assert [(e["action"], e["actor_key_id"], e["actor"]) for e in reversed(entries)] == [
        ("create_key", ledger_id(ONE), "acme-one"),
        ("delete_key", ledger_id(TWO), "acme-two"),
    ]
    assert mine["api"] not in json.dumps(entries)  # never the secret


def test_turning_self_service_off_stops_the_accounts_keys_at_once(gateway):
    ok(gateway, "POST", "/v1/api_keys", ONE, {"name": "before"})
    ok(gateway, "PATCH", "/v1/accounts/acme", ADMIN_KEY, {"preferences": {"self_service_keys": False}})
    assert refused(gateway, "POST", "/v1/api_keys", ONE, {"name": "after"}) == (403, "self_service_disabled")
    ok(gateway, "PATCH", "/v1/accounts/lab", ADMIN_KEY, {"preferences": {"self_service_keys": True}})
    assert ok(gateway, "POST", "/v1/api_keys", LAB, {"name": "lab-made"})["key"]["account"] == "lab"


# --- the usage page ---------------------------------------------------------------------------


def test_the_usage_page_lists_the_accounts_keys_and_makes_one_showing_its_secret_once(gateway):
    browser = Browser(gateway.url)
    browser.login(ONE)
    page = browser.get("/usage").text
    assert "Keys of account acme" in page and "acme-two" in page and "(this key)" in page

    made = browser.submit("/usage", "/usage/keys", name="from-the-page", quota="1000", quota_type="tokens")
    assert made.status_code == 200, made.text
    secret = re.search(r'<code id="secret">(sk-[^<]+)</code>', made.text).group(1)  # type: ignore[union-attr]
    assert "script-src 'self'" in made.headers["content-security-policy"] and "/static/copy.js" in made.text  # its Copy button
    chat(gateway, secret)
    again = browser.get("/usage").text
    assert "from-the-page" in again and secret not in again  # shown once
    assert "18 of 1,000" in again  # its quota's use
    key = next(key for key in ok(gateway, "GET", "/v1/api_keys", ONE)["data"] if key["name"] == "from-the-page")
    assert key["quota"] == {"type": "tokens", "limit": 1000, "used": 18, "remaining": 982}


def test_the_usage_pages_new_key_form_sent_twice_makes_one_key(gateway):
    browser = Browser(gateway.url)
    browser.login(ONE)
    page = browser.get("/usage").text
    form = {"csrf_token": browser.csrf_from(page), "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1), "name": "once"}  # type: ignore[union-attr]
    assert browser.http.post("/usage/keys", data=form).status_code == 200
    again = browser.http.post("/usage/keys", data=form)  # the page that showed the secret, reloaded
    assert again.status_code == 303 and "made=" in again.headers["location"]
    assert "was already made by this form" in browser.get(again.headers["location"]).text
    assert [key["name"] for key in ok(gateway, "GET", "/v1/api_keys", ONE)["data"]].count("once") == 1


def test_the_usage_page_refuses_a_key_it_may_not_make_with_the_reason(gateway):
    browser = Browser(gateway.url)
    browser.login(ONE)
    answer = browser.submit("/usage", "/usage/keys", name="x", quota="-3", quota_type="tokens")
    assert answer.status_code == 400 and "preferences.quota" in answer.text
    assert ok(gateway, "GET", "/v1/api_keys", ONE)["total"] == 2


def test_the_usage_page_revokes_a_key_only_with_its_csrf_token(gateway):
    mine = ok(gateway, "POST", "/v1/api_keys", ONE, {"name": "to-revoke"})
    browser = Browser(gateway.url)
    browser.login(ONE)
    page = browser.get("/usage").text
    assert f'action="/usage/keys/{mine["id"]}/revoke"' in page and "Yes, revoke to-revoke" in page
    assert f'action="/usage/keys/{ledger_id(ONE)}/revoke"' not in page  # not the key you are logged in with

    forged = browser.http.post(f"/usage/keys/{mine['id']}/revoke", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    chat(gateway, mine["api"])

    revoked = browser.submit("/usage", f"/usage/keys/{mine['id']}/revoke")
    assert revoked.status_code == 303 and revoked.headers["location"].startswith(f"/usage?revoked={mine['id']}")
    assert "Key &#39;to-revoke&#39; revoked" in browser.get(revoked.headers["location"]).text
    with pytest.raises(openai.AuthenticationError):
        chat(gateway, mine["api"])


def test_the_usage_page_cannot_revoke_another_accounts_key(gateway):
    lab_key = ok(gateway, "POST", "/v1/api_keys", ADMIN_KEY, {"name": "lab-two", "account": "lab"})
    browser = Browser(gateway.url)
    browser.login(ONE)
    answer = browser.submit("/usage", f"/usage/keys/{lab_key['id']}/revoke")
    assert answer.status_code == 404
    chat(gateway, lab_key["api"])


def test_the_usage_page_has_no_keys_section_without_self_service(gateway):
    browser = Browser(gateway.url)
    browser.login(LAB)
    assert "Keys of account" not in browser.get("/usage").text
    assert browser.submit("/usage", "/usage/keys", name="x").status_code == 403
