"""The web pages: login, admin overview and billing tab, key detail, the key holder's usage
(key management: routes/web_keys.py; accounts: routes/web_accounts.py, routes/web_account_admin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core import admin_actions, reports, statements
from core.alerts import recent_alerts
from core.audit import LOGIN, Actor, AuditEntry
from core.config import ApiKey, Config
from core.config.reload import ConfigStore
from core.errors import GatewayError, forbidden, not_found
from core.ledger import COUNT_CREDITS, CREDITS, Ledger
from core.ledger.postgres import PgLedger
from core.ledger.sums import Window
from core.vendors.states import month_totals
from routes import web_account_admin, web_accounts, web_export, web_keys, web_providers
from routes._http import caller_ip, current_config, whole_number
from routes._pages import WEB, flash_message, read_form, redirect, render
from routes._session import LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_SECONDS, Session, csrf_matches, new_session, set_cookie
from routes._web_auth import LoginRequired, admin_visitor, check_page_access, signer, visitor
from routes.key_forms import DEFAULTS, settings_values
from routes.usage_keys import account_keys_section
from routes.web_providers import money_cells
from routes.web_views import MESSAGES, alert_rows, breakdown_rows, chart, grant_rows, key_row, limit_rows, log_rows, sort_value, units_total, when

PAGE_SIZE = 50
SORTS = ("name", "mode", "credits", "count", "spend", "today", "status")
WRONG_KEY_DELAY = 0.5


def render_error(request: Request, error: GatewayError) -> HTMLResponse:
    """An error page with the visitor's navigation (and the way to log in for strangers)."""
    me, csrf = None, None
    with contextlib.suppress(LoginRequired, GatewayError):  # an error page never fails for want of a session
        me, session = visitor(request, current_config(request))
        csrf = session.csrf
    return render(request, "error.html", status=error.status, error=error, me=me, csrf=csrf)


async def favicon(request: Request) -> Response:
    """Browsers ask for /favicon.ico on their own (JSON and CSV views too): the pages' icon."""
    return FileResponse(WEB / "static" / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


# --- login -----------------------------------------------------------------------------


async def home(request: Request) -> Response:
    key, _ = visitor(request, current_config(request))
    return redirect("/admin" if key.is_admin else "/usage")


async def login_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", status=status, csrf=token, error=error)
    set_cookie(request, response, LOGIN_CSRF_COOKIE, token, 3600)
    return response


async def login_form(request: Request) -> Response:
    return await login_page(request)


async def login(request: Request) -> Response:
    form = await read_form(request)
    if not csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE), form.get("csrf_token")):
        return await login_page(request, MESSAGES["bad_csrf"], status=403)
    config = current_config(request)
    throttle, limit, address = request.app.state.auth_throttle, config.preferences.auth_failure_limit, caller_ip(request, config)
    try:
        throttle.check(address, limit)
    except GatewayError as exc:
        return await login_page(request, exc.message, status=exc.status)
    key = config.key_index.find(form.get("api_key", "").strip())
    if key is None:
        throttle.failed(address, limit)
        await asyncio.sleep(WRONG_KEY_DELAY)  # slows down guessing without blocking anyone else
        return await login_page(request, "That key is not valid. Check it and try again.", status=401)
    try:
        check_page_access(request, config, key)
    except GatewayError as exc:
        return await login_page(request, exc.message, status=exc.status)
    if key.is_admin:
        await request.app.state.ledger.append_audit(AuditEntry(request.app.state.clock(), Actor.of(key, address), LOGIN))
    response = redirect("/admin" if key.is_admin else "/usage")
    set_cookie(request, response, SESSION_COOKIE, signer(request).dump(new_session(key.id)), SESSION_SECONDS)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


async def logout(request: Request) -> Response:
    config = current_config(request)
    _, session = visitor(request, config)
    form = await read_form(request)
    if not csrf_matches(session.csrf, form.get("csrf_token")):
        raise forbidden("The form expired; please try again.", "bad_csrf")
    response = redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- admin pages -------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    config = current_config(request)
    key, session = admin_visitor(request, config)
    ledger: Ledger = request.app.state.ledger
    today, month = reports.today(), reports.month_start()
    names = {k.id: k.name for k in (*config.keys, *config.deleted_keys.values())}
    return render(
        request,
        "overview.html",
        me=key,
        csrf=session.csrf,
        today=_pair(await reports.totals_since(ledger, today)),
        month=_pair(await reports.totals_since(ledger, month)),
        vendor=money_cells(await month_totals(config, ledger, request.app.state.clock())),
        top_keys=[
            {"id": kid, "name": names.get(kid, kid[:8] + " (removed)"), "requests": r, "cost": c, "known": kid in names}
            for kid, r, c in await reports.top_keys_in_month(ledger, reports.this_month())
        ],
        top_models=[{"model": m, "requests": r, "cost": c} for m, r, c in await reports.top_models(ledger, month)],
        trend=chart(await reports.daily_series(ledger, None)),
        alerts=alert_rows(await recent_alerts(ledger, None, limit=10), config),
        config={"loaded_at": when(config.loaded_at), "hash": config.source_hash[:12], "key_count": len(config.keys), "provider_count": len(config.providers)},
        instances=await _fleet(ledger),
    )


async def _fleet(ledger: Ledger) -> list[dict[str, Any]]:
    """Fleet mode: every live instance with the config it serves (a differing hash shows)."""
    if not isinstance(ledger, PgLedger):
        return []
    return [
        {"id": i["id"], "hash": i["config_hash"][:12], "error": i["config_error"], "seen": when(i["heartbeat_at"]), "this": i["this"]}
        for i in await ledger.instances()
    ]


def _pair(totals: tuple[int, int]) -> dict[str, Any]:
    return {"requests": totals[0], "cost": totals[1]}


async def billing_tab(request: Request) -> Response:
    config = current_config(request)
    me, session = admin_visitor(request, config)
    ledger: Ledger = request.app.state.ledger
    params = request.query_params
    query = params.get("q", "").strip().lower()
    sort = params.get("sort", "name") if params.get("sort") in SORTS else "name"
    descending = params.get("dir") == "desc"
    every = (*config.keys, *config.deleted_keys.values())  # deleted keys stay listed: their history is readable
    keys = [k for k in every if not query or query in k.name.lower() or query in k.masked.lower() or k.id.startswith(query.lstrip("#"))]
    accounts = await ledger.accounts([(k.id, k.billing) for k in keys])
    month = await reports.by_key_in_month(ledger, reports.this_month())
    today = await reports.by_key_on_day(ledger, reports.today())
    entries = [(k, accounts[k.id], month.get(k.id, (0, 0)), today.get(k.id, (0, 0))) for k in keys]
    entries.sort(key=lambda entry: sort_value(sort, config, *entry), reverse=descending)
    page, pages = _page(params.get("page"), len(entries))
    shown = entries[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    units = await reports.units_by_key_since(ledger, [entry[0].id for entry in shown], reports.month_start())
    return render(
        request,
        "keys.html",
        me=me,
        csrf=session.csrf,
        rows=[key_row(config, *entry, units.get(entry[0].id, (0, 0, 0))) for entry in shown],
        total=len(entries),
        query=params.get("q", ""),
        sort=sort,
        descending=descending,
        page=page,
        pages=pages,
        link=lambda **changes: (
            "/admin/keys?" + urlencode({**{"q": params.get("q", ""), "sort": sort, "dir": "desc" if descending else "asc", "page": page}, **changes})
        ),
        message=flash_message(request),
        is_error="error" in params,
        new_key=DEFAULTS,
        accounts=list(config.accounts),
    )


def _page(raw: str | None, count: int) -> tuple[int, int]:
    pages = max(1, -(-count // PAGE_SIZE))
    page = whole_number(raw) or 1
    return min(max(page, 1), pages), pages


async def key_detail(request: Request) -> Response:
    config = current_config(request)
    me, session = visitor(request, config)
    key_id = request.path_params["key_id"]
    key = config.keys_by_id.get(key_id) or config.deleted_keys.get(key_id)
    if not me.is_admin and (key is None or key.id != me.id):
        raise forbidden("You may only see your own key.", "not_your_key")
    if key is None:
        raise not_found("No such key.", "key_not_found")
    return await _detail_page(request, config, me, session, key)


async def usage_page(request: Request, **shown: Any) -> Response:
    """The key holder's page; with self-service keys, their account's keys too (`shown`: what
    a form of that section just did, routes/web_usage_keys.py)."""
    config = current_config(request)
    me, session = visitor(request, config)
    return await _detail_page(request, config, me, session, me, account_keys=await account_keys_section(request, config, me, **shown))


async def _detail_page(request: Request, config: Config, me: ApiKey, session: Session, key: ApiKey, **extra: Any) -> Response:
    ledger: Ledger = request.app.state.ledger
    account = await ledger.account(key.id, key.billing)
    month = await reports.totals_since(ledger, reports.month_start(), key.id)
    today = await reports.totals_since(ledger, reports.today(), key.id)
    before = _float(request.query_params.get("before"))
    log = await reports.request_log(ledger, key.id, before)
    limiter = request.app.state.gateway.meter.limiter
    now = request.app.state.clock()
    if key.limits.meters_anything:  # (fleet mode: read afresh, other instances change it too)
        await limiter.prepare(key, now)
    params = request.query_params
    by_model = await ledger.totals([Window(key.id, key.billing.created_at)], by_model=True)
    month_units = (await reports.units_by_key_since(ledger, [key.id], reports.month_start())).get(key.id, (0, 0, 0))
    return render(
        request,
        "key_detail.html",
        me=me,
        csrf=session.csrf,
        key=key,
        row=key_row(config, key, account, month, today, month_units),
        totals={
            "requests": account.request_count,
            "cost": account.total_cost_nanos,
            "units": units_total(by_model),
            "window": when(key.billing.created_at) if key.billing.created_at else None,
        },
        month=_pair(month),
        breakdown=breakdown_rows(by_model),
        trend=chart(await reports.daily_series(ledger, key.id)),
        log=log_rows(log),
        next_before=log[-1]["ts"] if len(log) == reports.LOG_PAGE else None,
        grants=grant_rows(await reports.grant_history(ledger, key.id)),
        limits=limit_rows([use for use in [statements.quota_use(key, account)] if use] + statements.limit_uses(key, limiter, now)),
        alerts=alert_rows(await recent_alerts(ledger, key.id), config),
        base_url=f"/admin/keys/{key.id}" if me.is_admin else "/usage",
        deleted_at=_deleted_at(request, config, key),
        settings=settings_values(key) if me.is_admin else None,
        export_url=f"/admin/export/requests.csv?key={key.id}" if me.is_admin else "/usage/export/requests.csv",
        message=flash_message(request),
        is_error="error" in params,
        **extra,
    )


def _deleted_at(request: Request, config: Config, key: ApiKey) -> str | None:
    if key.id not in config.deleted_keys:
        return None
    store: ConfigStore = request.app.state.store
    record = store.records.get(key.id)
    return when(record.deleted_at) if record is not None and record.deleted_at else "—"


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


# --- admin actions -----------------------------------------------------------------------


def _action(kind: str):  # type: ignore[no-untyped-def]
    async def handle(request: Request) -> Response:
        config = current_config(request)
        admin, session = admin_visitor(request, config)
        actor, state = Actor.of(admin, caller_ip(request, config)), request.app.state
        key = config.keys_by_id.get(request.path_params["key_id"])
        if key is None:
            raise not_found("No such key.", "key_not_found")
        form = await read_form(request)
        back = _back(form.get("back", ""), key)
        if not csrf_matches(session.csrf, form.get("csrf_token")):
            raise forbidden("The form expired; please reload the page and try again.", "bad_csrf")
        separator = "&" if "?" in back else "?"
        try:
            if kind == "billing_mode":
                await admin_actions.set_billing_mode(state.store, state.ledger, key, form.get("billing_mode", ""), state.clock(), actor)
                done = "mode_set"
            else:
                # The form's one-time token makes a double submit apply once, like the API's Idempotency-Key.
                applied = await admin_actions.add_credit(
                    state.ledger,
                    key,
                    kind,
                    form.get("amount", ""),
                    form.get("reason") or "web top-up",
                    form.get("idempotency_key") or None,
                    state.clock(),
                    actor,
                    state.alerts,
                )
                done = ("credits_added" if kind == CREDITS else "count_credits_added") if applied else "already_applied"
        except GatewayError as exc:
            return redirect(f"{back}{separator}error={exc.code}")
        return redirect(f"{back}{separator}done={done}")

    handle.__name__ = f"web_{kind}"
    return handle


def _back(raw: str, key: ApiKey) -> str:
    """Where a form returns to: an admin page only (no open redirect), without old messages."""
    if not raw.startswith("/admin"):
        return f"/admin/keys/{key.id}"
    url = urlsplit(raw)
    query = [(name, value) for name, value in parse_qsl(url.query) if name not in ("done", "error")]
    return url.path + ("?" + urlencode(query) if query else "")


routes = [
    Route("/", home, methods=["GET"]),
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/admin", overview, methods=["GET"]),
    Route("/admin/keys", billing_tab, methods=["GET"]),
    *web_providers.routes,
    *web_keys.routes,
    Route("/admin/keys/{key_id}", key_detail, methods=["GET"]),
    Route("/admin/keys/{key_id}/add_credits", _action(CREDITS), methods=["POST"]),
    Route("/admin/keys/{key_id}/add_count_credits", _action(COUNT_CREDITS), methods=["POST"]),
    Route("/admin/keys/{key_id}/billing_mode", _action("billing_mode"), methods=["POST"]),
    *web_account_admin.routes,
    *web_accounts.routes,
    Route("/usage", usage_page, methods=["GET"]),
    Route("/favicon.ico", favicon, methods=["GET"]),
    *web_export.routes,
    Mount("/static", StaticFiles(directory=WEB / "static"), name="static"),
]
