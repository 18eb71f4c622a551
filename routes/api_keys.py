"""The keys API: make, list, read, change, rotate and delete keys.

A key is described by the same JSON as a key entry in api.yaml; answers never hold a full
secret, except the one `api` a create or rotate hands out once. Admin keys may do everything;
a key of an account with `self_service_keys` may make, list, read and delete the keys of its
own account (core/keys/self_service.py); any other key gets 403.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.audit import Actor
from core.config import FILE, ApiKey, Config
from core.config.reload import ConfigStore
from core.errors import bad_request
from core.keys import admin as key_admin
from core.keys.admin import iso, jsonable, key_not_found
from core.keys.self_service import check_holder_may_delete, holder_entry, holder_target, in_account, managed_account
from core.keys.states import key_states, key_status
from core.ledger import Account, Ledger
from core.limits import Limiter
from core.money_format import usd_json
from routes._http import authenticate, caller_ip, current_config, parse_json, read_body, require_admin, whole_number
from routes._json import ExactJSONResponse

DEFAULT_PAGE, MAX_PAGE = 50, 1000


def _actor(request: Request, config: Config) -> Actor:
    return Actor.of(require_admin(request, config), caller_ip(request, config))


def _caller(request: Request, config: Config) -> tuple[ApiKey, ApiKey | None]:
    """Who calls, and the account whose keys they manage (None: an admin, who manages every
    key); 403 for a key that may manage none."""
    caller = authenticate(request, config)
    return caller, None if caller.is_admin else managed_account(caller)


async def _body(request: Request, config: Config, required: bool = True) -> Any:
    """The JSON body; an empty one is `{}` where the body is optional (rotate)."""
    raw = await read_body(request, config.preferences.max_request_body_bytes)
    if not required and not raw.strip():
        return {}
    return parse_json(raw)


async def key_views(request: Request, config: Config, keys: list[ApiKey]) -> list[dict[str, Any]]:
    """Each key as the keys API shows it: settings, where they come from, status, balances, quota."""
    ledger: Ledger = request.app.state.ledger
    store: ConfigStore = request.app.state.store
    states = await key_states(config, ledger, keys)
    accounts = await ledger.accounts([(key.id, key.billing) for key in keys])
    now = request.app.state.clock()
    return [_view(key, store, states[key.id], accounts[key.id], key.id in config.deleted_keys, now) for key in keys]


def _view(key: ApiKey, store: ConfigStore, state: dict[str, Any], account: Account, deleted: bool, now: float) -> dict[str, Any]:
    record = store.records.get(key.id)
    return {
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "account": key.account.name if key.account is not None else None,
        "api": key.masked,
        "defined_in": key.defined_in,
        "api_changes": jsonable(record.entry) if record is not None and record.defined_in == FILE and record.entry else None,
        "problem": store.current.key_problems.get(key.id),
        "status": key_status(key, now, deleted),
        "model": jsonable(key.entry.get("model")),
        "preferences": jsonable(key.entry.get("preferences") or {}),
        "created_at": iso(record.created_at) if record is not None else None,
        "updated_at": iso(record.updated_at) if record is not None else None,
        "deleted_at": iso(record.deleted_at) if record is not None else None,
        "quota": _quota(key, account),
        "state": state,
    }


def _quota(key: ApiKey, account: Account) -> dict[str, Any] | None:
    limits = key.limits
    if limits.quota is None:
        return None
    used = Limiter.quota_used(key, account)
    remaining = max(0, limits.quota - used)
    if limits.quota_type == "usd":
        return {"type": "usd", "limit": usd_json(limits.quota), "used": usd_json(used), "remaining": usd_json(remaining)}
    return {"type": "tokens", "limit": limits.quota, "used": used, "remaining": remaining}


def _find(config: Config, key_id: str) -> ApiKey:
    key = config.keys_by_id.get(key_id) or config.deleted_keys.get(key_id)
    if key is None:
        raise key_not_found(key_id)
    return key


def _page_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw)
    if value is None or not low <= value <= high:
        raise bad_request(f"The '{name}' parameter must be a whole number from {low} to {high}, got '{raw}'.", f"invalid_{name}", name)
    return value


async def list_keys(request: Request) -> Response:
    config = current_config(request)
    _, account = _caller(request, config)
    limit = _page_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = _page_param(request, "offset", 0, 0, 10**12)
    query = (request.query_params.get("q") or "").strip().lower()
    keys = [key for key in (*config.keys, *config.deleted_keys.values()) if query in key.name.lower() and (account is None or in_account(key, account))]
    page = keys[offset : offset + limit]
    return ExactJSONResponse({"object": "list", "data": await key_views(request, config, page), "total": len(keys), "limit": limit, "offset": offset})


async def create_key(request: Request) -> Response:
    config = current_config(request)
    caller, account = _caller(request, config)
    body = await _body(request, config)
    if account is not None:  # a key holder: a key in their own account, within what their key may do
        body = holder_entry(config, caller, account, body)
    store: ConfigStore = request.app.state.store
    actor = Actor.of(caller, caller_ip(request, config))
    secret, key = await key_admin.create_key(store, request.app.state.ledger, body, request.app.state.clock(), actor)
    (view,) = await key_views(request, store.current, [key])
    return ExactJSONResponse({"id": key.id, "api": secret, "key": view}, status_code=201)


async def get_key(request: Request) -> Response:
    config = current_config(request)
    _, account = _caller(request, config)
    key_id = request.path_params["key_id"]
    key = _find(config, key_id) if account is None else holder_target(config, account, key_id)
    (view,) = await key_views(request, config, [key])
    return ExactJSONResponse(view)


async def update_key(request: Request) -> Response:
    config = current_config(request)
    actor = _actor(request, config)
    body = await _body(request, config)
    store: ConfigStore = request.app.state.store
    key = await key_admin.update_key(store, request.app.state.ledger, request.path_params["key_id"], body, request.app.state.clock(), actor)
    (view,) = await key_views(request, store.current, [key])
    return ExactJSONResponse(view)


async def rotate_key(request: Request) -> Response:
    config = current_config(request)
    actor = _actor(request, config)
    body = await _body(request, config, required=False)
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object (or empty).", "invalid_body")
    grace = body.get("grace_seconds", 0)
    if not isinstance(grace, int) or isinstance(grace, bool):
        raise bad_request("'grace_seconds' must be a whole number of seconds.", "invalid_grace_seconds", "grace_seconds")
    store: ConfigStore = request.app.state.store
    now = request.app.state.clock()
    secret, key = await key_admin.rotate_key(store, request.app.state.ledger, request.path_params["key_id"], grace, now, actor)
    (view,) = await key_views(request, store.current, [key])
    until = iso(now + grace) if grace else None
    return ExactJSONResponse({"id": key.id, "api": secret, "previous_valid_until": until, "key": view})


async def delete_key(request: Request) -> Response:
    config = current_config(request)
    caller, account = _caller(request, config)
    key_id = request.path_params["key_id"]
    if account is not None:
        check_holder_may_delete(holder_target(config, account, key_id))
    store: ConfigStore = request.app.state.store
    actor = Actor.of(caller, caller_ip(request, config))
    key = await key_admin.delete_key(store, request.app.state.ledger, key_id, request.app.state.clock(), actor)
    (view,) = await key_views(request, store.current, [key])
    return ExactJSONResponse({"id": key.id, "deleted": True, "key": view})


routes = [
    Route("/v1/api_keys", list_keys, methods=["GET"]),
    Route("/v1/api_keys", create_key, methods=["POST"]),
    Route("/v1/api_keys/{key_id}", get_key, methods=["GET"]),
    Route("/v1/api_keys/{key_id}", update_key, methods=["PATCH"]),
    Route("/v1/api_keys/{key_id}", delete_key, methods=["DELETE"]),
    Route("/v1/api_keys/{key_id}/rotate", rotate_key, methods=["POST"]),
]
