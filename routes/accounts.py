"""Accounts (admin keys only): one balance shared by several keys, defined in api.yaml's
`accounts:`. Read an account with its keys, and top it up: a key in an account draws on it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.admin_actions import add_credit
from core.audit import Actor
from core.config import ApiKey, Config
from core.errors import bad_request, not_found
from core.key_admin import jsonable
from core.key_states import key_states, keys_by_account
from core.ledger import COUNT_CREDITS, CREDITS
from routes._http import caller_ip, current_config, read_json, require_admin
from routes._json import ExactJSONResponse


def _account(config: Config, name: str) -> ApiKey:
    account = config.accounts.get(name)
    if account is None:
        raise not_found(f"No account is named '{name}'.", "account_not_found", "name")
    return account


async def _views(request: Request, config: Config, accounts: list[ApiKey]) -> list[dict[str, Any]]:
    states = await key_states(config, request.app.state.ledger, accounts)
    members = keys_by_account(config)
    return [
        {
            "name": account.name,
            "id": account.id,
            "defined_in": "api.yaml",
            "preferences": jsonable(account.entry.get("preferences") or {}),
            "state": states[account.id],
            "keys": [{"id": key.id, "name": key.name, "api": key.masked} for key in members.get(account.name, [])],
        }
        for account in accounts
    ]


async def list_accounts(request: Request) -> Response:
    config = current_config(request)
    require_admin(request, config)
    return ExactJSONResponse({"object": "list", "data": await _views(request, config, list(config.accounts.values()))})


async def get_account(request: Request) -> Response:
    config = current_config(request)
    require_admin(request, config)
    (view,) = await _views(request, config, [_account(config, request.path_params["name"])])
    return ExactJSONResponse(view)


async def add_account_credits(request: Request) -> Response:
    """`{"amount": "25", "kind": "credits" | "count_credits", "reason": "..."}`; an
    `Idempotency-Key` header makes a retry safe, as for a key's top-up."""
    config = current_config(request)
    actor = Actor.of(require_admin(request, config), caller_ip(request, config))
    account = _account(config, request.path_params["name"])
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
    Route("/v1/accounts/{name}", get_account, methods=["GET"]),
    Route("/v1/accounts/{name}/credits", add_account_credits, methods=["POST"]),
]
