"""Security: who may call what, what never leaves the gateway, and how guessing is slowed."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from test.conftest import ADMIN_KEY, USER_KEY
from test.servers import openai_like
from test.test_limits import FakeClock
from test.test_web import Browser

OTHER_KEY = "sk-other-user-0003"
VENDOR_KEY = "vendor-secret-0123456789abcdef"
CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: {VENDOR_KEY}
    model: [gpt-4o]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 10}}
  - api: {OTHER_KEY}
    name: bob
    preferences: {{billing_mode: count, count_credits: 5}}
preferences:
  trusted_proxies: [127.0.0.1/32]
  auth_failure_limit: 5
  model_price: {{default: '1,2'}}
"""
MESSAGES = [{"role": "user", "content": "hi"}]
# Every admin endpoint with a request that would be valid for an admin.
ADMIN_ROUTES = [
    ("GET", "/v1/api_keys_states", {}),
    ("POST", "/v1/add_credits", {"params": {"paid_key": USER_KEY, "amount": "1"}}),
    ("POST", "/v1/add_count_credits", {"params": {"paid_key": OTHER_KEY, "amount": "1"}}),
    ("POST", "/v1/set_billing_mode", {"params": {"paid_key": USER_KEY, "billing_mode": "count"}}),
    ("POST", "/v1/usage/report", {"json": {"api_key": USER_KEY, "model": "gpt-4o", "prompt_tokens": 1}}),
    ("GET", "/v1/config/status", {}),
    ("GET", "/v1/audit_log", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), ADMIN_ROUTES, ids=[r[1] for r in ADMIN_ROUTES])
def test_every_admin_route_refuses_user_keys_and_anonymous_callers(start_gateway, upstream, method, path, kwargs):
    gateway = start_gateway(CONFIG, upstream)
    forbidden = gateway.http(method, path, key=USER_KEY, **kwargs)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "admin_required"
    assert gateway.http(method, path, key=None, **kwargs).status_code == 401
    assert gateway.http(method, path, key=ADMIN_KEY, **kwargs).status_code == 200  # and the admin may


def test_a_key_holder_never_sees_another_keys_data(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(OTHER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    other = gateway.http("GET", "/v1/token_usage", key=USER_KEY, params={"api_key_param": OTHER_KEY})
    assert other.status_code == 403
    for path in ("/v1/token_usage", "/v1/usage", "/v1/usage/models", "/v1/dashboard/billing/subscription", "/v1/dashboard/billing/usage"):
        response = gateway.http("GET", path, key=USER_KEY)
        assert response.status_code == 200, path
        assert "bob" not in response.text and OTHER_KEY not in response.text, path


def test_cookies_a_vendor_sets_never_ride_along_on_other_requests(start_gateway, upstream):
    """One upstream session serves every key: a vendor's Set-Cookie for one request must
    not be sent back on the next (another key's) request."""

    async def sets_a_cookie(body, request):
        response = await openai_like(body, request)
        response.set_cookie("__cf_bm", "session-of-the-first-caller", path="/")
        return response

    upstream.script("p1", sets_a_cookie)
    # By host name: aiohttp's cookie jar ignores cookies from IP addresses, which would hide the bug.
    gateway = start_gateway(CONFIG.replace("{fake:p1}", upstream.base_url("p1").replace("127.0.0.1", "localhost")))
    gateway.client(USER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gateway.client(OTHER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(upstream.seen) == 2
    assert "cookie" not in upstream.seen[1].headers


def test_vendor_keys_and_full_client_keys_never_leave_the_gateway(start_gateway, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start_gateway(CONFIG, upstream)
    gateway.client(USER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gateway.http("POST", "/v1/chat/completions", key="sk-wrong-" + USER_KEY, json={"model": "gpt-4o", "messages": MESSAGES})
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": "2"})
    upstream.script("p1", _vendor_error)
    gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    bodies = [
        gateway.http("GET", path, key=ADMIN_KEY).text for path in ("/v1/config/status", "/v1/api_keys_states", "/v1/models", "/v1/token_usage", "/v1/audit_log")
    ]
    with gateway_session(gateway, ADMIN_KEY) as web:
        key_id = web.get("/admin/keys").text.split("/admin/keys/")[1].split('"')[0]
        for page in (
            "/admin",
            "/admin/keys",
            f"/admin/keys/{key_id}",
            "/admin/accounts",
            "/admin/audit",
            "/admin/audit.csv",
            "/admin/export/requests.csv",
            "/admin/export/keys.csv",
        ):
            response = web.get(page)
            assert response.status_code == 200, page
            bodies.append(response.text)
    for body in bodies:
        assert VENDOR_KEY not in body
    # The gateway's own logs (the test's HTTP clients log their URLs, keys included: not ours).
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "openai")))
    assert "tollgate" in logs  # the failed call above was logged
    assert VENDOR_KEY not in logs
    for secret in (USER_KEY, ADMIN_KEY, OTHER_KEY):
        assert secret not in logs
        # (api_keys_states, bodies[1], is keyed by the full key on purpose: the admin's own tool.)
        assert all(secret not in body for index, body in enumerate(bodies) if index != 1), secret


async def _vendor_error(body, request):  # type: ignore[no-untyped-def]
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": f"Incorrect API key provided: {VENDOR_KEY}", "type": "invalid_request_error"}}, status_code=401)


@contextlib.contextmanager
def gateway_session(gateway, key: str) -> Iterator[Browser]:  # type: ignore[no-untyped-def]
    browser = Browser(gateway.url)
    assert browser.login(key).status_code == 303
    try:
        yield browser
    finally:
        browser.http.close()


def test_pages_send_security_headers(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    with gateway_session(gateway, ADMIN_KEY) as web:
        responses = [gateway.http("GET", "/login", key=None), web.get("/admin"), web.get("/admin/keys"), web.get("/admin/audit")]
    for response in responses:
        assert response.status_code == 200
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "script-src" not in csp.replace("default-src 'none'", "")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"


def test_repeated_bad_keys_from_one_address_are_throttled_without_affecting_others(start_gateway, upstream):
    clock = FakeClock(1_800_000_000.0)  # 30 s into a minute: the whole test stays in one window
    gateway = start_gateway(CONFIG, upstream, clock=clock)
    attacker, bystander = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.9"}
    body = {"model": "gpt-4o", "messages": MESSAGES}
    for attempt in range(5):
        response = gateway.http("POST", "/v1/chat/completions", key=f"sk-guess-{attempt}", json=body, headers=dict(attacker))
        assert response.status_code == 401
    blocked = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body, headers=dict(attacker))
    assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "too_many_auth_failures"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body, headers=dict(bystander)).status_code == 200
    clock.advance(60)  # the next minute: the attacker's address may try again
    assert gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body, headers=dict(attacker)).status_code == 200


def test_every_admin_action_is_in_the_append_only_audit_log(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    headers = {"X-Forwarded-For": "192.0.2.44"}
    assert gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": "2.5"}, headers=dict(headers)).status_code == 200
    assert gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params={"paid_key": OTHER_KEY, "amount": "3"}).status_code == 200
    assert gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": USER_KEY, "billing_mode": "hybrid"}).status_code == 200
    report = {"api_key": USER_KEY, "model": "gpt-4o", "prompt_tokens": 1_000_000}
    assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report).status_code == 200
    with gateway_session(gateway, ADMIN_KEY) as web:
        page = web.get("/admin/audit")
        csv_text = web.get("/admin/audit.csv").text
    entries = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    actions = [entry["action"] for entry in reversed(entries)]
    assert actions == ["add_credits", "add_count_credits", "set_billing_mode", "report_usage", "login"]
    top_up = entries[-1]
    assert top_up["actor"] == "ops" and top_up["address"] == "192.0.2.44" and top_up["target_name"] == "alice"
    assert '"remaining_credits":"10"' in top_up["before"] and '"remaining_credits":"12.5"' in top_up["after"]
    assert '"amount":"2.5"' in top_up["detail"]
    mode = next(entry for entry in entries if entry["action"] == "set_billing_mode")
    assert mode["before"] == '{"billing_mode":"token"}' and mode["after"] == '{"billing_mode":"hybrid"}'
    assert page.status_code == 200 and "add_count_credits" in page.text and "192.0.2.44" in page.text
    assert csv_text.count("\n") == 6 and "report_usage" in csv_text  # header + 5 rows
    assert ADMIN_KEY not in csv_text and USER_KEY not in csv_text
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(start_gateway, upstream):
    """No Content-Length to go by: the gateway counts as the body arrives and stops at the limit."""
    gateway = start_gateway(CONFIG.replace("auth_failure_limit: 5", "auth_failure_limit: 5\n  max_request_body_bytes: 10000"), upstream)

    def body():  # type: ignore[no-untyped-def]
        yield b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'
        for _ in range(1000):  # 1 MB in 1 KB chunks
            yield b"x" * 1024
        yield b'"}]}'

    try:
        response = gateway.http("POST", "/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    except httpx.HTTPError:
        pass  # the server may also close the connection right after its 413
    assert upstream.seen == []


def test_admin_forms_never_redirect_off_the_admin_pages(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    with gateway_session(gateway, ADMIN_KEY) as web:
        key_page = "/admin/keys/" + web.get("/admin/keys").text.split("/admin/keys/")[1].split('"')[0]
        for back in ("https://evil.example/phish", "//evil.example", "/\\evil.example", "javascript:alert(1)", "/usage"):
            response = web.submit(key_page, key_page + "/add_credits", amount="1", back=back)
            assert response.status_code == 303
            location = response.headers["location"]
            assert location.startswith("/admin") and "evil" not in location, (back, location)


LIVE_SECRET = "sk-live-SECRET-7f3a9c"


@pytest.mark.parametrize(
    "mistake",
    [
        ("    name: alice\n", f"    name: alice\n    api: {LIVE_SECRET}\n"),  # a second `api:` line
        (f"  - api: {OTHER_KEY}\n", f"  - api: {OTHER_KEY}\n    preferences: {{api: {LIVE_SECRET}}}\n    preferences: {{}}\n"),
    ],
)
def test_a_config_error_never_quotes_a_key(start_gateway, upstream, caplog, mistake):
    gateway = start_gateway(CONFIG, upstream)
    broken = gateway.config_path.read_text().replace(*mistake)
    gateway.config_path.write_text(broken)
    status = gateway.wait_for(lambda s: s["last_error"] is not None)
    assert "duplicate key" in status["last_error"]["reason"] and status["last_error"]["line"] is not None
    answer = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": OTHER_KEY, "billing_mode": "token"})
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "config_invalid"
    with gateway_session(gateway, ADMIN_KEY) as web:
        page = web.get("/admin").text
    logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("tollgate"))
    assert "config reload failed" in logs
    for text in (str(status), answer.text, page, logs):
        for secret in (LIVE_SECRET, USER_KEY, OTHER_KEY):
            assert secret not in text, secret
