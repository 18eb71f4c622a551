"""The admin pages' account management: make an account, change its settings, delete it. Each
form becomes the entry or patch the accounts API takes and goes through the same code
(core/keys/accounts.py: validated like api.yaml, stored, in force at once for every key in the
account, audited), as the key forms do (routes/web_keys.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.audit import Actor
from core.config import API, ApiKey, Config
from core.config.reload import ConfigStore
from core.errors import GatewayError
from core.keys import accounts as account_admin
from core.keys.admin import jsonable
from routes._forms import invalid_field
from routes._http import caller_ip, current_config
from routes._pages import redirect, render
from routes._web_auth import admin_form, admin_visitor
from routes.account_forms import NEW_ACCOUNT, account_patch, account_values, new_account_entry


def _actor(request: Request, config: Config, admin: ApiKey) -> Actor:
    return Actor.of(admin, caller_ip(request, config))


def _made_by_this_form(store: ConfigStore, entry: dict[str, Any]) -> bool:
    """The account this entry names exists, made through the API with exactly this entry: the
    same form sent twice (a double click). The name is the account's id, so a second submit
    finds the first one's account, as the new key form's one-time token finds its key."""
    record = store.account_records.get(entry["name"])
    return (
        record is not None
        and record.defined_in == API
        and record.deleted_at is None
        and jsonable(record.entry, fragments=False) == jsonable(entry, fragments=False)
    )


# --- make an account -----------------------------------------------------------------------


async def create_account(request: Request) -> Response:
    config, admin, session, form = await admin_form(request)
    state = request.app.state
    entry = new_account_entry(form)
    try:
        account = await account_admin.create_account(state.store, state.ledger, entry, state.clock(), _actor(request, config, admin))
    except GatewayError as exc:
        if exc.code == "duplicate_account" and _made_by_this_form(state.store, entry):
            return redirect(f"/admin/accounts/{entry['name']}?error=account_already_made")
        values = {**NEW_ACCOUNT, **form}
        return render(request, "account_new.html", status=exc.status, me=admin, csrf=session.csrf, values=values, error=exc.message, invalid=invalid_field(exc))
    return redirect(f"/admin/accounts/{account.name}?done=account_created")


# --- change its settings -------------------------------------------------------------------


async def settings_page(request: Request) -> Response:
    config = current_config(request)
    admin, session = admin_visitor(request, config)
    account = account_admin.current_account(config, request.path_params["name"])  # 404, or 409 for a deleted one
    return render(request, "account_edit.html", me=admin, csrf=session.csrf, account=account, values=account_values(account), error=None, invalid=None)


async def update_settings(request: Request) -> Response:
    config, admin, session, form = await admin_form(request)
    account = account_admin.current_account(config, request.path_params["name"])
    patch = account_patch(account, form)
    if not patch:
        return redirect(f"/admin/accounts/{account.name}?done=account_unchanged")
    state = request.app.state
    try:
        await account_admin.update_account(state.store, state.ledger, account.name, patch, state.clock(), _actor(request, config, admin))
    except GatewayError as exc:
        values = {**account_values(account), **form}
        error, invalid = exc.message, invalid_field(exc)
        return render(
            request, "account_edit.html", status=exc.status, me=admin, csrf=session.csrf, account=account, values=values, error=error, invalid=invalid
        )
    return redirect(f"/admin/accounts/{account.name}?done=account_updated")


# --- delete it -----------------------------------------------------------------------------


async def delete_page(request: Request) -> Response:
    config = current_config(request)
    admin, session = admin_visitor(request, config)
    account = account_admin.current_account(config, request.path_params["name"])
    return render(request, "account_delete.html", me=admin, csrf=session.csrf, account=account, keys=account_admin.keys_in(config, account.name), error=None)


async def delete(request: Request) -> Response:
    """Deletes only with the confirmation box ticked, and only an account no key draws on any
    more (409 `account_in_use`: the page says which keys are still in it)."""
    config, admin, session, form = await admin_form(request)
    account = account_admin.current_account(config, request.path_params["name"])
    page = {"me": admin, "csrf": session.csrf, "account": account, "keys": account_admin.keys_in(config, account.name)}
    if form.get("confirm") != "yes":
        error = "Tick the box to confirm: no key can be put in the account afterwards, and this cannot be undone."
        return render(request, "account_delete.html", status=400, error=error, **page)
    state = request.app.state
    try:
        await account_admin.delete_account(state.store, state.ledger, account.name, state.clock(), _actor(request, config, admin))
    except GatewayError as exc:
        if exc.code != "account_in_use":
            raise
        page["keys"] = account_admin.keys_in(state.store.current, account.name)
        return render(request, "account_delete.html", status=exc.status, error=exc.message, **page)
    return redirect(f"/admin/accounts/{account.name}?done=account_deleted")


routes = [
    Route("/admin/accounts", create_account, methods=["POST"]),
    Route("/admin/accounts/{name}/settings", settings_page, methods=["GET"]),
    Route("/admin/accounts/{name}/settings", update_settings, methods=["POST"]),
    Route("/admin/accounts/{name}/delete", delete_page, methods=["GET"]),
    Route("/admin/accounts/{name}/delete", delete, methods=["POST"]),
]
