"""The vendor side in the web pages (issue #19): the Providers page, its CSV export, the
overview's vendor cost and margin tiles, provider budget alerts. The real app on uvicorn, the
vendors faked by test/servers.py (each answer: 11 prompt and 7 completion tokens)."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import time
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import openai
import pytest

from core.money_format import usd_text
from routes.web_export import PROVIDER_HEADER
from test.conftest import ADMIN_KEY, USER_KEY
from test.servers import fail, openai_like
from test.test_web import Browser

ZONE = "Europe/Berlin"
# cheap: a nano-precise price x 0.8, a budget two requests pass half of; dear: its default
# price; mystery: no vendor price at all (its cost is unknown). backup-chat: dear, then mystery.
VENDOR_CONFIG = f"""
providers:
  - provider: cheap
    base_url: {{fake:p1}}
    api: sk-vendor-cheap
    model: [house-chat]
    preferences: {{cost_price: {{house-chat: '0.123456789,0.2'}}, cost_multiplier: 0.8, monthly_budget: 0.000008}}
  - provider: dear
    base_url: {{fake:p2}}
    api: sk-vendor-dear
    model: [dear-chat, backup-chat]
    preferences: {{cost_price: {{default: '3,4'}}}}
  - provider: mystery
    base_url: {{fake:p3}}
    api: sk-vendor-mystery
    model: [mystery-chat, backup-chat]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
    preferences: {{credits: 10}}
preferences:
  model_price: {{default: '5,10'}}
  timezone: {ZONE}
  alerts: {{thresholds: [0.5]}}
"""
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(gateway, model: str, n: int = 1) -> None:
    client = gateway.client(USER_KEY)
    for _ in range(n):
        client.chat.completions.create(model=model, messages=MESSAGES)


def traffic(gateway, upstream) -> None:
    """Two calls to cheap, one to dear, one to mystery, and a failover from dear to mystery."""
    chat(gateway, "house-chat", 2)
    chat(gateway, "dear-chat")
    chat(gateway, "mystery-chat")
    upstream.script("p2", fail(500))
    chat(gateway, "backup-chat")
    upstream.script("p2", openai_like)


def provider_states(gateway, month: str | None = None) -> dict:
    response = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY, params={"month": month} if month else None)
    assert response.status_code == 200, response.text
    return {p["provider"]: p for p in json.loads(response.text, parse_float=Decimal)["providers"]}


def cell(html: str, css_class: str) -> str:
    """The first `<td class="… css_class">` of some HTML, inner HTML."""
    match = re.search(rf'<td[^>]*class="[^"]*\b{css_class}\b[^"]*"[^>]*>(.*?)</td>', html, re.S)
    assert match, (css_class, html)
    return match.group(1)


def exact(html: str) -> Decimal | None:
    """An amount's exact value as the page gives it (data-usd), None for "unknown"."""
    match = re.search(r'data-usd="([^"]+)"', html)
    if match is None:
        assert "unknown" in html, html
        return None
    return Decimal(match.group(1))


def row_of(page: str, provider: str) -> str:
    return page.split(f'<tr data-provider="{provider}">')[1].split("</tr>")[0]


def section_of(page: str, provider: str) -> str:
    return page.split('<section class="card provider" id="provider-')[1 + ["cheap", "dear", "mystery"].index(provider)].split("</section>")[0]


def ledger_rows(gateway) -> list[tuple]:
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT ts, provider, upstream_model, prompt_tokens, completion_tokens, vendor_cost_nanos, cost_nanos FROM usage").fetchall()


@pytest.fixture
def vendor_web(start_gateway, upstream):
    gateway = start_gateway(VENDOR_CONFIG, upstream)
    traffic(gateway, upstream)
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    return gateway, browser


def test_providers_page_shows_the_apis_figures_per_provider(vendor_web):
    gateway, browser = vendor_web
    page = browser.get("/admin/providers")
    assert page.status_code == 200 and "<h1>Providers" in page.text
    api = provider_states(gateway)
    for name, state in api.items():
        row = row_of(page.text, name)
        assert exact(cell(row, "today")) == state["cost_today"], name
        assert exact(cell(row, "cost")) == state["cost_this_month"], name
        assert exact(cell(row, "billed")) == state["billed_this_month"], name
        assert exact(cell(row, "margin")) == state["margin_this_month"], name
        assert int(cell(row, "requests")) == state["requests_this_month"], name
        assert int(cell(row, "errors")) == state["errors_this_month"], name
        assert f"status {state['status']}" in cell(row, "status-cell"), name
    assert [api[name]["requests_this_month"] for name in ("cheap", "dear", "mystery")] == [2, 1, 2]
    cheap = row_of(page.text, "cheap")  # its budget: the share used, spelled out
    spent = api["cheap"]["cost_this_month"]
    assert f"{usd_text(int(spent * 10**9))} of $0.000008" in cell(cheap, "budget") and f"({api['cheap']['budget_used']} of the budget used)" in cheap
    assert "alert at the budget" in cell(cheap, "budget") and "none" in cell(row_of(page.text, "dear"), "budget")


def test_providers_page_shows_an_unknown_vendor_cost_as_unknown_never_zero(vendor_web):
    gateway, browser = vendor_web
    page = browser.get("/admin/providers").text
    mystery = row_of(page, "mystery")
    assert provider_states(gateway)["mystery"]["cost_this_month"] is None
    for css_class in ("cost", "margin"):
        assert exact(cell(mystery, css_class)) is None and "$0" not in cell(mystery, css_class)
    models = section_of(page, "mystery")
    assert '<tr data-model="mystery-chat">' in models and '<tr data-model="backup-chat">' in models
    assert ">unknown<" in cell(models.split('data-model="backup-chat"')[1], "cost")


def test_providers_page_breaks_each_provider_down_by_model(vendor_web):
    gateway, browser = vendor_web
    page = browser.get("/admin/providers").text
    for name, state in provider_states(gateway).items():
        section = section_of(page, name)
        for model in state["models"]:
            row = section.split(f'<tr data-model="{model["model"]}">')[1].split("</tr>")[0]
            assert int(cell(row, "requests")) == model["requests"]
            assert cell(row, "tokens").startswith(f"{model['prompt_tokens']} / {model['completion_tokens']}")
            assert (exact(cell(row, "cost")), exact(cell(row, "billed")), exact(cell(row, "margin"))) == (model["cost"], model["billed"], model["margin"])
        assert section.count('<rect class="cost"') == section.count('<rect class="billed"') == 30  # the chart: 30 days, two bars a day


def test_providers_page_counts_failovers_and_upstream_errors_since_start(vendor_web, upstream):
    gateway, browser = vendor_web
    upstream.script("p1", fail(500))
    with pytest.raises(openai.APIStatusError):  # cheap alone serves house-chat: the request fails
        chat(gateway, "house-chat")
    page = browser.get("/admin/providers").text
    shown = {name: re.sub(r"<[^>]+>", "", cell(row_of(page, name), "upstream")) for name in ("cheap", "dear", "mystery")}
    assert shown == {"cheap": "0 / 1 / 0", "dear": "1 / 0 / 0", "mystery": "0 / 0 / 0"}  # failovers / upstream errors / busy
    counts = {name: tuple(re.findall(r'<span class="(?:failovers|upstream-errors)">(\d+)</span>', row_of(page, name))) for name in shown}
    assert counts == {"cheap": ("0", "1"), "dear": ("1", "0"), "mystery": ("0", "0")}


def test_providers_page_shows_a_past_month_and_refuses_a_bad_one(vendor_web):
    _, browser = vendor_web
    past = browser.get("/admin/providers?month=2020-02")
    assert past.status_code == 200
    assert '<h1>Providers <span class="muted">2020-02</span>' in past.text
    assert int(cell(row_of(past.text, "cheap"), "requests")) == 0 and "Cost today" not in past.text
    assert 'href="/admin/providers?month=2020-01"' in past.text and 'href="/admin/providers?month=2020-03"' in past.text
    assert "start=2020-02-01&amp;end=2020-02-29" in past.text  # its CSV: the month's days
    assert section_of(past.text, "cheap").count('<rect class="cost"') == 29  # the chart: that month's days
    for bad in ("2020-13", "last", "1969-12"):
        page = browser.get(f"/admin/providers?month={bad}")
        assert page.status_code == 400 and "YYYY-MM" in page.text and 'href="/admin/providers"' in page.text, bad


def test_providers_page_is_for_admins_only(vendor_web):
    gateway, _ = vendor_web
    assert Browser(gateway.url).get("/admin/providers").headers["location"] == "/login"
    holder = Browser(gateway.url)
    holder.login(USER_KEY)
    assert holder.get("/admin/providers").status_code in (302, 303, 403)


def test_providers_csv_has_nano_exact_figures_per_provider_day_and_model(vendor_web):
    gateway, browser = vendor_web
    response = browser.get("/admin/export/providers.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv") and "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    expected: dict[tuple[str, str, str], list] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])
    zone = ZoneInfo(ZONE)
    for ts, provider, model, prompt, completion, vendor_cost, billed in ledger_rows(gateway):
        sums = expected[(datetime.fromtimestamp(ts, zone).date().isoformat(), provider, model)]
        sums[0] += 1
        sums[1] += prompt
        sums[2] += completion
        sums[3] += vendor_cost or 0
        sums[4] += billed
        sums[5] += vendor_cost is None
        sums[6] += billed if vendor_cost is not None else 0
    got = {(r["day"], r["provider"], r["upstream_model"]): r for r in rows}
    assert got.keys() == expected.keys() and len(rows) == len(expected) == 4
    for where, (requests, prompt, completion, cost, billed, unknown, priced_billed) in expected.items():
        row = got[where]
        assert (int(row["requests"]), int(row["prompt_tokens"]), int(row["completion_tokens"])) == (requests, prompt, completion)
        assert Decimal(row["billed_usd"]) * 10**9 == billed and int(row["unknown_cost_requests"]) == unknown
        if unknown == requests:  # no vendor price: empty, not 0
            assert row["vendor_cost_usd"] == row["margin_usd"] == "", where
        else:
            assert Decimal(row["vendor_cost_usd"]) * 10**9 == cost and Decimal(row["margin_usd"]) * 10**9 == priced_billed - cost, where
    cheap = next(r for r in rows if r["provider"] == "cheap")
    assert len(cheap["vendor_cost_usd"].split(".")[1]) == 9  # nano-precise: 2 x (11 x 0.0987654312 + 7 x 0.16) / 1M
    assert Decimal(cheap["vendor_cost_usd"]) == provider_states(gateway)["cheap"]["cost_this_month"]


def test_providers_csv_names_a_formula_like_provider_as_text(vendor_web):
    gateway, browser = vendor_web
    report = {"api_key": USER_KEY, "model": "@SUM(A1)", "prompt_tokens": 1000, "completion_tokens": 10, "provider": "=cmd|'/C calc'!A0"}
    assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report).status_code == 200
    rows = list(csv.DictReader(io.StringIO(browser.get("/admin/export/providers.csv").text)))
    reported = next(r for r in rows if "calc" in r["provider"])
    assert (reported["provider"], reported["upstream_model"]) == ("'=cmd|'/C calc'!A0", "'@SUM(A1)")
    assert reported["vendor_cost_usd"] == "" and reported["unknown_cost_requests"] == "1"  # nobody priced its vendor side


def test_providers_csv_is_admin_only_and_refuses_bad_dates(vendor_web):
    gateway, browser = vendor_web
    assert Browser(gateway.url).get("/admin/export/providers.csv").headers["location"] == "/login"
    holder = Browser(gateway.url)
    holder.login(USER_KEY)
    assert holder.get("/admin/export/providers.csv").status_code in (302, 303, 403)
    for query in ("start=2026-13-01", "start=2030-01-02&end=2030-01-01", "end=9999-12-31", "start=yesterday"):
        assert browser.get(f"/admin/export/providers.csv?{query}").status_code == 400, query
    empty = browser.get("/admin/export/providers.csv?start=2020-01-01&end=2020-01-31")
    assert empty.status_code == 200 and empty.text.splitlines() == [",".join(PROVIDER_HEADER)]


def test_providers_page_links_its_csv(vendor_web):
    _, browser = vendor_web
    page = browser.get("/admin/providers").text
    link = re.search(r'href="(/admin/export/providers\.csv\?[^"]+)"', page).group(1).replace("&amp;", "&")
    today = datetime.now(ZoneInfo(ZONE)).date()
    assert link == f"/admin/export/providers.csv?start={today.replace(day=1)}&end={_month_end(today)}"
    assert browser.get(link).text.count("\n") == 5  # the header and this month's four rows


def _month_end(day):
    following = day.replace(year=day.year + 1, month=1, day=1) if day.month == 12 else day.replace(month=day.month + 1, day=1)
    return following.fromordinal(following.toordinal() - 1)


def test_overview_shows_this_months_vendor_cost_and_margin(vendor_web):
    gateway, browser = vendor_web
    page = browser.get("/admin").text
    api = provider_states(gateway)
    known = [state for state in api.values() if state["cost_this_month"] is not None]
    tile = lambda name: page.split(f'<div class="tile {name}">')[1].split("</div>")[0]  # noqa: E731
    assert exact(tile("vendor-cost")) == sum(state["cost_this_month"] for state in known)
    assert exact(tile("margin")) == sum(state["margin_this_month"] for state in known)
    assert "+ 2 requests of unknown cost" in tile("vendor-cost")  # mystery's two


def test_a_provider_budget_alert_shows_as_the_provider(vendor_web):
    _, browser = vendor_web  # cheap's two calls passed half its budget: alerts at 0.5
    deadline = time.monotonic() + 10
    while "monthly budget crossed" not in (overview := browser.get("/admin").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    for page in (overview, browser.get("/admin/providers").text):
        alerts = page.split("<h2>Alerts</h2>")[1].split("</table>")[0]
        text = " ".join(re.sub(r"<[^>]+>", " ", alerts).split())
        assert "provider cheap provider monthly budget crossed 50% (" in text and "of $0.000008)" in text, text
        assert '<a href="/admin/providers">provider cheap</a>' in alerts and "(removed)" not in alerts
