"""The admin pages' Accounts tab: every account with its shared balance, one account's
settings, limits, keys and grants, and its top-up form. The figures are the accounts API's
(routes/accounts.py): the ledger's balance of the account's stand-in key; a top-up goes
through the same code (core/admin_actions.py: idempotent, audited). Making, changing and
deleting an account are in routes/web_account_admin.py."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import admin_actions, reports, statements
from core.audit import Actor
from core.config import ApiKey, Config
from core.errors import GatewayError
from core.keys import accounts as account_admin
from core.keys.admin import jsonable
from core.keys.states import keys_by_account
from core.ledger import CREDITS, Ledger
from routes._http import caller_ip, current_config
from routes._pages import flash_message, redirect, render
from routes._session import Session
from routes._web_auth import admin_form, admin_visitor
from routes.account_forms import NEW_ACCOUNT, account_values
from routes.web_views import account_row, grant_rows, key_row, limit_rows

KINDS = ((CREDITS, "USD credits"), ("count_credits", "count credits"))


async def accounts_page(request: Request) -> Response:
    """Every account, deleted ones too (greyed, as GET /v1/accounts lists them: their history stays)."""
    config = current_config(request)
    me, session = admin_visitor(request, config)
    accounts = [*config.accounts.values(), *config.deleted_accounts.values()]
    balances = await request.app.state.ledger.accounts([(account.id, account.billing) for account in accounts])
    members = keys_by_account(config)
    rows = [account_row(config, account, balances[account.id], len(members.get(account.name, []))) for account in accounts]
    return render(request, "accounts.html", me=me, csrf=session.csrf, rows=rows, new_account=NEW_ACCOUNT)


async def account_page(request: Request) -> Response:
    config = current_config(request)
    me, session = admin_visitor(request, config)
    name = request.path_params["name"]
    account = config.accounts.get(name) or config.deleted_accounts.get(name)
    if account is None:
        raise account_admin.account_not_found(name)
    return await _detail(request, config, me, session, account, message=flash_message(request), is_error="error" in request.query_params)


async def _detail(
    request: Request,
    config: Config,
    me: ApiKey,
    session: Session,
    account: ApiKey,
    status: int = 200,
    message: str | None = None,
    is_error: bool = False,
    values: dict[str, str] | None = None,
) -> Response:
    """The account's page, with a message: what a form did, or why a top-up was refused
    (`values`: that form as it was filled, to correct)."""
    ledger: Ledger = request.app.state.ledger
    keys = keys_by_account(config).get(account.name, [])
    balances = await ledger.accounts([(key.id, key.billing) for key in (account, *keys)])
    month = await reports.by_key_in_month(ledger, reports.this_month())
    today = await reports.by_key_on_day(ledger, reports.today())
    limiter, now = request.app.state.gateway.meter.limiter, request.app.state.clock()
    if account.limits.meters_anything:  # (fleet mode: read afresh, other instances change it too)
        await limiter.prepare(account, now)
    return render(
        request,
        "account_detail.html",
        status=status,
        me=me,
        csrf=session.csrf,
        account=account,
        row=account_row(config, account, balances[account.id], len(keys)),
        problem=config.key_problems.get(account.id),
        settings=_settings(account),
        edit_values=account_values(account),
        limits=limit_rows(statements.limit_uses(account, limiter, now)),
        keys=[key_row(config, key, balances[key.id], month.get(key.id, (0, 0)), today.get(key.id, (0, 0))) for key in keys],
        grants=grant_rows(await reports.grant_history(ledger, account.id)),
        kinds=KINDS,
        message=message,
        is_error=is_error,
        values=values or {},
    )


def _settings(account: ApiKey) -> list[tuple[str, str]]:
    """The account's preferences as written (api.yaml's entry), one line each."""
    preferences = jsonable(account.entry.get("preferences") or {}, fragments=False)
    return [(name.replace("_", " "), str(value)) for name, value in preferences.items()]


async def add_credits(request: Request) -> Response:
    """The top-up form: USD or count credits; its one-time token makes a double submit apply
    once. A refused amount shows the page again with the reason (and the form as filled)."""
    config, admin, session, form = await admin_form(request)
    account = account_admin.current_account(config, request.path_params["name"])  # 404, or 409 for a deleted one
    state, kind = request.app.state, form.get("kind", "")
    try:
        applied = await admin_actions.add_credit(
            state.ledger,
            account,
            kind,
            form.get("amount", ""),
            form.get("reason", "").strip() or "web top-up",
            form.get("idempotency_key") or None,
            state.clock(),
            Actor.of(admin, caller_ip(request, config)),
            state.alerts,
        )
    except GatewayError as exc:
        return await _detail(request, config, admin, session, account, status=exc.status, message=exc.message, is_error=True, values=form)
    done = ("credits_added" if kind == CREDITS else "count_credits_added") if applied else "already_applied"
    return redirect(f"/admin/accounts/{account.name}?done={done}")


routes = [
    Route("/admin/accounts", accounts_page, methods=["GET"]),
    Route("/admin/accounts/{name}", account_page, methods=["GET"]),
    Route("/admin/accounts/{name}/credits", add_credits, methods=["POST"]),
]
