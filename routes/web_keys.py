"""The admin pages' key management: make a key, change its settings, disable or enable it,
rotate its secret, delete it. Each form becomes the entry or patch the keys API takes and goes
through the same code (core/keys/admin.py: validated like api.yaml, stored, in force at once,
audited). A new secret is shown once, in the answer to the form that made it: never in a URL,
a cookie or a later page.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.audit import Actor
from core.config import ApiKey, Config
from core.errors import GatewayError, bad_request
from core.keys import admin as key_admin
from routes._forms import invalid_field
from routes._http import caller_ip, current_config
from routes._pages import redirect, render, with_scripts
from routes._session import Session
from routes._web_auth import admin_form, admin_visitor
from routes.key_forms import DEFAULTS, form_key_id, grace_seconds, new_key_entry, settings_patch, settings_values
from routes.web_views import when


def _actor(request: Request, config: Config, admin: ApiKey) -> Actor:
    return Actor.of(admin, caller_ip(request, config))


def _key(config: Config, key_id: str) -> ApiKey:
    """A key that can still be changed: 409 for a deleted one, 404 for an unknown id."""
    key = config.keys_by_id.get(key_id)
    if key is None:
        raise key_admin.key_deleted(key_id) if key_id in config.deleted_keys else key_admin.key_not_found(key_id)
    return key


def _secret_page(
    request: Request, admin: ApiKey, session: Session, key: ApiKey, secret: str, rotated: bool = False, previous_until: float | None = None
) -> Response:
    """The one page that shows the secret; it loads copy.js for its Copy button."""
    until = when(previous_until) if previous_until else None
    page = render(request, "key_secret.html", me=admin, csrf=session.csrf, key=key, secret=secret, rotated=rotated, previous_until=until)
    return with_scripts(page)


# --- make a key --------------------------------------------------------------------------


async def create_key(request: Request) -> Response:
    config, admin, session, form = await admin_form(request)
    state = request.app.state
    try:
        secret, key = await key_admin.create_key(state.store, state.ledger, new_key_entry(form), state.clock(), _actor(request, config, admin))
    except GatewayError as exc:
        made = form_key_id(form["idempotency_key"]) if form.get("idempotency_key") else None
        current = state.store.current
        if exc.code == "duplicate_key_id" and (made in current.keys_by_id or made in current.deleted_keys):
            # the same form again (the secret page reloaded): the key exists, its secret was shown
            return redirect(f"/admin/keys/{made}?error=key_already_made")
        values = {**DEFAULTS, **form}
        accounts = list(state.store.current.accounts)
        return render(
            request,
            "key_new.html",
            status=exc.status,
            me=admin,
            csrf=session.csrf,
            values=values,
            error=exc.message,
            invalid=invalid_field(exc),
            accounts=accounts,
        )
    return _secret_page(request, admin, session, key, secret)


# --- change its settings, disable or enable it --------------------------------------------


async def settings_page(request: Request) -> Response:
    config = current_config(request)
    admin, session = admin_visitor(request, config)
    key = _key(config, request.path_params["key_id"])
    return render(request, "key_edit.html", me=admin, csrf=session.csrf, key=key, values=settings_values(key), error=None, invalid=None)


async def update_settings(request: Request) -> Response:
    config, admin, session, form = await admin_form(request)
    key = _key(config, request.path_params["key_id"])
    patch = settings_patch(key, form)
    if not patch:
        return redirect(f"/admin/keys/{key.id}?done=nothing_changed")
    state = request.app.state
    try:
        await key_admin.update_key(state.store, state.ledger, key.id, patch, state.clock(), _actor(request, config, admin))
    except GatewayError as exc:
        values = {**settings_values(key), **form}
        return render(
            request, "key_edit.html", status=exc.status, me=admin, csrf=session.csrf, key=key, values=values, error=exc.message, invalid=invalid_field(exc)
        )
    return redirect(f"/admin/keys/{key.id}?done=key_updated")


async def set_enabled(request: Request) -> Response:
    config, admin, _, form = await admin_form(request)
    key = _key(config, request.path_params["key_id"])
    if form.get("enabled") not in ("true", "false"):
        raise bad_request("'enabled' must be true or false.", "invalid_enabled", "enabled")
    enabled = form["enabled"] == "true"
    state = request.app.state
    await key_admin.update_key(state.store, state.ledger, key.id, {"preferences": {"enabled": enabled}}, state.clock(), _actor(request, config, admin))
    return redirect(f"/admin/keys/{key.id}?done={'key_enabled' if enabled else 'key_disabled'}")


# --- rotate, delete ------------------------------------------------------------------------


async def rotate(request: Request) -> Response:
    config, admin, session, form = await admin_form(request)
    key = _key(config, request.path_params["key_id"])
    grace = grace_seconds(form.get("grace_seconds", ""))
    state = request.app.state
    now = state.clock()
    secret, after = await key_admin.rotate_key(state.store, state.ledger, key.id, grace, now, _actor(request, config, admin))
    return _secret_page(request, admin, session, after, secret, rotated=True, previous_until=now + grace if grace else None)


async def delete_page(request: Request) -> Response:
    config = current_config(request)
    admin, session = admin_visitor(request, config)
    key = _key(config, request.path_params["key_id"])
    return render(request, "key_delete.html", me=admin, csrf=session.csrf, key=key, error=None)


async def delete(request: Request) -> Response:
    """Deletes only with the confirmation box ticked: a click alone, script or not, is not enough."""
    config, admin, session, form = await admin_form(request)
    key = _key(config, request.path_params["key_id"])
    if form.get("confirm") != "yes":
        error = "Tick the box to confirm: the key's secret stops working at once, and this cannot be undone."
        return render(request, "key_delete.html", status=400, me=admin, csrf=session.csrf, key=key, error=error)
    state = request.app.state
    await key_admin.delete_key(state.store, state.ledger, key.id, state.clock(), _actor(request, config, admin))
    return redirect(f"/admin/keys/{key.id}?done=key_deleted")


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys/{key_id}/settings", settings_page, methods=["GET"]),
    Route("/admin/keys/{key_id}/settings", update_settings, methods=["POST"]),
    Route("/admin/keys/{key_id}/enabled", set_enabled, methods=["POST"]),
    Route("/admin/keys/{key_id}/rotate", rotate, methods=["POST"]),
    Route("/admin/keys/{key_id}/delete", delete_page, methods=["GET"]),
    Route("/admin/keys/{key_id}/delete", delete, methods=["POST"]),
]
