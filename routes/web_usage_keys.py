"""The usage page's forms for self-service keys: make a key in the holder's account (its
secret shown once, on the page the form returns, never in a URL), and revoke one (after a
confirmation). As the admin's new key form, the form's one-time token names the key's id, so
the same form sent twice (that page reloaded) makes one key.

The same rules as `POST /v1/api_keys` and `DELETE /v1/api_keys/{id}` for key holders
(core/keys/self_service.py), and the same audit entries, with the holder as the actor."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from core.audit import Actor
from core.config import ApiKey
from core.errors import GatewayError, forbidden
from core.keys import admin as key_admin
from core.keys.self_service import check_holder_may_delete, holder_entry, holder_target, managed_account
from routes._http import caller_ip, current_config
from routes._pages import read_form, redirect, with_scripts
from routes._session import csrf_matches
from routes._web_auth import visitor
from routes.key_forms import form_key_id
from routes.web import usage_page


async def _holder(request: Request) -> tuple[ApiKey, ApiKey, dict[str, str]]:
    """The holder posting (CSRF checked), the account they manage keys of, and the form."""
    me, session = visitor(request, current_config(request))
    form = await read_form(request)
    if not csrf_matches(session.csrf, form.get("csrf_token")):
        raise forbidden("The form expired; please reload the page and try again.", "bad_csrf")
    return me, managed_account(me), form


def _entry(form: dict[str, str]) -> dict[str, Any]:
    """The form as a key entry: a name, and a quota (whole numbers as numbers; other text goes
    to validation as written, which says what is wrong with it)."""
    entry: dict[str, Any] = {"name": form.get("name", "").strip()}
    quota = form.get("quota", "").strip()
    if quota:
        try:
            number = Decimal(quota)
            value: Any = int(number) if number.is_finite() and number == number.to_integral_value() else quota
        except InvalidOperation:
            value = quota
        entry["preferences"] = {"quota": value, "quota_type": form.get("quota_type") or "tokens"}
    return entry


async def create_key(request: Request) -> Response:
    me, account, form = await _holder(request)
    config, state = current_config(request), request.app.state
    made = form_key_id(form["idempotency_key"]) if form.get("idempotency_key") else None
    try:
        body = holder_entry(config, me, account, _entry(form))
        if made is not None:
            body["id"] = made  # from the form's token, not chosen by the holder
        secret, key = await key_admin.create_key(state.store, state.ledger, body, state.clock(), Actor.of(me, caller_ip(request, config)))
    except GatewayError as exc:
        current = state.store.current
        if exc.code == "duplicate_key_id" and (made in current.keys_by_id or made in current.deleted_keys):
            return redirect(f"/usage?made={made}#account-keys")  # the same form again: the key exists, its secret was shown
        if exc.status >= 500:
            raise
        page = await usage_page(request, error=exc.message)
        page.status_code = exc.status
        return page
    page = await usage_page(request, new_key={"name": key.name, "secret": secret})
    return with_scripts(page) if isinstance(page, HTMLResponse) else page


async def revoke_key(request: Request) -> Response:
    me, account, _ = await _holder(request)
    config, state = current_config(request), request.app.state
    key = holder_target(config, account, request.path_params["key_id"])
    check_holder_may_delete(key)
    await key_admin.delete_key(state.store, state.ledger, key.id, state.clock(), Actor.of(me, caller_ip(request, config)))
    return redirect(f"/usage?revoked={key.id}#account-keys")


routes = [
    Route("/usage/keys", create_key, methods=["POST"]),
    Route("/usage/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
]
