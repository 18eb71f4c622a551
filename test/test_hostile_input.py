"""Hostile input, fuzzed with Hypothesis against the running gateway: whatever arrives, the
answer is a 4xx with an OpenAI-shaped error (or a normal answer), never a 500, and the
ledger only ever changes for requests that were actually served."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from test.conftest import ADMIN_KEY, USER_KEY

CONFIG = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 5}}
preferences:
  auth_failure_limit: 0   # the fuzzer presents many bad keys on purpose
  max_request_body_bytes: 65536
  model_price: {{default: '1,2'}}
"""
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
chat_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["echo-1", "", "nope", "echo/echo-1"]) | json_values,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]) | json_values, "content": json_values}), max_size=3)
        | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(min_value=-(10**20), max_value=10**20) | json_values,
        "stream_options": json_values,
    },
)


def _assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"] and error["code"]


def _usage_rows(gateway: Any) -> int:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # commits queued ledger rows
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM usage").fetchone()[0])


def test_fuzzed_chat_requests_get_4xx_never_500_and_only_served_ones_are_billed(start_gateway):
    gateway = start_gateway(CONFIG)
    client = httpx.Client(base_url=gateway.url, timeout=10)
    served = 0

    @FUZZ
    @given(body=chat_fields.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    def check(body: bytes) -> None:
        nonlocal served
        response = client.post("/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"})
        _assert_well_formed(response)
        served += response.status_code == 200

    check()
    assert _usage_rows(gateway) == served


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeply nested (and over the size limit)
        b'{"a":' * 2000 + b"1" + b"}" * 2000,  # deeply nested, within the size limit
        b'{"model": "echo-1", "messages": [{"role": "user", "content": "\xff\xfe invalid utf-8"}]}',
        b'{"model": "echo-1", "messages": [], "max_tokens": 1e999}',
        b'{"model": "echo-1", "messages": [], "max_tokens": NaN}',
        b"\x00" * 1000,
        b"",
    ],
    ids=["nested-huge", "nested", "invalid-utf8", "inf", "nan", "nul-bytes", "empty"],
)
def test_pathological_bodies_get_a_clear_4xx(start_gateway, body):
    gateway = start_gateway(CONFIG)
    response = gateway.http("POST", "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    _assert_well_formed(response)
    assert 400 <= response.status_code < 500
    assert _usage_rows(gateway) == 0


def test_a_huge_max_tokens_is_refused_for_lack_of_credit_not_by_a_crash(start_gateway):
    gateway = start_gateway(CONFIG + "  max_reserve_completion_tokens: 0\n")  # no cap: all of it is reserved
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**31 - 1}  # the largest accepted
    response = gateway.http("POST", "/v1/chat/completions", json=body)
    _assert_well_formed(response)
    assert response.status_code == 402 and _usage_rows(gateway) == 0


def test_fuzzed_admin_amounts_and_keys_never_500_and_balances_stay_exact(start_gateway):
    gateway = start_gateway(CONFIG)
    client = httpx.Client(base_url=gateway.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    amounts = st.text(max_size=20) | st.sampled_from(
        ["NaN", "-1", "0", "1e999", "Infinity", "1e-12", "0.000000001", "1" * 40, "１", " 2 ", "1e9", "1000000001"]
    )

    @FUZZ
    @given(
        amount=amounts,
        paid_key=st.sampled_from([USER_KEY, "", "sk-nope", USER_KEY + "x"]) | st.text(max_size=20),
        path=st.sampled_from(["/v1/add_credits", "/v1/add_count_credits"]),
    )
    def check(amount: str, paid_key: str, path: str) -> None:
        response = client.post(path, params={"paid_key": paid_key, "amount": amount})
        _assert_well_formed(response)
        assert response.status_code in (200, 400, 404)

    check()
    state = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        granted = db.execute("SELECT COALESCE(SUM(amount), 0) FROM grants WHERE kind = 'credits'").fetchone()[0]
        count_granted = db.execute("SELECT COALESCE(SUM(amount), 0) FROM grants WHERE kind = 'count_credits'").fetchone()[0]
    assert state["remaining_credits"] == pytest.approx(5 + granted / 1e9)
    assert state["count_credits"] == count_granted  # the key starts with none


def test_fuzzed_usage_reports_never_500(start_gateway):
    gateway = start_gateway(CONFIG)
    client = httpx.Client(base_url=gateway.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    @FUZZ
    @given(
        body=st.fixed_dictionaries(
            {},
            optional={
                "api_key": st.sampled_from([USER_KEY]) | json_values,
                "model": json_values,
                "prompt_tokens": json_values,
                "completion_tokens": json_values,
                "cached_tokens": json_values,
            },
        )
    )
    def check(body: dict[str, Any]) -> None:
        _assert_well_formed(client.post("/v1/usage/report", json=body))

    check()


def test_fuzzed_credentials_and_headers_get_401_never_500(start_gateway):
    gateway = start_gateway(CONFIG)
    client = httpx.Client(base_url=gateway.url, timeout=10)
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200).map(str.strip)  # (h11 refuses edge spaces)

    @FUZZ
    @given(authorization=header_text, api_key=header_text, forwarded=header_text)
    def check(authorization: str, api_key: str, forwarded: str) -> None:
        headers = {"Authorization": authorization, "X-Api-Key": api_key, "X-Forwarded-For": forwarded}
        response = client.post("/v1/chat/completions", json={"model": "echo-1", "messages": []}, headers=headers)
        _assert_well_formed(response)
        assert response.status_code in (400, 401)

    check()


@pytest.mark.parametrize(
    "path",
    ["/v1/../v1/api_keys_states", "/v1/chat/completions/../../v1/api_keys_states", "/%2e%2e/v1/api_keys_states", "//v1/api_keys_states",
     "/v1/api_keys_states%00", "/admin/keys/..%2f..%2fv1%2fapi_keys_states", "/static/../main.py", "/static/..%2f..%2fapi.yaml"],
)  # fmt: skip
def test_path_tricks_reach_nothing_they_should_not(start_gateway, path):
    gateway = start_gateway(CONFIG)
    response = gateway.http("GET", path, key=USER_KEY)
    assert response.status_code in (401, 403, 404, 405), (path, response.status_code)
    assert ADMIN_KEY not in response.text and "providers:" not in response.text and "import" not in response.text


def test_huge_headers_are_refused_and_the_gateway_keeps_serving(start_gateway):
    gateway = start_gateway(CONFIG)
    try:
        response = gateway.http("POST", "/v1/chat/completions", json={"model": "echo-1", "messages": []}, headers={"X-Junk": "x" * 200_000})
        assert response.status_code < 500
    except httpx.HTTPError:
        pass  # the server may drop a connection whose headers are too large: also fine
    ok = gateway.client(USER_KEY).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/audit_log", {"limit": "²"}),
        ("/v1/audit_log", {"before": "²"}),
        ("/v1/audit_log", {"before": "9" * 30}),
        ("/v1/token_usage", {"last_n_days": "²"}),
        ("/v1/token_usage", {"last_n_days": "9" * 30}),
    ],
)
def test_odd_numbers_in_query_parameters_get_a_400(start_gateway, path, params):
    """Unicode digits pass str.isdigit() but not int(); 30-digit numbers pass int() but not
    SQLite or timedelta. Both are the caller's mistake: a 400, never a 500."""
    gateway = start_gateway(CONFIG)
    response = gateway.http("GET", path, key=ADMIN_KEY, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_odd_page_number_on_the_admin_pages_shows_the_first_page(start_gateway):
    from test.test_web import Browser

    gateway = start_gateway(CONFIG)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    for page in ("²", "9" * 30):
        response = browser.get("/admin/keys", params={"page": page})
        assert response.status_code == 200, response.text


# --- A session cookie or CSRF token we never issued is not logged in, whatever its characters -------


@pytest.mark.parametrize("cookie", ["abc.é", "é.é"])
def test_a_non_ascii_session_cookie_is_not_logged_in(start_gateway, cookie):
    gateway = start_gateway(CONFIG)
    response = httpx.get(f"{gateway.url}/admin", headers={"Cookie": f"tollgate_session={cookie}".encode()}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"


def test_a_non_ascii_login_csrf_token_is_refused_with_403(start_gateway):
    gateway = start_gateway(CONFIG)
    response = httpx.post(
        f"{gateway.url}/login", data={"csrf_token": "é", "api_key": ADMIN_KEY}, headers={"Cookie": "tollgate_login_csrf=abc"}, follow_redirects=False
    )
    assert response.status_code == 403
    response = httpx.post(
        f"{gateway.url}/login", data={"csrf_token": "abc", "api_key": ADMIN_KEY}, headers={"Cookie": "tollgate_login_csrf=é".encode()}, follow_redirects=False
    )
    assert response.status_code == 403


def test_a_non_ascii_csrf_token_on_a_logged_in_form_is_refused_with_403(start_gateway):
    from test.test_web import Browser

    gateway = start_gateway(CONFIG)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    assert browser.http.post("/logout", data={"csrf_token": "é"}).status_code == 403


# --- Top-up amounts are plain ASCII decimals, on the API and the page form alike --------------------


@pytest.mark.parametrize("amount", ["1_000", "５", "٥", "1e3", "+5", "5 5", "0x10", "1,000"])
@pytest.mark.parametrize("path", ["/v1/add_credits", "/v1/add_count_credits"])
def test_top_up_amounts_must_be_plain_ascii_decimals(start_gateway, amount, path):
    gateway = start_gateway(CONFIG)
    response = gateway.http("POST", path, key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": amount})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_amount"
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        assert db.execute("SELECT COUNT(*) FROM grants").fetchone()[0] == 0


@pytest.mark.parametrize(("amount", "usd"), [("5", 10), (" 2.5 ", 7.5), ("0.5", 5.5), (".5", 5.5), ("3.", 8)])
def test_plain_decimal_top_ups_still_work(start_gateway, amount, usd):
    gateway = start_gateway(CONFIG)
    response = gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": amount})
    assert response.status_code == 200, response.text
    assert response.json()["api_key_state"]["remaining_credits"] == usd


def test_the_top_up_form_refuses_unicode_digits_too(start_gateway):
    from test.test_web import Browser, key_id

    gateway = start_gateway(CONFIG)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = f"/admin/keys/{key_id(USER_KEY)}"
    response = browser.submit(page, f"/admin/keys/{key_id(USER_KEY)}/add_credits", amount="٥", idempotency_key="once")
    assert response.status_code == 303 and "error=invalid_amount" in response.headers["location"]


# --- Calendar edges: a month or day range the code cannot represent is a 400 or an empty answer -----


TOKYO = CONFIG.replace("credits: 5}", "credits: 5, timezone: Asia/Tokyo}")


@pytest.mark.parametrize("path", ["/v1/billing/usage/9999/12", "/v1/billing/bill/9999/12", "/v1/billing/usage/1/1", "/v1/billing/bill/1/1",
                                  "/v1/billing/usage/1969/12", "/v1/billing/usage/2025/١٢", "/v1/billing/bill/٢٠٢٥/12"])  # fmt: skip
def test_calendar_months_outside_the_supported_years_get_a_400(start_gateway, path):
    """December 9999 ends past datetime's range, and January of year 1 east of UTC starts
    before it: years 1970-9998 (no usage predates the epoch), in ASCII digits."""
    gateway = start_gateway(TOKYO)
    response = gateway.http("GET", path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_month"


@pytest.mark.parametrize("path", ["/v1/billing/usage/1970/01", "/v1/billing/bill/1970/1", "/v1/billing/usage/9998/12", "/v1/billing/bill/9998/12"])
def test_calendar_months_at_the_ends_of_the_supported_years_are_served(start_gateway, path):
    gateway = start_gateway(TOKYO)
    response = gateway.http("GET", path)
    assert response.status_code == 200, response.text
    assert response.json()["line_items"] == []


@pytest.mark.parametrize("params", [{"end_date": "0001-01-01"}, {"end_date": "0001-03-01"}, {"start_date": "9999-12-30", "end_date": "9999-12-31"}])
def test_legacy_usage_at_the_calendar_edges_is_empty_not_an_overflow(start_gateway, params):
    gateway = start_gateway(CONFIG)
    response = gateway.http("GET", "/dashboard/billing/usage", params=params)
    assert response.status_code == 200, response.text
    assert response.json()["total_usage"] == 0


@pytest.mark.parametrize("params", [{"end": "0001-01-01"}, {"end": "0001-01-05", "start": "0001-01-01"}, {"end": "9999-12-31"}])
def test_csv_export_at_the_calendar_edges_is_empty_not_an_overflow(start_gateway, params):
    from test.test_web import Browser

    gateway = start_gateway(CONFIG)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    response = browser.get("/admin/export/requests.csv", params=params)
    assert response.status_code == 200, response.text
    assert response.text.splitlines()[1:] == []


# --- JSON nested deeper than the serialisers take, in the body or inside its strings ----------------


PROVIDERS = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
  - provider: p1
    base_url: {{fake:p1}}
    engine: openai
    api: k1
    model: [gpt-x]
  - provider: p2
    base_url: {{fake:p2}}
    engine: anthropic
    api: k2
    model: [claude-x]
  - provider: p3
    base_url: {{fake:p3}}
    engine: gemini
    api: k3
    model: [gemini-x]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 5}}
preferences:
  model_price: {{default: '1,2'}}
"""
HI = [{"role": "user", "content": "hi"}]


async def anthropic_reply(body: dict[str, Any], request: Any) -> Any:
    from test.test_anthropic import MESSAGE

    return JSONResponse(MESSAGE)


async def gemini_reply(body: dict[str, Any], request: Any) -> Any:
    from test.test_gemini import RESPONSE

    return JSONResponse(RESPONSE)


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("model", ["echo-1", "claude-x", "gemini-x", "gpt-x"])
def test_json_deeper_than_the_serialisers_take_gets_a_400(start_gateway, upstream, path, model):
    """orjson reads 1,024 levels but writes 254, and str() of deep values overflows: the body
    is capped once, at parse."""
    gateway = start_gateway(PROVIDERS, upstream)
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi", "name": _deep(300)}], "metadata": _deep(300)}
    response = gateway.http("POST", path, json=body)
    assert response.status_code == 400, response.text
    if path == "/v1/chat/completions":
        assert response.json()["error"]["code"] == "too_deeply_nested"
    assert upstream.seen == [] and _usage_rows(gateway) == 0


@pytest.mark.parametrize("model", ["echo-1", "claude-x", "gemini-x", "gpt-x"])
def test_json_nested_within_the_cap_is_served(start_gateway, upstream, model):
    """The cap is what orjson writes: 254 levels (the body's object, then 253 lists)."""
    gateway = start_gateway(PROVIDERS, upstream)
    upstream.script("p2", anthropic_reply)
    upstream.script("p3", gemini_reply)
    body = {"model": model, "messages": HI, "metadata": _deep(253)}
    assert gateway.http("POST", "/v1/chat/completions", json=body).status_code == 200
    assert gateway.http("POST", "/v1/chat/completions", json={**body, "metadata": [_deep(253)]}).json()["error"]["code"] == "too_deeply_nested"


def test_a_messages_body_at_the_cap_that_translation_deepens_gets_a_400(start_gateway, upstream):
    """Translated for an OpenAI-format provider, a tool's input_schema sits one level deeper
    (tools[i].function.parameters): past the cap, that is the client's 400, not a failed provider."""
    gateway = start_gateway(PROVIDERS, upstream)
    tool = {"name": "f", "input_schema": {"type": "object", "x": _deep(250)}}  # 254 levels: body, tools, tool, schema, x
    response = gateway.http("POST", "/v1/messages", json={"model": "gpt-x", "max_tokens": 10, "messages": HI, "tools": [tool]})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", response.text
    assert upstream.seen == []


@pytest.mark.parametrize("levels", [500, 2000])
@pytest.mark.parametrize("model", ["claude-x", "gemini-x"])
def test_tool_call_arguments_nested_too_deep_are_not_json_the_gateway_carries(start_gateway, upstream, model, levels):
    """The arguments are JSON inside a string, out of the body's nesting cap: past it they
    are treated like arguments that are not JSON at all (an empty object), not a crash."""
    gateway = start_gateway(PROVIDERS, upstream)
    upstream.script("p2", anthropic_reply)
    upstream.script("p3", gemini_reply)
    arguments = "[" * levels + "]" * levels
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}
    response = gateway.http("POST", "/v1/chat/completions", json={"model": model, "messages": [*HI, message]})
    assert response.status_code == 200, response.text
    sent = upstream.seen[0].body
    if model == "claude-x":
        assert sent["messages"][1]["content"][0]["input"] == {}
    else:
        assert sent["contents"][1]["parts"][0]["functionCall"]["args"] == {}


def test_a_gemini_tool_result_nested_too_deep_is_sent_as_text(start_gateway, upstream):
    gateway = start_gateway(PROVIDERS, upstream)
    upstream.script("p3", gemini_reply)
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    text = '{"a": ' + "[" * 2000 + "]" * 2000 + "}"
    result = {"role": "tool", "tool_call_id": "c1", "content": text}
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gemini-x", "messages": [*HI, call, result]})
    assert response.status_code == 200, response.text
    assert upstream.seen[0].body["contents"][2]["parts"][0]["functionResponse"]["response"] == {"content": text}


# --- max_tokens: a positive 32-bit whole number, as OpenAI requires ---------------------------------


def _refused(gateway: Any, upstream: Any, path: str, body: dict[str, Any], code: str) -> dict[str, Any]:
    """POST `body` (OpenAI's format); assert a 400 with `code`, nothing sent upstream, nothing billed."""
    response = gateway.http("POST", path, json=body)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert upstream.seen == [] and _usage_rows(gateway) == 0
    return error


BAD_MAX_TOKENS = [1.5, -1, 0, "5", True, 1e308, 10**30, 2**31]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", BAD_MAX_TOKENS, ids=[repr(v)[:12] for v in BAD_MAX_TOKENS])
def test_a_max_tokens_that_is_not_a_positive_32_bit_integer_gets_a_400(start_gateway, upstream, field, value):
    gateway = start_gateway(PROVIDERS, upstream)
    error = _refused(gateway, upstream, "/v1/chat/completions", {"model": "gpt-x", "messages": HI, field: value}, "invalid_max_tokens")
    assert error["param"] == field


@pytest.mark.parametrize("value", BAD_MAX_TOKENS, ids=[repr(v)[:12] for v in BAD_MAX_TOKENS])
def test_a_bad_max_tokens_on_messages_gets_anthropics_400(start_gateway, upstream, value):
    gateway = start_gateway(PROVIDERS, upstream)
    response = gateway.http("POST", "/v1/messages", json={"model": "claude-x", "max_tokens": value, "messages": HI})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in response.json()["error"]["message"]
    assert upstream.seen == [] and _usage_rows(gateway) == 0


def test_a_31_digit_max_tokens_on_completions_gets_a_400(start_gateway, upstream):
    gateway = start_gateway(PROVIDERS, upstream)
    response = gateway.http("POST", "/v1/completions", content=b'{"model": "echo-1", "prompt": "hi", "max_tokens": ' + b"9" * 31 + b"}")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_max_tokens"


def test_the_largest_max_tokens_is_accepted(start_gateway, upstream):
    gateway = start_gateway(PROVIDERS, upstream)
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": "10000"})
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-x", "messages": HI, "max_tokens": 2**31 - 1})
    assert response.status_code == 200, response.text
    assert upstream.seen[0].body["max_tokens"] == 2**31 - 1


# --- The parts of a request the translators read have the shape they expect -------------------------


@pytest.mark.parametrize("options", ["yes", True, [{"include_usage": True}], 1])
def test_stream_options_that_is_not_an_object_gets_a_400(start_gateway, upstream, options):
    gateway = start_gateway(PROVIDERS, upstream)
    body = {"model": "gpt-x", "messages": HI, "stream": True, "stream_options": options}
    error = _refused(gateway, upstream, "/v1/chat/completions", body, "invalid_stream_options")
    assert error["param"] == "stream_options"


@pytest.mark.parametrize("prompt", [5, True, {"text": "hi"}])
def test_a_completion_prompt_that_is_not_text_or_a_list_gets_a_400(start_gateway, upstream, prompt):
    gateway = start_gateway(PROVIDERS, upstream)
    error = _refused(gateway, upstream, "/v1/completions", {"model": "echo-1", "prompt": prompt}, "invalid_prompt")
    assert error["param"] == "prompt"


@pytest.mark.parametrize("model", ["claude-x", "gemini-x"])
@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": "get_weather"}]}, "messages[0].tool_calls[0].function"),
        ({"role": "assistant", "content": None, "tool_calls": 7}, "messages[0].tool_calls"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}]}, "messages[0].content[0].image_url"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}, "messages[0].content[0].image_url.url"),
        ({"role": "system", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
    ],
    ids=["function-string", "tool-calls-number", "image-url-string", "image-url-number", "text-number"],
)  # fmt: skip
def test_chat_parts_the_translators_read_are_checked(start_gateway, upstream, model, message, param):
    gateway = start_gateway(PROVIDERS, upstream)
    error = _refused(gateway, upstream, "/v1/chat/completions", {"model": model, "messages": [message]}, "invalid_content")
    assert error["param"] == param


@pytest.mark.parametrize("model", ["claude-x", "gemini-x"])
def test_chat_tools_that_are_not_a_list_get_a_400(start_gateway, upstream, model):
    gateway = start_gateway(PROVIDERS, upstream)
    error = _refused(gateway, upstream, "/v1/chat/completions", {"model": model, "messages": HI, "tools": 3}, "invalid_tools")
    assert error["param"] == "tools"


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image", "source": "https://example.com/a.png"},
        {"type": "image", "source": {"type": "url", "url": 5}},
        {"type": "tool_result", "tool_use_id": "t1", "content": 5},
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": 5}]},
        {"type": "text", "text": 5},
    ],
    ids=["source-string", "source-url-number", "tool-result-number", "tool-result-text-number", "text-number"],
)
def test_messages_blocks_the_translator_reads_are_checked(start_gateway, upstream, block):
    gateway = start_gateway(PROVIDERS, upstream)
    body = {"model": "echo-1", "max_tokens": 10, "messages": [{"role": "user", "content": [block]}]}
    response = gateway.http("POST", "/v1/messages", json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": response.json()["error"]["message"]}}
    assert _usage_rows(gateway) == 0


@pytest.mark.parametrize("field", [{"system": [{"type": "text", "text": 5}]}, {"tools": 5}], ids=["system-text-number", "tools-number"])
def test_messages_system_and_tools_are_checked(start_gateway, upstream, field):
    gateway = start_gateway(PROVIDERS, upstream)
    body = {"model": "echo-1", "max_tokens": 10, "messages": HI, **field}
    response = gateway.http("POST", "/v1/messages", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def _scripted_vendors(upstream: Any) -> None:
    upstream.script("p2", anthropic_reply)
    upstream.script("p3", gemini_reply)


text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text")}, optional={"text": json_values}), max_size=2)
chat_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]) | json_values},
    optional={"text": json_values, "image_url": st.fixed_dictionaries({}, optional={"url": st.sampled_from(["data:image/png;base64,QUJD", "https://x/a.png"]) | json_values}) | json_values},
)  # fmt: skip
tool_calls = st.lists(
    st.fixed_dictionaries({"id": json_values, "type": st.just("function")},
                          optional={"function": st.fixed_dictionaries({}, optional={"name": json_values, "arguments": st.sampled_from(["{}", '{"a": 1}', "[", '"\\ud800"']) | json_values}) | json_values}),
    max_size=2,
) | json_values  # fmt: skip
chat_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_values},
    optional={"content": st.lists(chat_parts, max_size=3) | json_values, "tool_calls": tool_calls, "tool_call_id": json_values, "name": json_values},
)
translated_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["claude-x", "gemini-x", "gpt-x", "echo-1"]), "messages": st.lists(chat_message, max_size=3)},
    optional={"stream": st.booleans(), "stream_options": json_values, "max_tokens": json_values, "max_completion_tokens": json_values,
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.just("f")}, optional={"parameters": json_values})}), max_size=2) | json_values,
              "tool_choice": json_values, "stop": json_values},
)  # fmt: skip
blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result"]) | json_values},
    optional={"text": json_values, "input": json_values, "tool_use_id": json_values, "name": json_values, "id": json_values,
              "source": st.fixed_dictionaries({"type": st.sampled_from(["base64", "url"])}, optional={"url": json_values, "data": json_values, "media_type": json_values}) | json_values,
              "content": text_parts | json_values},
)  # fmt: skip
messages_request = st.fixed_dictionaries(
    {"model": st.sampled_from(["claude-x", "gemini-x", "gpt-x", "echo-1"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | json_values}, optional={"content": st.lists(blocks, max_size=3) | json_values}), max_size=3)},
    optional={"max_tokens": st.integers(min_value=1, max_value=100) | json_values, "system": text_parts | json_values, "stream": st.booleans(),
              "tools": st.lists(st.fixed_dictionaries({"name": st.just("f")}, optional={"input_schema": json_values}), max_size=2) | json_values,
              "tool_choice": json_values, "stop_sequences": json_values},
)  # fmt: skip


@pytest.fixture
def fuzz_client(start_gateway, upstream) -> Iterator[httpx.Client]:
    """A user key's client on a gateway in front of every vendor kind, the translating ones scripted."""
    gateway = start_gateway(PROVIDERS, upstream)
    _scripted_vendors(upstream)
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        yield client


def test_fuzzed_chat_requests_for_translating_vendors_never_500(fuzz_client):
    @FUZZ
    @given(body=translated_chat)
    def check(body: dict[str, Any]) -> None:
        _assert_well_formed(fuzz_client.post("/v1/chat/completions", json=body))

    check()


def test_fuzzed_completions_and_embeddings_never_500(fuzz_client):
    fields = {"stream": st.booleans() | json_values, "stream_options": json_values, "max_tokens": json_values}
    odd = st.sampled_from([5, True, 1.5, {"a": 1}, ["hi", 5]]) | json_values
    required = {"model": st.sampled_from(["echo-1", "gpt-x", "claude-x"]), "prompt": odd, "input": odd}

    @FUZZ
    @given(path=st.sampled_from(["/v1/completions", "/v1/embeddings"]), body=st.fixed_dictionaries(required, optional=fields))
    def check(path: str, body: dict[str, Any]) -> None:
        _assert_well_formed(fuzz_client.post(path, json=body))

    check()


def test_fuzzed_messages_requests_never_500(fuzz_client):
    @FUZZ
    @given(body=messages_request)
    def check(body: dict[str, Any]) -> None:
        response = fuzz_client.post("/v1/messages", json=body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["type"] == "error" and response.json()["error"]["type"]

    check()
