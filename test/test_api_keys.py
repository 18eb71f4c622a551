"""The keys API end to end (KEYS_API contract, issue #15): an admin makes, lists, reads, changes,
rotates and deletes keys over HTTP, and the keys it hands out are used with the official openai
SDK against the real gateway and a fake upstream. Changes are in force at once, survive a
restart, never write api.yaml, are audited, and no answer or audit entry holds a full secret."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from test.conftest import ADMIN_KEY, USER_KEY, RunningGateway
from test.servers import FakeUpstream

StartGateway = Callable[..., RunningGateway]

MODEL = "gpt-4o"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
# The fake upstream reports 11 prompt + 7 completion tokens per answer.
TOKENS_PER_REPLY = 18
# At gpt-4o's token price below: 11*1000/1M + 7*2000/1M USD.
REPLY_COST = Decimal("0.025")

PLAIN_FILE_KEY = "sk-file-plain-0003"  # an api.yaml key without `id:`
PINNED_FILE_KEY = "sk-file-pinned-0004"  # an api.yaml key with `id: ci-bot`

CONFIG = f"""
# Keys API test config: the keys API must never write this file.
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [{MODEL}]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
  - api: {PLAIN_FILE_KEY}
    name: plain-file-key
    preferences: {{billing_mode: token, credits: 10}}
  - api: {PINNED_FILE_KEY}
    id: ci-bot
    name: pinned-file-key
    preferences: {{billing_mode: token, credits: 10}}
preferences:
  count_billing:
    enabled: true
    default_count_price: 0.001
    model_count_prices: {{{MODEL}: 0.008}}
  model_price:
    {MODEL}: 1000,2000
"""


class Clock:
    """The gateway's clock, moved by the test instead of sleeping (starts at the real time)."""

    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass
class Admin:
    """The keys API as an admin calls it: raw responses, plus checked shortcuts for the happy path."""

    gateway: RunningGateway
    key: str | None = ADMIN_KEY

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.gateway.http(method, path, key=self.key, **kwargs)

    def create(self, entry: dict[str, Any]) -> dict[str, Any]:
        response = self.call("POST", "/v1/api_keys", json=entry)
        assert response.status_code == 201, response.text
        return body(response)

    def get(self, key_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/api_keys/{key_id}")
        assert response.status_code == 200, response.text
        return body(response)

    def patch(self, key_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        response = self.call("PATCH", f"/v1/api_keys/{key_id}", json=patch)
        assert response.status_code == 200, response.text
        return body(response)

    def rotate(self, key_id: str, **options: Any) -> dict[str, Any]:
        response = self.call("POST", f"/v1/api_keys/{key_id}/rotate", json=options or None)
        assert response.status_code == 200, response.text
        return body(response)

    def delete(self, key_id: str) -> dict[str, Any]:
        response = self.call("DELETE", f"/v1/api_keys/{key_id}")
        assert response.status_code == 200, response.text
        return body(response)

    def list(self, **params: Any) -> dict[str, Any]:
        response = self.call("GET", "/v1/api_keys", params=params)
        assert response.status_code == 200, response.text
        return body(response)


def admin(gateway: RunningGateway) -> Admin:
    return Admin(gateway)


def body(response: httpx.Response) -> dict[str, Any]:
    """A JSON answer with its numbers as exact Decimals (money is never compared as floats)."""
    return json.loads(response.text, parse_float=Decimal)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of a refused call, after checking its status."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}, error
    return error


def chat(gateway: RunningGateway, secret: str) -> ChatCompletion:
    return gateway.client(secret).chat.completions.create(model=MODEL, messages=MESSAGES)


def refusal(gateway: RunningGateway, secret: str) -> tuple[int, str]:
    """(HTTP status, error code) of a chat completion the gateway must refuse."""
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gateway, secret)
    error = caught.value.body
    assert isinstance(error, dict), error
    return caught.value.status_code, error["code"]


@contextmanager
def logged_in(gateway: RunningGateway, secret: str) -> Iterator[httpx.Client]:
    """A cookie-keeping client logged in through the web form (the CSV exports are pages)."""
    with httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=10) as browser:
        form = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        assert form is not None, "the login page has no CSRF token"
        assert browser.post("/login", data={"csrf_token": form.group(1), "api_key": secret}).status_code == 303
        yield browser


def file_key_id(secret: str) -> str:
    """The ledger id of an api.yaml key without `id:` (the contract: first 32 hex of sha256)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


@pytest.fixture
def gateway(start_gateway: StartGateway, upstream: FakeUpstream) -> RunningGateway:
    return start_gateway(CONFIG, upstream)


# 1. create


def test_created_key_works_with_the_openai_sdk(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    made = admin(gateway).create({"name": "made-by-api", "model": [MODEL]})
    secret = made["api"]
    assert secret.startswith("sk-") and len(secret) >= 40
    assert re.fullmatch(r"key_[0-9a-f]{16}", made["id"]) and made["key"]["id"] == made["id"]
    reply = chat(gateway, secret)
    assert reply.choices[0].message.content == "Hello from upstream"
    assert len(upstream.seen) == 1
    assert admin(gateway).get(made["id"])["state"]["request_count"] == 1


def test_a_created_secret_is_shown_once_and_never_listed(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "shown-once"})
    secret = made["api"]
    assert secret not in json.dumps(made["key"], default=str)
    for path in ("/v1/api_keys", f"/v1/api_keys/{made['id']}", "/v1/api_keys?q=shown&limit=1000"):
        response = admin(gateway).call("GET", path)
        assert response.status_code == 200 and secret not in response.text and secret[3:20] not in response.text
    view = admin(gateway).get(made["id"])
    assert view["defined_in"] == "api" and view["status"] == "active"
    assert view["name"] == "shown-once" and view["role"] == "user"
    assert "…" in view["api"] and view["api"] != secret and len(view["api"]) < len(secret) // 2
    assert view["created_at"] is not None and view["deleted_at"] is None


def test_an_imported_secret_is_kept_and_works(gateway: RunningGateway) -> None:
    imported = "sk-imported-from-elsewhere-0001"
    made = admin(gateway).create({"api": imported, "name": "imported"})
    assert made["api"] == imported
    assert chat(gateway, imported).choices[0].message.content == "Hello from upstream"


# 2. count billing


def test_count_key_made_by_the_api_serves_exactly_its_credits(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    made = admin(gateway).create({"name": "three-calls", "preferences": {"billing_mode": "count", "count_credits": 3}})
    for _ in range(3):
        chat(gateway, made["api"])
    assert refusal(gateway, made["api"]) == (402, "count_credits_exhausted")
    assert len(upstream.seen) == 3
    state = admin(gateway).get(made["id"])["state"]
    assert state["billing_mode"] == "count" and state["remaining_count_credits"] == 0 and state["request_count"] == 3


def test_count_key_made_by_the_api_admits_exactly_its_credits_under_concurrency(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    made = admin(gateway).create({"name": "three-at-once", "preferences": {"billing_mode": "count", "count_credits": 3}})
    statuses = gateway.fire(made["api"], 50, model=MODEL, messages=MESSAGES)
    assert sorted(statuses) == [200] * 3 + [402] * 47
    assert len(upstream.seen) == 3
    assert admin(gateway).get(made["id"])["state"]["remaining_count_credits"] == 0


# 3. tokens quota


def test_quota_patches_are_in_force_at_once(gateway: RunningGateway) -> None:
    api = admin(gateway)
    made = api.create({"name": "quota", "preferences": {"credits": 10, "quota": 10, "quota_type": "tokens"}})
    key_id, secret = made["id"], made["api"]
    chat(gateway, secret)  # admitted at 0 of 10 tokens, uses 18
    assert refusal(gateway, secret) == (402, "API_KEY_QUOTA_EXHAUSTED")

    raised = api.patch(key_id, {"preferences": {"quota": 1000}})
    assert raised["quota"] == {"type": "tokens", "limit": 1000, "used": TOKENS_PER_REPLY, "remaining": 1000 - TOKENS_PER_REPLY}
    assert raised["preferences"]["credits"] == 10 and raised["preferences"]["quota_type"] == "tokens"  # a merge, not a replace
    chat(gateway, secret)

    api.patch(key_id, {"preferences": {"quota": 2 * TOKENS_PER_REPLY - 1}})
    assert refusal(gateway, secret) == (402, "API_KEY_QUOTA_EXHAUSTED")

    unlimited = api.patch(key_id, {"preferences": {"quota": None}})
    assert unlimited["quota"] is None and "quota" not in unlimited["preferences"]
    chat(gateway, secret)
    assert api.get(key_id)["state"]["request_count"] == 3


def test_quota_zero_means_no_quota(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "quota-zero", "preferences": {"quota": 10, "quota_type": "tokens"}})
    chat(gateway, made["api"])
    assert refusal(gateway, made["api"]) == (402, "API_KEY_QUOTA_EXHAUSTED")
    admin(gateway).patch(made["id"], {"preferences": {"quota": 0}})
    chat(gateway, made["api"])


# 4. rotate


def test_rotation_replaces_the_secret_and_keeps_the_balance(gateway: RunningGateway) -> None:
    api = admin(gateway)
    made = api.create({"name": "rotated", "preferences": {"billing_mode": "token", "credits": 10}})
    chat(gateway, made["api"])
    before = api.get(made["id"])

    rotated = api.rotate(made["id"])
    new_secret = rotated["api"]
    assert rotated["id"] == made["id"] and rotated["key"]["id"] == made["id"]
    assert new_secret != made["api"] and new_secret.startswith("sk-") and len(new_secret) >= 40
    assert rotated["previous_valid_until"] is None
    assert refusal(gateway, made["api"]) == (401, "invalid_api_key")

    after = api.get(made["id"])
    assert after["id"] == before["id"] and after["api"] != before["api"]
    for field in ("total_cost", "request_count", "remaining_credits", "credits"):
        assert after["state"][field] == before["state"][field], field
    assert after["state"]["total_cost"] == REPLY_COST and after["state"]["remaining_credits"] == 10 - REPLY_COST
    chat(gateway, new_secret)
    assert api.get(made["id"])["state"]["request_count"] == 2
    assert new_secret not in api.call("GET", "/v1/api_keys").text


def test_rotation_with_grace_keeps_the_old_secret_until_it_ends(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    clock = Clock()
    gateway = start_gateway(CONFIG, upstream, clock=clock)
    made = admin(gateway).create({"name": "graceful"})
    rotated = admin(gateway).rotate(made["id"], grace_seconds=60)
    assert rotated["previous_valid_until"] is not None
    chat(gateway, made["api"])  # still valid right after
    chat(gateway, rotated["api"])
    clock.advance(61)
    assert refusal(gateway, made["api"]) == (401, "invalid_api_key")
    chat(gateway, rotated["api"])
    assert admin(gateway).get(made["id"])["state"]["request_count"] == 3


# 5. delete


def test_deleted_key_is_refused_at_once_and_its_history_stays(gateway: RunningGateway) -> None:
    api = admin(gateway)
    made = api.create({"name": "to-delete", "preferences": {"credits": 10}})
    chat(gateway, made["api"])

    deleted = api.delete(made["id"])
    assert deleted["id"] == made["id"] and deleted["deleted"] is True and deleted["key"]["status"] == "deleted"
    assert refusal(gateway, made["api"]) == (401, "invalid_api_key")

    view = api.get(made["id"])
    assert view["status"] == "deleted" and view["deleted_at"] is not None
    assert view["state"]["request_count"] == 1 and view["state"]["total_cost"] == REPLY_COST
    listed = {key["id"]: key for key in api.list(limit=1000)["data"]}
    assert listed[made["id"]]["status"] == "deleted"


def test_deleted_key_usage_stays_in_the_admins_token_usage(gateway: RunningGateway) -> None:
    api = admin(gateway)
    made = api.create({"name": "deleted-but-billed", "preferences": {"credits": 10}})
    chat(gateway, made["api"])
    api.delete(made["id"])
    response = api.call("GET", "/v1/token_usage")
    assert response.status_code == 200, response.text
    stats = [entry for entry in body(response)["stats"] if entry["name"] == "deleted-but-billed"]
    assert len(stats) == 1, body(response)["stats"]
    assert stats[0]["total_cost"] == REPLY_COST
    assert sum(row["request_count"] for row in stats[0]["usage"]) == 1


def test_deleted_key_requests_stay_in_the_csv_export(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "exported"})
    chat(gateway, made["api"])
    admin(gateway).delete(made["id"])
    with logged_in(gateway, ADMIN_KEY) as browser:
        response = browser.get("/admin/export/requests.csv", params={"key": made["id"]})
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [row["key_name"] for row in rows] == ["exported"] and Decimal(rows[0]["cost_usd"]) == REPLY_COST


def test_a_deleted_key_cannot_be_changed(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "gone"})
    admin(gateway).delete(made["id"])
    error = error_of(admin(gateway).call("PATCH", f"/v1/api_keys/{made['id']}", json={"preferences": {"credits": 5}}), 409)
    assert error["code"] == "key_deleted"
    assert admin(gateway).get(made["id"])["status"] == "deleted"


# 6. disable / enable


def test_disabling_and_enabling_a_key_is_in_force_at_once(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "switch"})
    chat(gateway, made["api"])
    assert admin(gateway).patch(made["id"], {"preferences": {"enabled": False}})["status"] == "disabled"
    assert refusal(gateway, made["api"]) == (403, "key_disabled")
    assert admin(gateway).patch(made["id"], {"preferences": {"enabled": True}})["status"] == "active"
    chat(gateway, made["api"])


# 7. validation and access


@pytest.mark.parametrize(
    ("entry", "param", "says"),
    [
        ({"preferences": {"quotaa": 5}}, "preferences.quotaa", "did you mean 'quota'?"),
        ({"preferences": {"quota": -5}}, "preferences.quota", ""),
        ({"preferences": {"credits": -5}}, "preferences.credits", ""),
        ({"preferences": {"billing_mode": "free"}}, "preferences.billing_mode", ""),
    ],
    ids=["unknown field", "negative quota", "negative credits", "unknown billing mode"],
)
def test_an_invalid_entry_is_refused_naming_the_field(gateway: RunningGateway, entry: dict[str, Any], param: str, says: str) -> None:
    before = admin(gateway).list(limit=1000)["total"]
    error = error_of(admin(gateway).call("POST", "/v1/api_keys", json={"name": "bad", **entry}), 400)
    assert error["code"] == "invalid_key_entry" and param in (error["param"] or ""), error
    assert says in error["message"]
    assert admin(gateway).list(limit=1000)["total"] == before  # nothing stored


def test_unlimited_credits_are_accepted(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "unlimited", "preferences": {"credits": -1}})
    chat(gateway, made["api"])


def test_an_invalid_patch_stores_nothing(gateway: RunningGateway) -> None:
    made = admin(gateway).create({"name": "keeps", "preferences": {"quota": 100, "quota_type": "tokens"}})
    error = error_of(admin(gateway).call("PATCH", f"/v1/api_keys/{made['id']}", json={"preferences": {"quota": -1, "credits": 3}}), 400)
    assert error["code"] == "invalid_key_entry" and error["param"] == "preferences.quota"
    view = admin(gateway).get(made["id"])
    assert view["preferences"]["quota"] == 100 and "credits" not in view["preferences"]


@pytest.mark.parametrize("field", ["api", "id"])
def test_secret_and_id_cannot_be_patched(gateway: RunningGateway, field: str) -> None:
    made = admin(gateway).create({"name": "fixed"})
    error = error_of(admin(gateway).call("PATCH", f"/v1/api_keys/{made['id']}", json={field: "sk-something-else-0001"}), 400)
    assert error["code"] == "immutable_field" and error["param"] == field
    chat(gateway, made["api"])  # the old secret still works


KEY_ROUTES = [
    ("GET", "/v1/api_keys", None),
    ("POST", "/v1/api_keys", {"name": "x"}),
    ("GET", "/v1/api_keys/ci-bot", None),
    ("PATCH", "/v1/api_keys/ci-bot", {"name": "x"}),
    ("POST", "/v1/api_keys/ci-bot/rotate", None),
    ("DELETE", "/v1/api_keys/ci-bot", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), KEY_ROUTES)
def test_every_keys_route_needs_an_admin_key(gateway: RunningGateway, method: str, path: str, payload: dict[str, Any] | None) -> None:
    assert error_of(gateway.http(method, path, key=USER_KEY, json=payload), 403)["code"] == "admin_required"
    assert error_of(gateway.http(method, path, key=None, json=payload), 401)["code"] == "invalid_api_key"
    chat(gateway, PINNED_FILE_KEY)  # nothing was rotated or deleted
    assert admin(gateway).get("ci-bot")["name"] == "pinned-file-key"


@pytest.mark.parametrize(("method", "suffix", "payload"), [("GET", "", None), ("PATCH", "", {"name": "x"}), ("POST", "/rotate", None), ("DELETE", "", None)])
def test_an_unknown_id_is_404(gateway: RunningGateway, method: str, suffix: str, payload: dict[str, Any] | None) -> None:
    error = error_of(admin(gateway).call(method, f"/v1/api_keys/key_0000000000000000{suffix}", json=payload), 404)
    assert error["code"] == "key_not_found"


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/api_keys"), ("PATCH", "/v1/api_keys/ci-bot")])
def test_a_body_that_is_not_json_is_400(gateway: RunningGateway, method: str, path: str) -> None:
    response = admin(gateway).call(method, path, content=b'{"name": "x",', headers={"Content-Type": "application/json"})
    assert error_of(response, 400)["code"] == "invalid_json"


def test_an_imported_secret_that_is_already_a_key_is_409(gateway: RunningGateway) -> None:
    error = error_of(admin(gateway).call("POST", "/v1/api_keys", json={"api": USER_KEY, "name": "copy"}), 409)
    assert error["code"] == "duplicate_key" and USER_KEY not in json.dumps(error)


def test_an_id_in_use_is_409(gateway: RunningGateway) -> None:
    error = error_of(admin(gateway).call("POST", "/v1/api_keys", json={"id": "ci-bot", "name": "copy"}), 409)
    assert error["code"] == "duplicate_key_id"
    pinned = admin(gateway).create({"id": "pinned-by-api", "name": "pinned"})
    assert pinned["id"] == "pinned-by-api" and admin(gateway).get("pinned-by-api")["name"] == "pinned"


@pytest.mark.parametrize("limit", ["0", "1001", "ten"])
def test_a_page_size_out_of_range_is_400(gateway: RunningGateway, limit: str) -> None:
    assert error_of(admin(gateway).call("GET", "/v1/api_keys", params={"limit": limit}), 400)["param"] == "limit"


# 8. restart


def test_keys_and_their_changes_survive_a_restart(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    gateway = start_gateway(CONFIG, upstream)
    api = admin(gateway)
    kept = api.create({"name": "kept", "preferences": {"billing_mode": "count", "count_credits": 5}})
    chat(gateway, kept["api"])
    api.patch(kept["id"], {"name": "kept-renamed", "preferences": {"rate_limit": "100/min"}})
    new_secret = api.rotate(kept["id"])["api"]
    chat(gateway, new_secret)
    gone = api.create({"name": "gone"})
    api.delete(gone["id"])
    api.patch("ci-bot", {"preferences": {"credits": 20}})
    before = {key_id: api.get(key_id) for key_id in (kept["id"], gone["id"], "ci-bot")}
    gateway.server.stop()

    again = start_gateway(CONFIG, upstream)
    api = admin(again)
    after = {key_id: api.get(key_id) for key_id in before}
    for key_id, view in before.items():
        for field in ("name", "status", "preferences", "api_changes", "api", "quota", "state"):
            assert after[key_id][field] == view[field], (key_id, field)
    assert after[kept["id"]]["name"] == "kept-renamed" and after[kept["id"]]["state"]["remaining_count_credits"] == 3
    assert after[gone["id"]]["status"] == "deleted" and after["ci-bot"]["preferences"]["credits"] == 20
    chat(again, new_secret)
    assert api.get(kept["id"])["state"]["remaining_count_credits"] == 2
    assert refusal(again, kept["api"]) == (401, "invalid_api_key")
    assert refusal(again, gone["api"]) == (401, "invalid_api_key")


# 9. api.yaml keys


def test_patching_an_api_yaml_key_stores_the_change_not_the_file(gateway: RunningGateway) -> None:
    before = gateway.config_path.read_bytes()
    patch = {"preferences": {"quota": 10, "quota_type": "tokens"}}
    view = admin(gateway).patch("ci-bot", patch)
    assert view["defined_in"] == "api.yaml"
    assert view["api_changes"] == patch
    assert view["preferences"] == {"billing_mode": "token", "credits": 10, "quota": 10, "quota_type": "tokens"}
    assert admin(gateway).get("ci-bot")["api_changes"] == patch
    chat(gateway, PINNED_FILE_KEY)  # the patched quota is in force: 18 of 10 tokens used
    assert refusal(gateway, PINNED_FILE_KEY) == (402, "API_KEY_QUOTA_EXHAUSTED")
    assert gateway.config_path.read_bytes() == before


def test_api_yaml_keys_keep_their_ledger_ids(gateway: RunningGateway) -> None:
    chat(gateway, PLAIN_FILE_KEY)
    plain = admin(gateway).get(file_key_id(PLAIN_FILE_KEY))
    assert plain["name"] == "plain-file-key" and plain["defined_in"] == "api.yaml" and plain["api_changes"] is None
    assert plain["state"]["request_count"] == 1
    pinned = admin(gateway).get("ci-bot")
    assert pinned["id"] == "ci-bot" and pinned["name"] == "pinned-file-key"
    listed = {key["name"]: key["id"] for key in admin(gateway).list()["data"]}
    assert listed["plain-file-key"] == file_key_id(PLAIN_FILE_KEY) and listed["pinned-file-key"] == "ci-bot"


# 10. audit


def test_every_key_operation_is_audited_without_its_secret(gateway: RunningGateway) -> None:
    api = admin(gateway)
    imported = "sk-audit-imported-secret-0001"
    made = api.create({"api": imported, "name": "audited"})
    api.patch(made["id"], {"preferences": {"credits": 5}})
    new_secret = api.rotate(made["id"])["api"]
    api.delete(made["id"])
    generated = api.create({"name": "audited-too"})

    response = api.call("GET", "/v1/audit_log", params={"limit": 100})
    assert response.status_code == 200, response.text
    for secret in (imported, new_secret, generated["api"]):
        assert secret not in response.text and secret[3:20] not in response.text
    entries = [entry for entry in response.json()["entries"] if entry["target_key_id"] == made["id"]]
    actions = [entry["action"] for entry in reversed(entries)]  # oldest first
    assert len(actions) == 4, actions
    for action, word in zip(actions, ("create", "update|patch", "rotate", "delete"), strict=True):
        assert re.search(word, action), actions
    assert all(entry["actor"] == "ops" for entry in entries)
    assert any(entry["target_key_id"] == generated["id"] and "create" in entry["action"] for entry in response.json()["entries"])


# 11. search and paging


def test_list_filters_by_name_and_pages(gateway: RunningGateway) -> None:
    api = admin(gateway)
    for name in ("team-red-1", "team-red-2", "team-blue-1"):
        api.create({"name": name})
    red = api.list(q="red")
    assert red["object"] == "list" and red["total"] == 2
    assert sorted(key["name"] for key in red["data"]) == ["team-red-1", "team-red-2"]

    everything = api.list(limit=1000)
    assert everything["total"] == 7 and len(everything["data"]) == 7  # 4 from api.yaml, 3 made here
    pages = [api.list(limit=3, offset=offset) for offset in (0, 3, 6)]
    assert [(page["limit"], page["offset"], page["total"], len(page["data"])) for page in pages] == [(3, 0, 7, 3), (3, 3, 7, 3), (3, 6, 7, 1)]
    paged_ids = [key["id"] for page in pages for key in page["data"]]
    assert paged_ids == [key["id"] for key in everything["data"]]


# 12. what the states show


def test_key_states_show_the_cache_writes_anthropic_reports_beside_the_cache_reads(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    """Claude Code's prompt caching through /v1/messages: each answer reports 1,000 cache reads
    and 100 cache writes (`cache_creation_input_tokens`); the key's state, its usage and the
    provider's state count both, per model."""
    import anthropic
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from test.test_anthropic import CONFIG as ANTHROPIC_CONFIG
    from test.test_anthropic import MESSAGE

    async def anthropic_vendor(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(MESSAGE)

    upstream.script("p1", anthropic_vendor)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    for _ in range(2):
        client.messages.create(model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "Weather in Paris?"}])
    cache = {"prompt_tokens": 2250, "cached_tokens": 2000, "cache_write_tokens": 200}

    def figures(row: dict[str, Any]) -> dict[str, Any]:
        return {name: row[name] for name in cache}

    response = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)
    assert response.status_code == 200, response.text
    (detail,) = response.json()["api_keys_states"][USER_KEY]["cost_details"]["billing_details"]
    assert (detail["model"], figures(detail)) == ("claude-sonnet", cache)
    (stats,) = gateway.http("GET", f"/v1/token_usage?api_key_param={USER_KEY}&last_n_days=1", key=ADMIN_KEY).json()["stats"]
    assert [figures(row) for row in stats["usage"]] == [cache]
    assert figures(gateway.http("GET", "/v1/usage").json()["totals"]) == cache
    assert [figures(row) for row in gateway.http("GET", "/v1/usage/models?period=all").json()["data"]] == [cache]
    year, month = time.gmtime()[:2]
    bill = gateway.http("GET", f"/v1/billing/bill/{year}/{month:02d}").json()
    assert figures(bill["totals"]) == cache and [figures(row) for row in bill["line_items"]] == [cache]
    (provider,) = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY).json()["providers"]
    assert [figures(row) for row in provider["models"]] == [cache]
