"""Accounts (admin keys only): one balance shared by several keys, defined in api.yaml's
`accounts:` or made through this API (stored like the keys API's keys). Make, change, delete
and read an account with its keys, and top it up: a key in an account draws on it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.admin_actions import add_credit
from core.audit import Actor
from core.config import FILE, ApiKey, Config
from core.config.reload import ConfigStore
from core.errors import bad_request
from core.keys import accounts as account_admin
from core.keys.admin import iso, jsonable
from core.keys.states import key_states, keys_by_account
from core.ledger import COUNT_CREDITS, CREDITS
from routes._http import caller_ip, current_config, read_json, require_admin
from routes._json import ExactJSONResponse


def _actor(request: Request, config: Config) -> Actor:
    return Actor.of(require_admin(request, config), caller_ip(request, config))


def _any_account(config: Config, name: str) -> ApiKey:
    """A live or deleted account by name (404 for none)."""
    account = config.accounts.get(name) or config.deleted_accounts.get(name)
    if account is None:
        raise account_admin.account_not_found(name)
    return account


async def _views(request: Request, config: Config, accounts: list[ApiKey]) -> list[dict[str, Any]]:
    """Each account as this API shows it: settings, where they come from, status, balance, keys."""
    store: ConfigStore = request.app.state.store
    states = await key_states(config, request.app.state.ledger, accounts)
    members = keys_by_account(config)
    views = []
    for account in accounts:
        record = store.account_records.get(account.name)
        views.append({
            "name": account.name,
            "id": account.id,
            "defined_in": account.defined_in,
            "api_changes": jsonable(record.entry) if record is not None and record.defined_in == FILE and record.entry else None,
            "problem": config.key_problems.get(account.id),
            "status": "deleted" if account.name in config.deleted_accounts else "active",
            "preferences": jsonable(account.entry.get("preferences") or {}),
            "created_at": iso(record.created_at) if record is not None else None,
            "updated_at": iso(record.updated_at) if record is not None else None,
            "deleted_at": iso(record.deleted_at) if record is not None else None,
            "state": states[account.id],
            "keys": [{"id": key.id, "name": key.name, "api": key.masked} for key in members.get(account.name, [])],
        })  # fmt: skip
    return views


async def list_accounts(request: Request) -> Response:
    """Every account, deleted ones included (`status: "deleted"`): their history stays readable."""
    config = current_config(request)
    require_admin(request, config)
    accounts = [*config.accounts.values(), *config.deleted_accounts.values()]
    return ExactJSONResponse({"object": "list", "data": await _views(request, config, accounts)})


async def get_account(request: Request) -> Response:
    config = current_config(request)
    require_admin(request, config)
    (view,) = await _views(request, config, [_any_account(config, request.path_params["name"])])
    return ExactJSONResponse(view)


async def create_account(request: Request) -> Response:
    """`{"name": "acme", "preferences": {...}}`, an api.yaml account entry as JSON → 201."""
    config = current_config(request)
    actor = _actor(request, config)
    body = await read_json(request, config.preferences.max_request_body_bytes)
    store: ConfigStore = request.app.state.store
    account = await account_admin.create_account(store, request.app.state.ledger, body, request.app.state.clock(), actor)
    (view,) = await _views(request, store.current, [account])
    return ExactJSONResponse(view, status_code=201)


async def update_account(request: Request) -> Response:
    """A JSON merge patch of the account's entry, e.g. `{"preferences": {"credits": 50}}`."""
    config = current_config(request)
    actor = _actor(request, config)
    body = await read_json(request, config.preferences.max_request_body_bytes)
    store: ConfigStore = request.app.state.store
    name = request.path_params["name"]
    account = await account_admin.update_account(store, request.app.state.ledger, name, body, request.app.state.clock(), actor)
    (view,) = await _views(request, store.current, [account])
    return ExactJSONResponse(view)


async def delete_account(request: Request) -> Response:
    config = current_config(request)
    actor = _actor(request, config)
    store: ConfigStore = request.app.state.store
    name = request.path_params["name"]
    account = await account_admin.delete_account(store, request.app.state.ledger, name, request.app.state.clock(), actor)
    (view,) = await _views(request, store.current, [account])
    return ExactJSONResponse({"name": name, "deleted": True, "account": view})


async def add_account_credits(request: Request) -> Response:
    """`{"amount": "25", "kind": "credits" | "count_credits", "reason": "..."}`; an
    `Idempotency-Key` header makes a retry safe, as for a key's top-up."""
    config = current_config(request)
    actor = Actor.of(require_admin(request, config), caller_ip(request, config))
    account = account_admin.current_account(config, request.path_params["name"])
    body = await read_json(request, config.preferences.max_request_body_bytes)
    if not isinstance(body, dict):
        raise bad_request('The body must be a JSON object: {"amount": "25", "kind": "credits"}.', "invalid_body")
    kind = body.get("kind", CREDITS)
    if kind not in (CREDITS, COUNT_CREDITS):
        raise bad_request(f"'kind' must be '{CREDITS}' or '{COUNT_CREDITS}'.", "invalid_kind", "kind")
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
        amount = ""
    raw = amount if isinstance(amount, str) else repr(amount)  # a float's shortest text: 2.5, never its binary value
    reason = body.get("reason") if isinstance(body.get("reason"), str) else None
    state = request.app.state
    applied = await add_credit(state.ledger, account, kind, raw, reason, request.headers.get("idempotency-key") or None, state.clock(), actor, state.alerts)
    (view,) = await _views(request, config, [account])
    return ExactJSONResponse({"applied": applied, "account": view})


routes = [
    Route("/v1/accounts", list_accounts, methods=["GET"]),
    Route("/v1/accounts", create_account, methods=["POST"]),
    Route("/v1/accounts/{name}", get_account, methods=["GET"]),
    Route("/v1/accounts/{name}", update_account, methods=["PATCH"]),
    Route("/v1/accounts/{name}", delete_account, methods=["DELETE"]),
    Route("/v1/accounts/{name}/credits", add_account_credits, methods=["POST"]),
]
