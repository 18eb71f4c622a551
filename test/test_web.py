"""The web pages through the real app: sessions, CSRF, access rules, actions, CSV."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
from decimal import Decimal
from urllib.parse import urlencode

import httpx
import pytest

from core.keys.index import mask_key
from core.money_format import usd_text
from test.conftest import ADMIN_KEY
from test.conftest import USER_KEY as CONFTEST_USER_KEY

USER_KEY = "sk-web-user-0001"
OTHER_KEY = "sk-web-other-0002"
COUNT_KEY = "sk-web-count-0003"
MESSAGES = [{"role": "user", "content": "hello there"}]

CONFIG = f"""
# web test config
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 10}}
  - api: {OTHER_KEY}
    name: mallory-secret-name
    preferences: {{billing_mode: token, credits: 3}}
  - api: {COUNT_KEY}
    name: bob
    preferences: {{billing_mode: count, count_credits: 10}}
preferences:
  model_price:
    echo-1: 1000,2000
"""


def key_id(secret: str) -> str:
    from core.config import ledger_id

    return ledger_id(secret)


class Browser:
    """A cookie-keeping HTTP client that logs in through the form, like a person would."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=10)

    def csrf_from(self, html: str) -> str:
        match = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert match, "page has no CSRF token"
        return match.group(1)

    def login(self, key: str) -> httpx.Response:
        page = self.http.get("/login")
        return self.http.post("/login", data={"csrf_token": self.csrf_from(page.text), "api_key": key})

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def submit(self, page_path: str, action: str, **fields: str) -> httpx.Response:
        """Load a page, then post one of its forms with the page's CSRF token."""
        page = self.http.get(page_path)
        assert page.status_code == 200, page.text
        return self.http.post(action, data={"csrf_token": self.csrf_from(page.text), **fields})


@pytest.fixture
def web(start_gateway):
    gateway = start_gateway(CONFIG)
    return gateway, Browser(gateway.url)


def chat(gateway, key: str, n: int = 1) -> None:
    client = gateway.client(key)
    for _ in range(n):
        client.chat.completions.create(model="echo-1", messages=MESSAGES)


def states(gateway) -> dict:
    return gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]


def test_root_sends_visitors_to_login_then_to_their_page(web):
    gateway, browser = web
    assert browser.get("/").headers["location"] == "/login"
    assert browser.login(ADMIN_KEY).headers["location"] == "/admin"
    assert browser.get("/").headers["location"] == "/admin"
    user = Browser(gateway.url)
    assert user.login(USER_KEY).headers["location"] == "/usage"
    assert user.get("/").headers["location"] == "/usage"


def test_session_cookie_is_signed_httponly_and_samesite_strict(web):
    gateway, browser = web
    response = browser.login(USER_KEY)
    cookie = response.headers["set-cookie"]
    assert "tollgate_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert USER_KEY not in cookie
    value = browser.http.cookies["tollgate_session"]
    forged = Browser(gateway.url)
    payload, _, signature = value.partition(".")
    forged.http.cookies.set("tollgate_session", payload + "." + signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB"))
    assert forged.get("/usage").headers["location"] == "/login"


def test_wrong_key_gets_a_polite_error_after_a_delay(web):
    _, browser = web
    start = time.monotonic()
    response = browser.login("sk-not-a-key")
    assert time.monotonic() - start >= 0.5
    assert response.status_code == 401
    assert "That key is not valid" in response.text and "Traceback" not in response.text


def test_login_without_the_csrf_token_is_refused(web):
    _, browser = web
    browser.get("/login")
    response = browser.http.post("/login", data={"api_key": ADMIN_KEY})
    assert response.status_code == 403
    assert "tollgate_session" not in response.headers.get("set-cookie", "")


def test_logout_ends_the_session_and_needs_csrf(web):
    _, browser = web
    browser.login(ADMIN_KEY)
    assert browser.http.post("/logout", data={}).status_code == 403
    assert browser.get("/admin").status_code == 200
    assert browser.submit("/admin", "/logout").headers["location"] == "/login"
    assert browser.get("/admin").headers["location"] == "/login"


def test_key_holder_cannot_reach_admin_pages_or_other_keys(web):
    gateway, browser = web
    browser.login(USER_KEY)
    for path in ("/admin", "/admin/keys", f"/admin/keys/{key_id(OTHER_KEY)}", "/admin/export/keys.csv", "/admin/export/requests.csv",
                 f"/usage/export/requests.csv?key={key_id(OTHER_KEY)}"):  # fmt: skip
        assert browser.get(path).status_code == 403, path
    page = browser.http.post(f"/admin/keys/{key_id(OTHER_KEY)}/add_credits", data={"amount": "5"})
    assert page.status_code == 403
    assert states(gateway)[OTHER_KEY]["remaining_credits"] == 3


def test_usage_page_shows_only_the_visitors_key(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 2)
    chat(gateway, OTHER_KEY, 1)
    browser.login(USER_KEY)
    page = browser.get("/usage").text
    assert "alice" in page and "mallory-secret-name" not in page
    log = page.split("Recent requests")[1].split("</table>")[0]
    assert log.count("<td>echo-1</td>") == 2  # two log rows: the other key's request is not shown
    own = browser.get(f"/admin/keys/{key_id(USER_KEY)}")
    assert own.status_code == 200 and "mallory" not in own.text


def test_page_numbers_agree_with_the_api(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 3)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/keys").text
    remaining = Decimal(str(states(gateway)[USER_KEY]["remaining_credits"]))
    row = page[page.index(f'data-key="{key_id(USER_KEY)}"') :].split("</tr>")[0]
    assert usd_text(int(remaining * 10**9)) in row
    detail = browser.get(f"/admin/keys/{key_id(USER_KEY)}").text
    total = Decimal(str(states(gateway)[USER_KEY]["total_cost"]))
    assert f"3 · {usd_text(int(total * 10**9))}" in detail


def test_add_credits_form_changes_the_ledger_once(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    page_path = f"/admin/keys/{key_id(USER_KEY)}"
    page = browser.get(page_path).text
    token = browser.csrf_from(page)
    nonce = re.search(r'name="idempotency_key" value="([^"]+-usd)"', page).group(1)
    form = {"csrf_token": token, "amount": "2.5", "idempotency_key": nonce, "back": page_path}
    first = browser.http.post(f"{page_path}/add_credits", data=form)
    assert first.headers["location"] == f"{page_path}?done=credits_added"
    assert states(gateway)[USER_KEY]["remaining_credits"] == 12.5
    again = browser.http.post(f"{page_path}/add_credits", data=form)  # the same form submitted twice
    assert again.headers["location"] == f"{page_path}?done=already_applied"
    assert states(gateway)[USER_KEY]["remaining_credits"] == 12.5
    shown = browser.get(first.headers["location"]).text
    assert "Credits added." in shown and "$12.50" in shown and "web top-up" in shown


def test_add_count_credits_and_set_mode_forms(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    assert browser.submit("/admin/keys", f"{path}/add_count_credits", amount="7").status_code == 303
    assert states(gateway)[COUNT_KEY]["remaining_count_credits"] == 17
    response = browser.submit("/admin/keys", f"{path}/billing_mode", billing_mode="hybrid", back="/admin/keys?sort=name")
    assert response.headers["location"] == "/admin/keys?sort=name&done=mode_set"
    assert states(gateway)[COUNT_KEY]["billing_mode"] == "hybrid"
    assert "billing_mode: hybrid" in gateway.config_path.read_text() and "# web test config" in gateway.config_path.read_text()


def test_set_mode_form_on_a_broken_config_says_where_it_is_wrong(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    text = gateway.config_path.read_text().replace("    name: bob\n", "    name bob\n")
    gateway.config_path.write_text(text)
    line = text.splitlines().index("    name bob") + 1
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    response = browser.submit(path, f"{path}/billing_mode", billing_mode="hybrid")
    assert response.headers["location"] == f"{path}?error=config_invalid"
    shown = browser.get(response.headers["location"]).text
    assert f"api.yaml has an error at line {line}, column 5: YAML syntax error: could not find expected" in shown and "; fix it first" in shown
    assert gateway.config_path.read_text() == text


def test_forms_without_csrf_change_nothing(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    response = browser.http.post(f"/admin/keys/{key_id(COUNT_KEY)}/add_count_credits", data={"amount": "7", "csrf_token": "forged"})
    assert response.status_code == 403
    assert states(gateway)[COUNT_KEY]["remaining_count_credits"] == 10


def test_bad_amount_shows_an_error_and_grants_nothing(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    response = browser.submit(path, f"{path}/add_count_credits", amount="1.5")
    assert response.headers["location"].endswith("error=invalid_amount")
    assert "The amount must be a positive number" in browser.get(response.headers["location"]).text
    assert states(gateway)[COUNT_KEY]["remaining_count_credits"] == 10


def test_request_log_csv_matches_the_ledger(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 3)
    chat(gateway, COUNT_KEY, 2)
    browser.login(ADMIN_KEY)
    response = browser.get("/admin/export/requests.csv")
    assert response.headers["content-type"].startswith("text/csv") and "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        ledger = db.execute("SELECT request_id, cost_nanos, status FROM usage ORDER BY ts").fetchall()
    assert [(r["request_id"], Decimal(r["cost_usd"]) * 10**9, r["status"]) for r in rows] == [(rid, Decimal(cost), status) for rid, cost, status in ledger]
    own = Browser(gateway.url)
    own.login(USER_KEY)
    mine = list(csv.DictReader(io.StringIO(own.get("/usage/export/requests.csv").text)))
    assert len(mine) == 3 and {r["key_name"] for r in mine} == {"alice"}


def test_key_summary_csv_matches_the_api(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 2)
    browser.login(ADMIN_KEY)
    rows = {r["key_name"]: r for r in csv.DictReader(io.StringIO(browser.get("/admin/export/keys.csv").text))}
    api = states(gateway)
    assert float(rows["alice"]["cost_usd"]) == api[USER_KEY]["total_cost"]
    assert int(rows["alice"]["requests"]) == api[USER_KEY]["request_count"] == 2
    assert rows["bob"]["requests"] == "0"
    assert USER_KEY not in browser.get("/admin/export/keys.csv").text
    assert browser.get("/admin/export/keys.csv?start=2030-01-02&end=2030-01-01").status_code == 400


def test_csv_exports_name_a_formula_like_key_as_text(start_gateway):
    """A key name someone chose (a self-service holder names their keys) must not run as a formula
    in the admin's spreadsheet: it starts with an apostrophe there."""
    gateway = start_gateway(CONFIG.replace("name: bob", "name: '=HYPERLINK(\"http://evil\")'"))
    chat(gateway, COUNT_KEY, 1)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    requests = list(csv.DictReader(io.StringIO(browser.get("/admin/export/requests.csv").text)))
    keys = {r["key_id"]: r for r in csv.DictReader(io.StringIO(browser.get("/admin/export/keys.csv").text))}
    assert [r["key_name"] for r in requests] == ['\'=HYPERLINK("http://evil")']
    assert keys[key_id(COUNT_KEY)]["key_name"] == '\'=HYPERLINK("http://evil")' and keys[key_id(USER_KEY)]["key_name"] == "alice"


def test_billing_tab_searches_sorts_and_pages(start_gateway):
    many = "".join(f"  - api: sk-many-{i:04d}-abcdef\n    name: user-{i:04d}\n" for i in range(120))
    gateway = start_gateway(CONFIG.replace("preferences:\n  model_price", "".join(["", many]) + "preferences:\n  model_price", 1))
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    first = browser.get("/admin/keys").text
    assert first.count("<tr data-key") == 50 and "Page 1 of 3" in first
    assert browser.get("/admin/keys?page=3").text.count("<tr data-key") == 24
    found = browser.get("/admin/keys?q=user-007").text
    assert found.count("<tr data-key") == 10
    names = re.findall(r'<td data-label="Name"><a [^>]+>([^<]+)</a>', browser.get("/admin/keys?sort=name&dir=desc").text)
    assert names[0] == "user-0119" and names == sorted(names, reverse=True)
    chat(gateway, USER_KEY, 3)
    chat(gateway, COUNT_KEY, 1)
    states(gateway)  # charges committed
    for sort, first in (("spend", "alice"), ("today", "alice"), ("count", "bob")):
        names = re.findall(r'<td data-label="Name"><a [^>]+>([^<]+)</a>', browser.get(f"/admin/keys?sort={sort}&dir=desc").text)
        assert names[0] == first, (sort, names[:3])


def test_overview_shows_totals_and_a_reload_error_banner(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 2)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin").text
    assert "Requests today" in page and ">2<" in page.replace(" ", "")
    assert "failed to reload" not in page
    gateway.rewrite_config(CONFIG + "bogus: 1\n")
    page = browser.get("/admin").text
    assert "failed to reload" in page and "unknown key &#39;bogus&#39;" in page


def test_pages_escape_names(start_gateway):
    gateway = start_gateway(CONFIG.replace("name: bob", "name: '<script>alert(1)</script>'"))
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/keys").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_a_key_disabled_after_login_loses_its_pages(web):
    gateway, browser = web
    browser.login(USER_KEY)
    assert browser.get("/usage").status_code == 200
    gateway.rewrite_config(
        CONFIG.replace(
            "name: alice\n    preferences: {billing_mode: token, credits: 10}",
            "name: alice\n    preferences: {billing_mode: token, credits: 10, enabled: false}",
        )
    )
    page = browser.get("/usage")
    assert page.status_code == 403 and "disabled" in page.text
    assert Browser(gateway.url).login(USER_KEY).status_code == 403


def test_allowed_clients_limits_api_calls_not_the_holders_own_pages(start_gateway):
    """allowed_clients names the programs that may call the API; a browser is not one of them,
    and logging in to read one's own usage is not an API call."""
    gateway = start_gateway(CONFIG.replace("credits: 10}", "credits: 10, allowed_clients: ['my-app/*']}"))
    browser = Browser(gateway.url)
    assert browser.login(USER_KEY).headers["location"] == "/usage"
    assert browser.get("/usage").status_code == 200
    refused = gateway.http("GET", "/v1/models", key=USER_KEY, headers={"User-Agent": "Mozilla/5.0"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "client_not_allowed"
    assert gateway.http("GET", "/v1/models", key=USER_KEY, headers={"User-Agent": "my-app/1.0"}).status_code == 200


@pytest.mark.parametrize(
    ("nanos", "shown"),
    [
        (None, "unlimited"),
        (0, "$0.00"),
        (5_000_000_000, "$5.00"),
        (12_500_000_000, "$12.50"),
        (4_003_108_500, "$4.0031"),
        (14_999_944_500, "$14.9999"),
        (14_999_950_000, "$15.00"),
        (1_234_567_890_000, "$1,234.5679"),
        (10_000_000, "$0.01"),
        (2_000_000, "$0.002"),
        (200_000, "$0.0002"),
        (36_500, "$0.0000365"),
        (17, "<$0.0000001"),
        (-2_000_000_000, "-$2.00"),
        (-1_500_000_000_000, "-$1,500.00"),
    ],
)
def test_money_filter_formats_usd_one_way(nanos, shown):
    from routes._pages import templates

    assert templates.filters["money"](nanos) == shown


def test_number_filter_separates_thousands():
    from routes._pages import templates

    assert [templates.filters["number"](n) for n in (0, 999, 1000, 2_000_000)] == ["0", "999", "1,000", "2,000,000"]


def test_pages_show_money_and_counts_in_one_format(start_gateway):
    config = CONFIG.replace("count_credits: 10}", "count_credits: 10, quota: 2000000, daily_cost_limit: 5}")
    gateway = start_gateway(config)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    row = browser.get("/admin/keys").text.split(f'data-key="{key_id(USER_KEY)}"')[1].split("</tr>")[0]
    assert "$10.00" in row and "$10.0000" not in row
    detail = browser.get(f"/admin/keys/{key_id(COUNT_KEY)}").text
    limits = detail.split("<h2>Limits</h2>")[1].split("</table>")[0]
    assert "2,000,000" in limits and "$5.00" in limits and "$5.0<" not in limits and "$0.00<" in limits


def page_text(html: str) -> str:
    """The text a reader sees: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_audit_log_shows_each_change_in_words(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 1)
    remaining = Decimal(str(states(gateway)[USER_KEY]["remaining_credits"]))
    assert gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": "5", "reason": "invoice 7"}).status_code == 200
    assert gateway.http("POST", "/v1/add_count_credits", key=ADMIN_KEY, params={"paid_key": COUNT_KEY, "amount": "1500"}).status_code == 200
    assert gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": COUNT_KEY, "billing_mode": "hybrid"}).status_code == 200
    browser.login(ADMIN_KEY)
    rows = [page_text(row) for row in browser.get("/admin/audit").text.split("<tbody>")[1].split("</tr>")[:-1]]
    login, mode, count, credits = rows
    nanos = int(remaining * 10**9)
    assert f"credits {usd_text(nanos)} → {usd_text(nanos + 5 * 10**9)}" in credits and "+$5.00" in credits and "invoice 7" in credits
    assert "count credits 10 → 1,510" in count and "+1,500" in count
    assert "billing mode count → hybrid" in mode
    assert "login" in login and "{" not in " ".join(rows) and "&#34;" not in " ".join(rows)


def test_pages_tell_apart_keys_whose_secrets_look_alike(start_gateway):
    twins = ("sk-team-one-change-me", "sk-team-two-change-me")
    extra = "".join(f"  - api: {secret}\n    name: team\n" for secret in twins)
    gateway = start_gateway(CONFIG.replace("preferences:\n  model_price", extra + "preferences:\n  model_price", 1))
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/keys?q=team").text
    cells = [page_text(cell) for cell in re.findall(r'<td data-label="Key">(.*?)</td>', page, re.S)]
    assert len(cells) == 2 and cells[0] != cells[1], cells
    for secret in twins:
        detail = page_text(browser.get(f"/admin/keys/{key_id(secret)}").text)
        assert key_id(secret)[:8] in detail
    for secret in (*twins, "sk-us-0123456789abcdef0123456789abcdef"):
        shown = mask_key(secret).replace("…", "")
        assert secret.startswith(shown[: len(shown) // 2]) and len(shown) <= len(secret) // 3, (secret, shown)
    assert mask_key("sk-us-0123456789abcdef0123456789abcdef") == "sk-us…cdef"


def bar_class(html: str) -> str:
    return re.search(r'<rect class="fill ([a-z]*)', html).group(1)


def test_bars_turn_amber_then_red_as_use_nears_the_limit(start_gateway):
    # one request costs $0.02 at these prices and is one of 50 a minute (2%)
    config = CONFIG.replace("credits: 3}", "credits: 0.021}").replace("count_credits: 10}", "count_credits: 10, rate_limit: 50/min}")
    gateway = start_gateway(config + "  reserve_completion_tokens: 5\n")
    chat(gateway, OTHER_KEY, 1)  # 95% of its credits used
    chat(gateway, COUNT_KEY, 2)  # 20% of its count credits, 4% of its rate limit
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    tab = browser.get("/admin/keys").text
    row = lambda secret: tab.split(f'data-key="{key_id(secret)}"')[1].split("</tr>")[0]  # noqa: E731
    assert bar_class(row(USER_KEY).split('class="credits"')[1]) == "ok"
    assert bar_class(row(OTHER_KEY).split('class="credits"')[1]) == "bad"
    assert bar_class(row(COUNT_KEY).split('class="count"')[1]) == "ok"
    limits = browser.get(f"/admin/keys/{key_id(COUNT_KEY)}").text.split("<h2>Limits</h2>")[1].split("</table>")[0]
    assert "4%" in limits and bar_class(limits) == "ok"
    chat(gateway, COUNT_KEY, 6)  # 80% of its count credits
    assert bar_class(browser.get("/admin/keys").text.split(f'data-key="{key_id(COUNT_KEY)}"')[1].split('class="count"')[1]) == "warn"


def test_every_admin_page_shows_the_config_error_banner(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    pages = ["/admin", "/admin/keys", f"/admin/keys/{key_id(USER_KEY)}", "/admin/audit"]
    assert not any("failed to reload" in browser.get(path).text for path in pages)
    gateway.rewrite_config(CONFIG + "bogus: 1\n")
    for path in pages:
        assert "api.yaml failed to reload" in browser.get(path).text, path
    user = Browser(gateway.url)
    user.login(USER_KEY)
    assert "failed to reload" not in user.get("/usage").text  # the config is the operator's business


def test_admin_pages_list_the_configs_warnings(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    assert "warning" not in browser.get("/admin").text
    gateway.rewrite_config(CONFIG.replace("    model: [echo-1]\n", "    model: [echo-1]\n    notes: https://vendor.example/docs\n", 1))
    page = browser.get("/admin").text
    assert "api.yaml loads with 1 warning<" in page
    assert f"{gateway.config_path}:7:5: uni-api option &#39;notes&#39; is not supported and is ignored" in page
    user = Browser(gateway.url)
    user.login(USER_KEY)
    assert "uni-api option" not in user.get("/usage").text  # the config is the operator's business


def test_not_found_page_offers_a_way_back(web):
    gateway, browser = web
    anonymous = Browser(gateway.url).get("/no-such-page")
    assert anonymous.status_code == 404 and 'href="/login"' in anonymous.text
    browser.login(ADMIN_KEY)
    for path in ("/no-such-page", "/admin/keys/0000"):
        page = browser.get(path)
        assert page.status_code == 404, path
        for link in ("/admin", "/admin/keys", "/admin/accounts", "/admin/audit"):
            assert f'href="{link}"' in page.text, (path, link)
    user = Browser(gateway.url)
    user.login(USER_KEY)
    assert 'href="/usage"' in user.get("/no-such-page").text


def test_pages_have_a_local_favicon(web):
    _, browser = web
    page = browser.get("/login").text
    href = re.search(r'<link rel="icon" href="([^"]+)"', page).group(1)
    assert href.startswith("/static/")
    for path in (href, "/favicon.ico"):  # browsers also ask for /favicon.ico on their own
        icon = browser.get(path)
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml") and "<svg" in icon.text, path


# --- key management pages (the keys API's code behind forms) ---------------------------------


NEW_KEY = {"name": "ci-bot", "billing_mode": "token", "credits": "2.50", "count_credits": "", "quota": "5000", "quota_type": "tokens",
           "rate_limit": "60/min", "concurrency_limit": "3", "model": "echo-1", "expires_at": "2030-01-01T00:00"}  # fmt: skip


def secret_on(page: httpx.Response) -> str:
    match = re.search(r'<code id="secret">([^<]+)</code>', page.text)
    assert match, page.text
    return match.group(1)


def key_view(gateway, key_id_: str) -> dict:
    response = gateway.http("GET", f"/v1/api_keys/{key_id_}", key=ADMIN_KEY)
    assert response.status_code == 200, response.text
    return response.json()


def create_through_form(browser: Browser, **changes: str) -> httpx.Response:
    page = browser.get("/admin/keys").text
    nonce = re.search(r'name="idempotency_key" value="([^"]+)"', page.split('action="/admin/keys"')[1]).group(1)
    return browser.http.post("/admin/keys", data={"csrf_token": browser.csrf_from(page), "idempotency_key": nonce, **NEW_KEY, **changes})


def test_new_key_form_makes_the_key_and_shows_its_secret_once(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    made = create_through_form(browser)
    assert made.status_code == 200 and "shown this once" in made.text
    assert "script-src 'self'" in made.headers["content-security-policy"] and made.headers["cache-control"] == "no-store"
    secret = secret_on(made)
    assert secret.startswith("sk-") and secret not in made.headers.get("set-cookie", "") and secret not in str(made.url)
    new_id = re.search(r'href="/admin/keys/([^"]+)"', made.text.split('id="secret"')[1]).group(1)
    view = key_view(gateway, new_id)
    assert view["name"] == "ci-bot" and view["defined_in"] == "api" and view["model"] == ["echo-1"]
    assert view["preferences"] == {"billing_mode": "token", "credits": 2.5, "quota": 5000, "quota_type": "tokens", "rate_limit": "60/min",
                                   "concurrency_limit": 3, "expires_at": "2030-01-01T00:00"}  # fmt: skip
    assert gateway.client(secret).chat.completions.create(model="echo-1", messages=MESSAGES).choices
    for path in ("/admin/keys", f"/admin/keys/{new_id}", "/admin/audit", "/admin/audit.csv", "/admin"):
        assert secret not in browser.get(path).text, path
    assert "script-src" not in browser.get(f"/admin/keys/{new_id}").headers["content-security-policy"]


def test_submitting_the_new_key_form_twice_makes_one_key(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/keys").text
    form = {"csrf_token": browser.csrf_from(page), "idempotency_key": "same-form-token", **NEW_KEY}
    first = browser.http.post("/admin/keys", data=form)
    again = browser.http.post("/admin/keys", data=form)  # the secret page reloaded
    assert first.status_code == 200 and again.status_code == 303
    assert again.headers["location"].endswith("?error=key_already_made") and secret_on(first) not in again.text
    shown = browser.get(again.headers["location"]).text
    assert "already submitted" in shown and secret_on(first) not in shown
    names = [k["name"] for k in gateway.http("GET", "/v1/api_keys", key=ADMIN_KEY).json()["data"]]
    assert names.count("ci-bot") == 1


def test_new_key_form_shows_the_validation_error_and_makes_nothing(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    before = gateway.http("GET", "/v1/api_keys", key=ADMIN_KEY).json()["total"]
    refused = create_through_form(browser, quota="-5", name="typo-bot")
    assert refused.status_code == 400
    assert "preferences.quota must be &gt;= 0, got -5" in refused.text and 'name="quota"' in refused.text
    assert re.search(r'name="quota"[^>]*value="-5"[^>]*aria-invalid="true"', refused.text) and 'value="typo-bot"' in refused.text
    unknown = create_through_form(browser, model="echo-1, nope-9")
    assert unknown.status_code == 400 and "nope-9" in unknown.text and 'id="secret"' not in unknown.text
    assert create_through_form(browser, credits="lots").status_code == 400
    assert gateway.http("GET", "/v1/api_keys", key=ADMIN_KEY).json()["total"] == before


def test_key_forms_without_the_csrf_token_change_nothing(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    posts = [("/admin/keys", NEW_KEY), (f"{path}/settings", {"quota": "5"}), (f"{path}/enabled", {"enabled": "false"}),
             (f"{path}/rotate", {}), (f"{path}/delete", {"confirm": "yes"})]  # fmt: skip
    for action, fields in posts:
        for token in ({}, {"csrf_token": "forged"}):
            response = browser.http.post(action, data={**fields, **token})
            assert response.status_code == 403 and "The form expired" in response.text, action
    assert gateway.http("GET", "/v1/api_keys", key=ADMIN_KEY).json()["total"] == 4
    assert key_view(gateway, key_id(COUNT_KEY))["status"] == "active" and key_view(gateway, key_id(COUNT_KEY))["api_changes"] is None
    chat(gateway, COUNT_KEY)  # the secret still works
    user = Browser(gateway.url)
    user.login(USER_KEY)
    assert user.submit("/usage", f"{path}/delete", confirm="yes").status_code == 403  # a token, but not an admin


def test_settings_form_patches_what_changed_and_an_empty_field_removes_it(start_gateway):
    gateway = start_gateway(CONFIG.replace("count_credits: 10}", "count_credits: 10, rate_limit: 100/min}"))
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    page = browser.get(path).text
    shown = dict(re.findall(r'<input name="(\w+)"[^>]*value="([^"]*)"', page.split(f'action="{path}/settings"')[1].split("</form>")[0]))
    assert shown["rate_limit"] == "100/min" and shown["count_credits"] == "10" and shown["quota"] == ""
    form = {**shown, "quota": "2000", "rate_limit": "", "csrf_token": browser.csrf_from(page)}
    saved = browser.http.post(f"{path}/settings", data=form)
    assert saved.headers["location"] == f"{path}?done=key_updated"
    view = key_view(gateway, key_id(COUNT_KEY))
    assert view["api_changes"] == {"preferences": {"quota": 2000, "rate_limit": None}}
    assert view["quota"] == {"type": "tokens", "limit": 2000, "used": 0, "remaining": 2000} and "rate_limit" not in view["preferences"]
    assert "rate_limit" in gateway.config_path.read_text()  # api.yaml is never written by the keys code
    again = browser.http.post(f"{path}/settings", data={**form, "rate_limit": ""})
    assert "done=nothing_changed" in again.headers["location"]
    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert [e["action"] for e in audit].count("update_key") == 1


def test_settings_form_shows_the_error_and_keeps_the_key(web):
    gateway, browser = web
    path = f"/admin/keys/{key_id(USER_KEY)}"
    browser.login(ADMIN_KEY)
    refused = browser.submit(path, f"{path}/settings", rate_limit="lots/min", credits="10")
    assert refused.status_code == 400 and "preferences.rate_limit must look like" in refused.text
    assert re.search(r'name="rate_limit"[^>]*value="lots/min"[^>]*aria-invalid="true"', refused.text)
    assert key_view(gateway, key_id(USER_KEY))["api_changes"] is None
    assert browser.get(f"{path}/settings").status_code == 200


def test_disable_and_enable_buttons_switch_the_key_at_once(web):
    gateway, browser = web
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(USER_KEY)}"
    assert browser.submit(path, f"{path}/enabled", enabled="false").headers["location"] == f"{path}?done=key_disabled"
    with pytest.raises(Exception) as refused:
        chat(gateway, USER_KEY)
    assert getattr(refused.value, "status_code", None) == 403
    page = browser.get(path).text
    assert '<span class="status disabled">disabled</span>' in page and "Enable key" in page
    assert browser.submit(path, f"{path}/enabled", enabled="true").headers["location"] == f"{path}?done=key_enabled"
    chat(gateway, USER_KEY)
    assert browser.submit(path, f"{path}/enabled", enabled="maybe").status_code == 400


def test_rotate_button_shows_the_new_secret_once_and_the_old_one_stops(web):
    gateway, browser = web
    chat(gateway, COUNT_KEY)
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(COUNT_KEY)}"
    rotated = browser.submit(path, f"{path}/rotate", grace_seconds="")
    assert rotated.status_code == 200 and "The previous secret no longer works" in rotated.text
    secret = secret_on(rotated)
    assert gateway.http("GET", "/v1/models", key=COUNT_KEY).status_code == 401
    chat(gateway, secret)
    assert key_view(gateway, key_id(COUNT_KEY))["state"]["remaining_count_credits"] == 8  # the balance stayed with the key
    assert secret not in browser.get(path).text and secret not in browser.get("/admin/audit").text
    graced = browser.submit(path, f"{path}/rotate", grace_seconds="120")
    assert "keeps working until" in graced.text
    assert gateway.http("GET", "/v1/models", key=secret).status_code == 200
    bad = browser.submit(path, f"{path}/rotate", grace_seconds="soon")
    assert bad.status_code == 400 and "grace_seconds" in bad.text


def test_delete_needs_the_confirmation_and_the_history_stays(web):
    gateway, browser = web
    chat(gateway, USER_KEY, 2)
    browser.login(ADMIN_KEY)
    path = f"/admin/keys/{key_id(USER_KEY)}"
    confirm = browser.get(f"{path}/delete")
    assert confirm.status_code == 200 and 'name="confirm"' in confirm.text
    unconfirmed = browser.submit(f"{path}/delete", f"{path}/delete")
    assert unconfirmed.status_code == 400 and "Tick the box" in unconfirmed.text
    chat(gateway, USER_KEY)  # still works
    deleted = browser.submit(f"{path}/delete", f"{path}/delete", confirm="yes")
    assert deleted.headers["location"] == f"{path}?done=key_deleted"
    assert gateway.http("GET", "/v1/models", key=USER_KEY).status_code == 401
    row = browser.get("/admin/keys").text.split(f'data-key="{key_id(USER_KEY)}"')[1].split("</tr>")[0]
    assert 'class="deleted"' in row and '<span class="status deleted">deleted</span>' in row and "Manage" not in row
    detail = browser.get(path)
    assert detail.status_code == 200 and "Deleted 20" in detail.text and "Rotate secret" not in detail.text
    assert detail.text.split("Recent requests")[1].split("</table>")[0].count("<td>echo-1</td>") == 3
    again = browser.submit(path, f"{path}/settings", quota="5")
    assert again.status_code == 409 and "was deleted" in again.text
    assert browser.get(f"{path}/delete").status_code == 409


def test_billing_tab_shows_quota_use_where_keys_are_defined_and_status(start_gateway):
    config = CONFIG.replace("count_credits: 10}", "count_credits: 10, quota: 2000000}").replace("credits: 3}", "credits: 3, quota: 5, quota_type: usd}")
    gateway = start_gateway(config)
    chat(gateway, COUNT_KEY)
    made = gateway.http("POST", "/v1/api_keys", key=ADMIN_KEY, json={"name": "expired-bot", "preferences": {"expires_at": "2020-01-01T00:00:00Z"}})
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    tab = browser.get("/admin/keys").text
    row = lambda id_: page_text(tab.split(f'data-key="{id_}"')[1].split("</tr>")[0])  # noqa: E731
    used = key_view(gateway, key_id(COUNT_KEY))["quota"]["used"]
    assert f"{used} / 2,000,000" in row(key_id(COUNT_KEY)) and f'title="{used} / 2,000,000 tokens used"' in tab and "api.yaml" in row(key_id(COUNT_KEY))
    assert "$0.00 / $5.00" in row(key_id(OTHER_KEY))
    assert "—" in row(key_id(USER_KEY)) and "active" in row(key_id(USER_KEY))
    assert "API" in row(made.json()["id"]) and "expired" in row(made.json()["id"])
    assert bar_class(tab.split(f'data-key="{key_id(COUNT_KEY)}"')[1].split('class="quota"')[1]) == "ok"


@pytest.mark.parametrize(
    ("text", "value"),
    [("10", 10), ("2.50", 2.5), ("0.1", 0.1), ("-1", -1), ("1e3", 1000), ("0.12345678901234567890", "0.12345678901234567890"),
     ("lots", "lots"), ("NaN", "NaN"), ("1e999999", "1e999999")],
)  # fmt: skip
def test_form_numbers_become_exact_json_numbers(text, value):
    """As the keys API gets them from JSON; what no float holds exactly, or is no number,
    stays text for the config reader to read exactly or refuse in its own words."""
    from routes._forms import form_number

    assert form_number(text) == value and type(form_number(text)) is type(value)


def test_audit_log_tells_key_changes_made_in_the_pages_in_words(web):
    _, browser = web
    browser.login(ADMIN_KEY)
    made = create_through_form(browser, rate_limit="", concurrency_limit="", model="", expires_at="")
    path = "/admin/keys/" + re.search(r'href="/admin/keys/([^"]+)"', made.text.split('id="secret"')[1]).group(1)
    browser.submit(path, f"{path}/settings", quota="900", credits="")
    browser.submit(path, f"{path}/rotate", grace_seconds="60")
    browser.submit(f"{path}/delete", f"{path}/delete", confirm="yes")
    rows = [page_text(row) for row in browser.get("/admin/audit").text.split("<tbody>")[1].split("</tr>")[:-1]]
    deleted, rotated, updated, created = rows[:4]
    assert "create_key" in created and "name ci-bot" in created and "preferences.credits 2.5" in created and "preferences.quota 5000" in created
    assert "update_key" in updated and "preferences.quota 5000 → 900" in updated and "preferences.credits removed" in updated
    assert "rotate_key" in rotated and "secret sk-" in rotated and "worked 60 s more" in rotated
    assert "delete_key" in deleted and "status active → deleted" in deleted and f'href="{path}"' in browser.get("/admin/audit").text
    assert "no change" not in " ".join(rows[:4])


# --- the Accounts tab ------------------------------------------------------------------------

ACME_KEY = "sk-web-acme-0004"
ACCOUNTS = """accounts:
  - name: acme
    preferences: {billing_mode: count, count_credits: 10, monthly_cost_limit: 50}
  - name: lab
    preferences: {credits: 2}
"""
ACCOUNT_CONFIG = CONFIG.replace("api_keys:\n", ACCOUNTS + "api_keys:\n", 1).replace(
    "preferences:\n  model_price",
    f"  - api: {ACME_KEY}\n    name: carol\n    account: acme\n    preferences: {{quota: 100000}}\npreferences:\n  model_price",
    1,
)


@pytest.fixture
def accounts_web(start_gateway):
    gateway = start_gateway(ACCOUNT_CONFIG)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    return gateway, browser


def account_view(gateway, name: str) -> dict:
    response = gateway.http("GET", f"/v1/accounts/{name}", key=ADMIN_KEY)
    assert response.status_code == 200, response.text
    return response.json()


def account_cells(html: str, name: str) -> dict[str, str]:
    row = html.split(f'data-account="{name}"')[1].split("</tr>")[0]
    return {label: page_text(cell) for label, cell in re.findall(r'<td data-label="([^"]+)"[^>]*>(.*?)</td>', row, re.S)}


def top_up_form(browser: Browser, name: str) -> dict[str, str]:
    page = browser.get(f"/admin/accounts/{name}").text
    form = page.split(f'action="/admin/accounts/{name}/credits"')[1].split("</form>")[0]
    return {"csrf_token": browser.csrf_from(page), "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', form).group(1)}


def test_accounts_tab_lists_each_account_with_the_apis_figures(accounts_web):
    gateway, browser = accounts_web
    chat(gateway, ACME_KEY, 2)
    overview = browser.get("/admin").text
    assert '<a href="/admin/accounts" >Accounts</a>' in overview
    page = browser.get("/admin/accounts")
    assert page.status_code == 200 and 'class="active">Accounts</a>' in page.text
    acme, lab = account_cells(page.text, "acme"), account_cells(page.text, "lab")
    state = account_view(gateway, "acme")["state"]
    assert acme["Name"] == "acme" and acme["Mode"] == "count" and acme["Status"] == "active"
    assert acme["Count credits left"] == str(state["remaining_count_credits"]) == "8" and acme["Credits left"] == "unlimited"
    assert acme["Spend"] == usd_text(int(Decimal(str(state["total_cost"])) * 10**9)) and acme["Requests"] == str(state["request_count"]) == "2"
    assert acme["Keys"] == "1" and acme["Defined in"] == "api.yaml"
    assert lab["Credits left"] == "$2.00" and lab["Mode"] == "token" and lab["Keys"] == "0" and lab["Requests"] == "0"
    assert 'href="/admin/accounts/acme"' in page.text


def test_account_page_shows_its_balance_settings_limits_and_keys(accounts_web):
    gateway, browser = accounts_web
    chat(gateway, ACME_KEY, 1)
    page = browser.get("/admin/accounts/acme")
    assert page.status_code == 200
    text = page_text(page.text)
    assert "Count credits left 9" in text and "monthly cost limit 50" in text and "defined in api.yaml" in text
    limits = page_text(page.text.split("<h2>Limits (all its keys together)</h2>")[1].split("</table>")[0])
    assert "monthly cost limit" in limits and "$50.00" in limits
    used = key_view(gateway, key_id(ACME_KEY))["quota"]["used"]
    row = page.text.split(f'data-key="{key_id(ACME_KEY)}"')[1].split("</tr>")[0]
    assert f'href="/admin/keys/{key_id(ACME_KEY)}"' in row and f"{used:,} / 100,000" in page_text(row) and 'class="quota"' in row
    assert "No keys draw on this account yet" in browser.get("/admin/accounts/lab").text


def test_account_top_up_form_adds_once_and_is_audited(accounts_web):
    gateway, browser = accounts_web
    form = {**top_up_form(browser, "acme"), "kind": "count_credits", "amount": "5", "reason": "invoice 9"}
    first = browser.http.post("/admin/accounts/acme/credits", data=form)
    assert first.status_code == 303 and first.headers["location"] == "/admin/accounts/acme?done=count_credits_added"
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 15
    assert states(gateway)[ACME_KEY]["remaining_count_credits"] == 15  # its keys spend it
    again = browser.http.post("/admin/accounts/acme/credits", data=form)  # the same form submitted twice
    assert again.headers["location"] == "/admin/accounts/acme?done=already_applied"
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 15
    shown = browser.get(first.headers["location"]).text
    assert "Count credits added." in shown and "Count credits left 15" in page_text(shown) and "invoice 9" in shown
    usd = browser.http.post("/admin/accounts/lab/credits", data={**top_up_form(browser, "lab"), "kind": "credits", "amount": "2.5", "reason": ""})
    assert usd.headers["location"] == "/admin/accounts/lab?done=credits_added"
    assert account_view(gateway, "lab")["state"]["remaining_credits"] == 4.5
    audit = browser.get("/admin/audit").text
    rows = [page_text(row) for row in audit.split("<tbody>")[1].split("</tr>")[:-1]]
    assert "add_credits" in rows[0] and "web top-up" in rows[0] and "add_count_credits" in rows[1] and "invoice 9" in rows[1]
    assert 'href="/admin/accounts/acme">acme</a>' in audit and 'href="/admin/accounts/lab">lab</a>' in audit


def test_account_top_up_without_the_csrf_token_changes_nothing(accounts_web):
    gateway, browser = accounts_web
    for token in ({}, {"csrf_token": "forged"}):
        response = browser.http.post("/admin/accounts/acme/credits", data={"kind": "count_credits", "amount": "5", **token})
        assert response.status_code == 403 and "The form expired" in response.text
    user = Browser(gateway.url)
    user.login(ACME_KEY)
    refused = user.submit("/usage", "/admin/accounts/acme/credits", kind="count_credits", amount="5")  # a token, but not an admin
    assert refused.status_code == 403 and user.get("/admin/accounts").status_code == 403
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 10


def test_account_top_up_with_a_bad_amount_shows_why_and_adds_nothing(accounts_web):
    gateway, browser = accounts_web
    refused = browser.http.post(
        "/admin/accounts/acme/credits", data={**top_up_form(browser, "acme"), "kind": "count_credits", "amount": "1.5", "reason": "typo"}
    )
    assert refused.status_code == 400 and "must be a positive whole number" in refused.text
    assert re.search(r'name="amount"[^>]*value="1.5"[^>]*aria-invalid="true"', refused.text) and 'value="typo"' in refused.text
    assert '<option value="count_credits" selected>' in refused.text
    bogus = browser.http.post("/admin/accounts/acme/credits", data={**top_up_form(browser, "acme"), "kind": "gold", "amount": "1"})
    assert bogus.status_code == 400 and "Unknown credit kind" in bogus.text
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 10


def test_unknown_account_gets_a_404_page(accounts_web):
    _, browser = accounts_web
    page = browser.get("/admin/accounts/nope")
    assert page.status_code == 404 and "No account is named &#39;nope&#39;" in page.text and 'href="/admin/accounts"' in page.text
    posted = browser.http.post("/admin/accounts/nope/credits", data={**top_up_form(browser, "acme"), "kind": "credits", "amount": "1"})
    assert posted.status_code == 404


def test_accounts_made_and_deleted_through_the_api_show_where_and_what_they_are(accounts_web):
    gateway, browser = accounts_web
    made = gateway.http("POST", "/v1/accounts", key=ADMIN_KEY, json={"name": "team", "preferences": {"credits": 4}})
    assert made.status_code == 201, made.text
    assert gateway.http("DELETE", "/v1/accounts/lab", key=ADMIN_KEY).status_code == 200
    page = browser.get("/admin/accounts").text
    team, lab = account_cells(page, "team"), account_cells(page, "lab")
    assert team["Defined in"] == "API" and team["Credits left"] == "$4.00" and team["Status"] == "active"
    assert lab["Status"] == "deleted" and 'data-account="lab" class="deleted"' in page
    deleted = browser.get("/admin/accounts/lab")
    assert deleted.status_code == 200 and "This account was deleted" in deleted.text and "/admin/accounts/lab/credits" not in deleted.text
    refused = browser.http.post("/admin/accounts/lab/credits", data={**top_up_form(browser, "acme"), "kind": "credits", "amount": "1"})
    assert refused.status_code == 409 and "was deleted" in refused.text
    topped = browser.http.post("/admin/accounts/team/credits", data={**top_up_form(browser, "team"), "kind": "credits", "amount": "1"})
    assert topped.headers["location"] == "/admin/accounts/team?done=credits_added"
    assert account_view(gateway, "team")["state"]["remaining_credits"] == 5
    select = browser.get("/admin/keys").text.split('<select name="account"')[1].split("</select>")[0]
    assert re.findall(r'<option value="([^"]*)"', select) == ["", "acme", "team"]  # a deleted account takes no new keys


def test_new_key_form_account_select_makes_a_key_in_the_account(accounts_web):
    gateway, browser = accounts_web
    tab = browser.get("/admin/keys").text
    select = tab.split('<select name="account"')[1].split("</select>")[0]
    assert re.findall(r'<option value="([^"]*)"', select) == ["", "acme", "lab"] and "leave Credits and Count credits empty" in tab
    made = create_through_form(browser, name="acme-bot", account="acme", billing_mode="", credits="", quota="")
    assert made.status_code == 200, made.text
    secret = secret_on(made)
    assert "acme-bot" in [key["name"] for key in account_view(gateway, "acme")["keys"]]
    chat(gateway, secret)
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 9  # the account's count credits, its default mode
    refused = create_through_form(browser, name="rich-bot", account="lab", credits="2.50")
    assert refused.status_code == 400 and "a key in an account draws on the account&#39;s balance; set credits on account &#39;lab&#39;" in refused.text
    assert re.search(r'name="credits"[^>]*aria-invalid="true"', refused.text) and '<option value="lab" selected>' in refused.text
    assert "rich-bot" not in [key["name"] for key in gateway.http("GET", "/v1/api_keys", key=ADMIN_KEY).json()["data"]]


def test_billing_tab_and_key_pages_link_a_keys_account(accounts_web):
    gateway, browser = accounts_web
    tab = browser.get("/admin/keys").text
    row = tab.split(f'data-key="{key_id(ACME_KEY)}"')[1].split("</tr>")[0]
    assert 'href="/admin/accounts/acme"' in row and "in acme" in row
    assert "Top up account acme" in row and "/add_credits" not in row and "/billing_mode" in row  # its credits are the account's
    assert "/add_credits" in tab.split(f'data-key="{key_id(USER_KEY)}"')[1].split("</tr>")[0]
    path = f"/admin/keys/{key_id(ACME_KEY)}"
    detail = browser.get(path).text
    assert 'Draws on the balance of account <a href="/admin/accounts/acme">acme</a>' in detail and "Top up account acme" in detail
    refused = browser.submit(path, f"{path}/add_count_credits", amount="3")  # a stale form: refused, and said why
    assert refused.headers["location"] == f"{path}?error=key_in_account"
    assert "top up the account" in browser.get(refused.headers["location"]).text
    holder = Browser(gateway.url)
    holder.login(ACME_KEY)
    own = holder.get("/usage").text
    assert "Draws on the balance of account acme" in page_text(own) and 'href="/admin/accounts' not in own


# --- making, changing and deleting accounts in the pages ------------------------------------

NEW_ACCOUNT = {"name": "team", "billing_mode": "count", "credits": "", "count_credits": "3", "rate_limit": "60/min",
               "concurrency_limit": "2", "monthly_cost_limit": "40"}  # fmt: skip


def create_account_through_form(browser: Browser, *ticked: str, **changes: str) -> httpx.Response:
    """Posts the Accounts tab's New account form as a browser would; `ticked` is "yes" for a
    ticked self-service box (the box's value comes before its hidden "no")."""
    page = browser.get("/admin/accounts").text
    assert 'action="/admin/accounts"' in page
    fields = [("csrf_token", browser.csrf_from(page)), *{**NEW_ACCOUNT, **changes}.items(), *(("self_service_keys", t) for t in (*ticked, "no"))]
    return browser.http.post("/admin/accounts", content=urlencode(fields), headers={"content-type": "application/x-www-form-urlencoded"})


def edit_form_fields(browser: Browser, name: str) -> dict[str, str]:
    """The account page's edit form as shown: its fields and their values, and the CSRF token."""
    page = browser.get(f"/admin/accounts/{name}").text
    form = page.split(f'action="/admin/accounts/{name}/settings"')[1].split("</form>")[0]
    shown = dict(re.findall(r'<input name="(\w+)"[^>]*value="([^"]*)"', form))
    shown["billing_mode"] = re.search(r'<option value="(\w*)" selected>', form).group(1)
    return {**shown, "csrf_token": browser.csrf_from(page)}


def test_new_account_form_makes_an_account_its_keys_draw_on(accounts_web):
    gateway, browser = accounts_web
    made = create_account_through_form(browser, "yes")
    assert made.status_code == 303 and made.headers["location"] == "/admin/accounts/team?done=account_created"
    view = account_view(gateway, "team")
    assert view["defined_in"] == "api" and view["status"] == "active"
    assert view["preferences"] == {"billing_mode": "count", "count_credits": 3, "rate_limit": "60/min", "concurrency_limit": 2,
                                   "monthly_cost_limit": 40, "self_service_keys": True}  # fmt: skip
    shown = browser.get(made.headers["location"]).text
    assert "Account made and in force" in shown and "Count credits left 3" in page_text(shown)
    key = gateway.http("POST", "/v1/api_keys", key=ADMIN_KEY, json={"name": "team-bot", "account": "team"})
    assert key.status_code == 201, key.text
    assert gateway.client(key.json()["api"]).chat.completions.create(model="echo-1", messages=MESSAGES).choices
    assert account_view(gateway, "team")["state"]["remaining_count_credits"] == 2  # the account's count credits, its mode
    assert account_cells(browser.get("/admin/accounts").text, "team")["Keys"] == "1"
    again = create_account_through_form(browser, "yes")  # the same form sent twice
    assert again.headers["location"] == "/admin/accounts/team?error=account_already_made"
    plain = create_account_through_form(browser, name="solo", billing_mode="", count_credits="", rate_limit="", concurrency_limit="", monthly_cost_limit="")
    assert plain.status_code == 303 and account_view(gateway, "solo")["preferences"] == {}  # unticked, empty: nothing set
    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert [e["action"] for e in audit].count("create_account") == 2


def test_new_account_form_shows_the_validation_error_and_makes_nothing(accounts_web):
    gateway, browser = accounts_web
    refused = create_account_through_form(browser, "yes", credits="-5")
    assert refused.status_code == 400 and "preferences.credits must be &gt;= 0, or -1 for unlimited; got -5" in refused.text
    assert re.search(r'name="credits"[^>]*value="-5"[^>]*aria-invalid="true"', refused.text) and 'value="team"' in refused.text
    assert re.search(r'name="self_service_keys" value="yes" checked', refused.text) and '<option value="count" selected>' in refused.text
    bad_name = create_account_through_form(browser, name="no spaces")
    assert bad_name.status_code == 400 and "must be 1-64 letters" in bad_name.text and re.search(r'name="name"[^>]*aria-invalid="true"', bad_name.text)
    taken = create_account_through_form(browser, name="acme")
    assert taken.status_code == 409 and "An account named &#39;acme&#39; exists or existed" in taken.text
    names = [a["name"] for a in gateway.http("GET", "/v1/accounts", key=ADMIN_KEY).json()["data"]]
    assert names == ["acme", "lab"] and account_view(gateway, "acme")["api_changes"] is None


def test_account_edit_form_changes_credits_at_once_and_patches_only_what_changed(accounts_web):
    gateway, browser = accounts_web
    chat(gateway, ACME_KEY)
    shown = edit_form_fields(browser, "acme")
    assert shown["count_credits"] == "10" and shown["monthly_cost_limit"] == "50" and shown["credits"] == "" and shown["billing_mode"] == "count"
    form = [*{**shown, "count_credits": "20", "monthly_cost_limit": "", "rate_limit": "100/min"}.items(), ("self_service_keys", "yes")]
    headers = {"content-type": "application/x-www-form-urlencoded"}
    saved = browser.http.post("/admin/accounts/acme/settings", content=urlencode(form), headers=headers)
    assert saved.headers["location"] == "/admin/accounts/acme?done=account_updated"
    view = account_view(gateway, "acme")
    assert view["api_changes"] == {"preferences": {"count_credits": 20, "monthly_cost_limit": None, "rate_limit": "100/min", "self_service_keys": True}}
    assert view["state"]["remaining_count_credits"] == 19 and states(gateway)[ACME_KEY]["remaining_count_credits"] == 19  # its key, at once
    chat(gateway, ACME_KEY)
    assert account_view(gateway, "acme")["state"]["remaining_count_credits"] == 18
    assert "Account settings saved" in browser.get(saved.headers["location"]).text
    assert "monthly_cost_limit" in gateway.config_path.read_text()  # api.yaml is never written
    again = edit_form_fields(browser, "acme")
    assert again["count_credits"] == "20" and again["monthly_cost_limit"] == ""
    unticked = browser.http.post("/admin/accounts/acme/settings", data={**again, "count_credits": "20.0", "self_service_keys": "no"})
    assert unticked.headers["location"] == "/admin/accounts/acme?done=account_updated"  # only the box: 20.0 is 20
    assert "self_service_keys" not in account_view(gateway, "acme")["preferences"]
    same = browser.http.post("/admin/accounts/acme/settings", data={**edit_form_fields(browser, "acme"), "self_service_keys": "no"})
    assert same.headers["location"] == "/admin/accounts/acme?done=account_unchanged"
    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert [e["action"] for e in audit].count("update_account") == 2


def test_account_edit_form_shows_the_error_and_changes_nothing(accounts_web):
    gateway, browser = accounts_web
    refused = browser.http.post("/admin/accounts/acme/settings", data={**edit_form_fields(browser, "acme"), "rate_limit": "lots/min", "count_credits": "12"})
    assert refused.status_code == 400 and "preferences.rate_limit must look like" in refused.text
    assert re.search(r'name="rate_limit"[^>]*value="lots/min"[^>]*aria-invalid="true"', refused.text) and 'value="12"' in refused.text
    assert account_view(gateway, "acme")["api_changes"] is None and account_view(gateway, "acme")["state"]["remaining_count_credits"] == 10
    assert browser.get("/admin/accounts/acme/settings").status_code == 200


def test_account_delete_needs_the_confirmation_and_refuses_while_keys_are_in_it(accounts_web):
    gateway, browser = accounts_web
    confirm = browser.get("/admin/accounts/acme/delete")
    assert confirm.status_code == 200 and 'name="confirm"' in confirm.text and f'href="/admin/keys/{key_id(ACME_KEY)}">carol</a>' in confirm.text
    unconfirmed = browser.submit("/admin/accounts/acme/delete", "/admin/accounts/acme/delete")
    assert unconfirmed.status_code == 400 and "Tick the box" in unconfirmed.text
    in_use = browser.submit("/admin/accounts/acme/delete", "/admin/accounts/acme/delete", confirm="yes")
    assert in_use.status_code == 409 and "The account &#39;acme&#39; still has 1 live key(s) (&#39;carol&#39;)" in in_use.text
    assert account_view(gateway, "acme")["status"] == "active"
    chat(gateway, ACME_KEY)  # still works
    deleted = browser.submit("/admin/accounts/lab/delete", "/admin/accounts/lab/delete", confirm="yes")
    assert deleted.headers["location"] == "/admin/accounts/lab?done=account_deleted"
    assert account_view(gateway, "lab")["status"] == "deleted"
    page = browser.get(deleted.headers["location"]).text
    assert "Account deleted" in page and "This account was deleted" in page and "/admin/accounts/lab/delete" not in page and "/settings" not in page
    assert browser.get("/admin/accounts/lab/delete").status_code == 409
    again = browser.submit("/admin/accounts/acme", "/admin/accounts/lab/settings", credits="5")
    assert again.status_code == 409 and "was deleted" in again.text
    audit = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert [e["action"] for e in audit].count("delete_account") == 1


def test_account_forms_without_the_csrf_token_change_nothing(accounts_web):
    gateway, browser = accounts_web
    posts = [("/admin/accounts", NEW_ACCOUNT), ("/admin/accounts/lab/settings", {"credits": "50"}), ("/admin/accounts/lab/delete", {"confirm": "yes"})]
    for action, fields in posts:
        for token in ({}, {"csrf_token": "forged"}):
            response = browser.http.post(action, data={**fields, **token})
            assert response.status_code == 403 and "The form expired" in response.text, action
    holder = Browser(gateway.url)
    holder.login(ACME_KEY)
    for action, fields in posts:
        assert holder.submit("/usage", action, **fields).status_code == 403, action  # a token, but not an admin
    assert [a["name"] for a in gateway.http("GET", "/v1/accounts", key=ADMIN_KEY).json()["data"]] == ["acme", "lab"]
    lab = account_view(gateway, "lab")
    assert lab["status"] == "active" and lab["api_changes"] is None and lab["state"]["remaining_credits"] == 2


# The media endpoints' units: reported through the admin API (priced at their unit prices),
# then shown by the exports and pages next to the tokens, only where they are not zero.
UNITS_CONFIG = CONFIG + "    dall-e-3: {image_price: 0.04}\n    whisper-1: {audio_minute_price: 0.006}\n    tts-1: {character_price: 15}\n"
UNIT_REPORTS = [{"model": "dall-e-3", "images": 3}, {"model": "whisper-1", "audio_ms": 750_000}, {"model": "tts-1", "characters": 2000}]
UNITS_SHOWN = ("3 images", "12.5 min audio", "2,000 characters")


@pytest.fixture
def units_web(start_gateway):
    gateway = start_gateway(UNITS_CONFIG)
    chat(gateway, USER_KEY)
    for body in UNIT_REPORTS:
        assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json={"api_key": USER_KEY, **body}).status_code == 200
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    return gateway, browser


def test_csv_exports_end_with_the_media_units(units_web):
    gateway, browser = units_web
    text = browser.get("/admin/export/requests.csv").text
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert header[:17] == ["time", "request_id", "key_id", "key_name", "model", "provider", "upstream_model", "prompt_tokens", "completion_tokens",
                           "cached_tokens", "cost_type", "unit_prices", "cost_usd", "count_credits", "status", "cache_write_tokens", "reasoning_tokens"]  # fmt: skip
    assert header[17:] == ["images", "audio_minutes", "characters"]
    units = {row[4]: row[17:] for row in rows}
    assert units == {"echo-1": ["0", "0", "0"], "dall-e-3": ["3", "0", "0"], "whisper-1": ["0", "12.5", "0"], "tts-1": ["0", "0", "2000"]}
    summary = {row["key_name"]: row for row in csv.DictReader(io.StringIO(browser.get("/admin/export/keys.csv").text))}
    assert list(summary["alice"])[-4:] == ["images", "audio_minutes", "characters", "cache_write_tokens"]  # added after the units
    assert [summary["alice"][name] for name in ("images", "audio_minutes", "characters")] == ["3", "12.5", "2000"]
    assert [summary["bob"][name] for name in ("images", "audio_minutes", "characters")] == ["0", "0", "0"]
    own = Browser(gateway.url)
    own.login(USER_KEY)
    mine = list(csv.DictReader(io.StringIO(own.get("/usage/export/requests.csv").text)))
    assert sorted(row["audio_minutes"] for row in mine) == ["0", "0", "0", "12.5"]


def test_billing_tab_and_key_pages_show_the_media_units_next_to_the_tokens(units_web):
    gateway, browser = units_web
    tab = browser.get("/admin/keys").text
    alice = tab.split(f'data-key="{key_id(USER_KEY)}"')[1].split("</tr>")[0]
    assert all(f">{shown}<" in alice for shown in UNITS_SHOWN)  # one a line under the month's spend
    other = tab.split(f'data-key="{key_id(OTHER_KEY)}"')[1].split("</tr>")[0]
    assert not any(word in other for word in ("image", "min audio", "character"))
    holder = Browser(gateway.url)
    holder.login(USER_KEY)
    for page in (browser.get(f"/admin/keys/{key_id(USER_KEY)}").text, holder.get("/usage").text):
        text = page_text(page)
        assert "3 images · 12.5 min audio · 2,000 characters" in text  # the totals
        by_model = page_text(page.split("<h2>By model</h2>")[1].split("</table>")[0])
        log = page_text(page.split("<h2>Recent requests</h2>")[1].split("</table>")[0])
        for shown in UNITS_SHOWN:
            assert shown in by_model and shown in log
    plain = page_text(browser.get(f"/admin/keys/{key_id(OTHER_KEY)}").text)
    assert not any(word in plain for word in ("image", "min audio", "character"))


def test_pages_and_csv_exports_show_cache_writes_beside_the_cache_reads(start_gateway, upstream):
    """Two /v1/messages calls (as Claude Code makes them) to Anthropic, each reporting 1,000
    cache reads and 100 cache writes: the key's pages, the Providers page and the exports show
    the cache writes wherever they show the cache reads."""
    import anthropic
    from starlette.responses import JSONResponse

    from test.test_anthropic import CONFIG as ANTHROPIC_CONFIG
    from test.test_anthropic import MESSAGE

    async def anthropic_vendor(body, request):
        return JSONResponse(MESSAGE)

    upstream.script("p1", anthropic_vendor)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=CONFTEST_USER_KEY, max_retries=0)
    for _ in range(2):
        client.messages.create(model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "Weather in Paris?"}])
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    holder = Browser(gateway.url)
    holder.login(CONFTEST_USER_KEY)
    for page in (browser.get(f"/admin/keys/{key_id(CONFTEST_USER_KEY)}").text, holder.get("/usage").text):
        by_model = page.split("<h2>By model</h2>")[1].split("</table>")[0]
        header = re.findall(r"<th[^>]*>([^<]*)</th>", by_model)
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", by_model)
        assert dict(zip(header, cells, strict=False))["Cached"] == "2,000"
        assert dict(zip(header, cells, strict=False))["Cache writes"] == "200"
        log = page_text(page.split("<h2>Recent requests</h2>")[1].split("</table>")[0])
        assert log.count("1,125 / 15 (1,000 cached, 100 cache writes)") == 2
    providers = page_text(browser.get("/admin/providers").text.split('<tr data-model="claude-3-5-sonnet-20241022">')[1].split("</tr>")[0])
    assert "2,250 / 30 (2,000 cached, 200 cache writes)" in providers
    requests = list(csv.DictReader(io.StringIO(browser.get("/admin/export/requests.csv").text)))
    assert [(row["cached_tokens"], row["cache_write_tokens"]) for row in requests] == [("1000", "100")] * 2
    keys = {row["key_id"]: row for row in csv.DictReader(io.StringIO(browser.get("/admin/export/keys.csv").text))}
    assert (keys[key_id(CONFTEST_USER_KEY)]["cached_tokens"], keys[key_id(CONFTEST_USER_KEY)]["cache_write_tokens"]) == ("2000", "200")
    assert keys[key_id(ADMIN_KEY)]["cache_write_tokens"] == "0"
    (vendor,) = csv.DictReader(io.StringIO(browser.get("/admin/export/providers.csv").text))
    assert (vendor["cached_tokens"], vendor["cache_write_tokens"]) == ("2000", "200")


def test_audit_log_tells_the_media_units_a_usage_report_billed(units_web):
    gateway, browser = units_web
    audit = page_text(browser.get("/admin/audit").text)
    assert "dall-e-3 via external: 0 + 0 tokens, 3 images, $0.12" in audit
    assert "whisper-1 via external: 0 + 0 tokens, 12.5 min audio, $0.075" in audit
    detail = [json.loads(e["detail"]) for e in gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"] if e["action"] == "report_usage"]
    assert sorted(d.get("images", 0) for d in detail) == [0, 0, 3]


def test_the_prices_page_shows_each_models_price_and_its_source(web):
    gateway, browser = web
    browser.login(USER_KEY)
    assert browser.get("/admin/prices").status_code in (302, 303, 403)  # admins only
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/prices")
    assert page.status_code == 200
    row = re.search(r"<tr>\s*<td>echo-1</td><td>echo</td><td>echo-1</td>(.*?)</tr>", page.text, re.S)
    assert row, page.text
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    assert cells[:2] == ["1000", "2000"] and cells[-2].startswith("config") and "model_price.echo-1" in cells[-2]
    assert "unknown" in cells[-1]  # no cost_price for echo, and the catalog does not list it: the vendor's price is not known
