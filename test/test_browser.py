"""A real browser (headless Chromium via Playwright) logs in, tops up a key and sees it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest

from test.conftest import ADMIN_KEY
from test.test_web import ACCOUNT_CONFIG, ACME_KEY, CONFIG, COUNT_KEY, key_id

SCREENSHOTS = Path(os.environ.get("TOLLGATE_SCREENSHOTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run should have installed it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def browser_page(browser):
    return browser.new_page(viewport={"width": 1280, "height": 900})


def logged_in(browser, url: str, width: int, key: str = ADMIN_KEY):
    """A page of `width` CSS pixels, logged in with `key` through the form."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(f"{url}/login")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin" if key == ADMIN_KEY else "**/usage")
    return page


def overflow(page, selector: str) -> int:
    """How many pixels the element's content is wider than the element (0: it fits)."""
    return page.evaluate(f"(() => {{ const e = document.querySelector({selector!r}); return e.scrollWidth - e.clientWidth; }})()")


def lines(page, selector: str) -> int:
    """How many lines of text the element takes."""
    script = "const r = document.createRange(); r.selectNodeContents(document.querySelector(%r)); return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size;"
    return page.evaluate(f"(() => {{ {script % selector} }})()")


def test_admin_adds_count_credits_in_the_browser(start_gateway, browser_page):
    gateway = start_gateway(CONFIG)
    gateway.client(COUNT_KEY).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}])
    page = browser_page
    page.goto(f"{gateway.url}/")
    page.fill("#api_key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    page.click("text=Billing")
    row = page.locator(f'tr[data-key="{key_id(COUNT_KEY)}"]')
    assert row.locator("td.count .value").inner_text() == "9"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "billing-tab.png"), full_page=True)

    row.locator("summary").click()
    row.locator('input[aria-label="Count credits to add"]').fill("5")
    row.locator("text=Add count credits").click()
    page.wait_for_url("**done=count_credits_added**")
    assert page.locator(".flash").inner_text() == "Count credits added."
    assert page.locator(f'tr[data-key="{key_id(COUNT_KEY)}"] td.count .value').inner_text() == "14"
    states = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]
    assert states[COUNT_KEY]["remaining_count_credits"] == 14

    page.click("text=bob")
    page.wait_for_url(f"**/admin/keys/{key_id(COUNT_KEY)}")
    assert "5 count credits" in page.locator("text=Credit grants").locator("..").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "key-detail.png"), full_page=True)
    assert (SCREENSHOTS / "billing-tab.png").stat().st_size > 10_000


def test_audit_log_fits_its_card_at_laptop_width(start_gateway, browser):
    gateway = start_gateway(CONFIG)
    gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": COUNT_KEY, "amount": "4.99", "reason": "a long reason " * 3})
    page = logged_in(browser, gateway.url, 1366)
    page.goto(f"{gateway.url}/admin/audit")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "audit-1366.png"), full_page=True)
    assert overflow(page, "html") == 0
    assert page.evaluate(
        "document.querySelector('table.audit').getBoundingClientRect().right <= document.querySelector('table.audit').closest('.card').getBoundingClientRect().right"
    )
    assert lines(page, "table.audit td.time") == 1


def test_key_page_fits_a_phone_screen(start_gateway, browser):
    limits = (
        "count_credits: 10, quota: 2000000, rate_limit: '60/min,1000/day', token_rate_limit: 100000/min, concurrency_limit: 5, daily_cost_limit: 5, budget: 100"
    )
    gateway = start_gateway(CONFIG.replace("count_credits: 10", limits))
    gateway.client(COUNT_KEY).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}])
    page = logged_in(browser, gateway.url, 390)
    page.goto(f"{gateway.url}/admin/keys/{key_id(COUNT_KEY)}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "key-detail-390.png"), full_page=True)
    assert overflow(page, "html") == 0
    limits_table = page.locator("section.card", has=page.locator("h2", has_text="Limits")).locator("table")
    box, card = limits_table.bounding_box(), page.locator("section.card", has=page.locator("h2", has_text="Limits")).bounding_box()
    assert box["x"] >= card["x"] and box["x"] + box["width"] <= card["x"] + card["width"], (box, card)
    assert limits_table.evaluate("t => t.scrollWidth <= t.clientWidth")
    assert page.locator("text=$100.00").first.is_visible()


def test_opening_manage_leaves_the_billing_columns_in_place(start_gateway, browser):
    gateway = start_gateway(CONFIG)
    page = logged_in(browser, gateway.url, 1366)
    page.goto(f"{gateway.url}/admin/keys")
    widths = "[...document.querySelectorAll('table.keys th, table.keys td')].map(cell => Math.round(cell.getBoundingClientRect().width))"
    closed = page.evaluate(widths)
    page.locator(f'tr[data-key="{key_id(COUNT_KEY)}"] summary').click()
    assert page.locator(f'tr[data-key="{key_id(COUNT_KEY)}"] input[aria-label="Count credits to add"]').is_visible()
    assert page.evaluate(widths) == closed
    assert overflow(page, "html") == 0


def test_admin_makes_rotates_and_deletes_a_key_in_the_browser(start_gateway, browser):
    gateway = start_gateway(CONFIG)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(f"{gateway.url}/login")
    page.fill("#api_key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    page.click("text=Billing")
    page.click("details.new-key summary")
    form = page.locator("details.new-key form")
    form.locator('input[name="name"]').fill("browser-bot")
    form.locator('input[name="credits"]').fill("50")
    form.locator('input[name="quota"]').fill("100000")
    form.locator('input[name="rate_limit"]').fill("60/min")
    form.locator('input[name="model"]').fill("echo-1")
    form.locator("button[type=submit]").click()
    secret = page.locator("#secret").inner_text()
    assert secret.startswith("sk-")
    page.locator("button[data-copy]").click()  # copy.js ran: the page's policy lets our own script run
    assert page.evaluate("navigator.clipboard.readText()") == secret
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "key-secret.png"), full_page=True)
    assert gateway.client(secret).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}]).choices

    page.click("text=Go to the key")
    page.wait_for_url("**/admin/keys/key_*")
    assert secret not in page.content() and "browser-bot" in page.locator("h1").inner_text()
    page.click("button:has-text('Rotate secret')")
    rotated = page.locator("#secret").inner_text()
    assert rotated != secret
    with pytest.raises(openai.AuthenticationError):
        gateway.client(secret).models.list()
    assert gateway.client(rotated).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}]).choices

    page.click("text=Go to the key")
    page.click("a.button.danger")
    page.wait_for_url("**/delete")
    page.click("button.danger")  # the box is not ticked: the browser does not send the form
    assert page.url.endswith("/delete")
    page.check('input[name="confirm"]')
    page.click("button.danger")
    page.wait_for_url("**done=key_deleted")
    assert page.locator("h1 .status").inner_text() == "deleted"
    with pytest.raises(openai.AuthenticationError):
        gateway.client(rotated).models.list()
    page.click("text=Billing")
    row = page.locator("tr.deleted", has_text="browser-bot")
    assert row.locator(".status").inner_text() == "deleted"
    page.screenshot(path=str(SCREENSHOTS / "billing-tab-deleted.png"), full_page=True)
    context.close()


def test_admin_tops_up_an_account_in_the_browser(start_gateway, browser_page):
    gateway = start_gateway(ACCOUNT_CONFIG)
    gateway.client(ACME_KEY).chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}])
    page = browser_page
    page.goto(f"{gateway.url}/login")
    page.fill("#api_key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    page.click("nav >> text=Accounts")
    page.wait_for_url("**/admin/accounts")
    assert page.locator('tr[data-account="acme"] td.count .value').inner_text() == "9"
    assert page.locator('tr[data-account="acme"] td.keys').inner_text() == "1"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "accounts-tab.png"), full_page=True)

    page.click('tr[data-account="acme"] >> text=acme')
    page.wait_for_url("**/admin/accounts/acme")
    assert page.locator(".tile.count .value").inner_text() == "9"
    page.select_option('select[name="kind"]', "count_credits")
    page.fill('input[name="amount"]', "5")
    page.fill('input[name="reason"]', "browser invoice")
    page.click("text=Add to the account")
    page.wait_for_url("**done=count_credits_added**")
    assert page.locator(".flash").inner_text() == "Count credits added."
    assert page.locator(".tile.count .value").inner_text() == "14"
    assert "browser invoice" in page.locator("section.card", has=page.locator("h2", has_text="Credit grants")).inner_text()
    assert gateway.http("GET", "/v1/accounts/acme", key=ADMIN_KEY).json()["state"]["remaining_count_credits"] == 14
    assert overflow(page, "html") == 0
    page.screenshot(path=str(SCREENSHOTS / "account-detail.png"), full_page=True)

    page.click(f'tr[data-key="{key_id(ACME_KEY)}"] >> text=carol')  # its key, on the account's balance
    page.wait_for_url(f"**/admin/keys/{key_id(ACME_KEY)}")
    assert page.locator(".tile", has_text="Count credits left").locator(".value").inner_text() == "14"
    assert page.locator("p.account a").inner_text() == "acme"

    page.click("nav >> text=Accounts")  # and a new account, through its form
    page.click("details.new-account summary")
    form = page.locator("details.new-account form")
    form.locator('input[name="name"]').fill("browser-team")
    form.locator('input[name="credits"]').fill("5")
    form.locator('input[type="checkbox"][name="self_service_keys"]').check()
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/admin/accounts/browser-team?done=account_created")
    assert page.locator(".tile.credits .value").inner_text() == "$5.00"
    assert gateway.http("GET", "/v1/accounts/browser-team", key=ADMIN_KEY).json()["preferences"] == {"credits": 5, "self_service_keys": True}


def test_providers_page_shows_each_providers_exact_figures_in_the_browser(start_gateway, upstream, browser):
    from decimal import Decimal

    from core.money_format import usd_text
    from test.test_web_providers import VENDOR_CONFIG, provider_states, traffic

    gateway = start_gateway(VENDOR_CONFIG, upstream)
    traffic(gateway, upstream)  # cheap and dear: different cost_price; mystery: none (unknown cost)
    page = logged_in(browser, gateway.url, 1366)
    page.click("nav >> text=Providers")
    page.wait_for_url("**/admin/providers")
    api = provider_states(gateway)
    assert api["cheap"]["cost_this_month"] != api["dear"]["cost_this_month"]
    for name, state in api.items():
        row = page.locator(f'tr[data-provider="{name}"]')
        for css_class, field in (("today", "cost_today"), ("cost", "cost_this_month"), ("billed", "billed_this_month"), ("margin", "margin_this_month")):
            amount = row.locator(f"td.{css_class} .usd")
            if state[field] is None:
                assert amount.inner_text() == "unknown", (name, field)
            else:
                assert amount.inner_text() == usd_text(int(state[field] * 10**9)), (name, field)
                assert Decimal(amount.get_attribute("data-usd")) == state[field], (name, field)
        assert int(row.locator("td.requests").inner_text()) == state["requests_this_month"]
        assert row.locator(".status").inner_text() == state["status"]
    budget = page.locator('tr[data-provider="cheap"] td.budget')
    assert budget.locator("rect.fill").get_attribute("width") == str(round(Decimal(api["cheap"]["budget_used"]) * 100))
    assert page.locator('tr[data-provider="dear"] .failovers').inner_text() == "1"
    chart = page.locator('section[data-provider="dear"] figure.chart svg')
    assert chart.locator("rect.cost").count() == 30 and chart.is_visible()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "providers.png"), full_page=True)
    assert overflow(page, "html") == 0 and overflow(page, "table.providers") == 0
    assert page.evaluate(
        "document.querySelector('table.providers').getBoundingClientRect().right <= document.querySelector('table.providers').closest('.card').getBoundingClientRect().right"
    )

    page.click("text=← ")  # the month before: nothing yet, and no 500
    assert page.locator('tr[data-provider="cheap"] td.requests').inner_text() == "0"
    page.goto(f"{gateway.url}/admin/providers?month=2026-13")
    assert "YYYY-MM" in page.locator("main").inner_text()
