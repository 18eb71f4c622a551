"""Admin billing API: key states, top-ups, billing mode, usage reports."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import admin_actions
from core.admin_actions import add_credit
from core.audit import Actor
from core.billing import BillingMeter
from core.config import ApiKey, Config
from core.config.reload import ConfigStore
from core.errors import bad_request, forbidden, not_found
from core.keys.states import key_state, key_states, usage_rows
from core.keys.uniapi_usage import DEFAULT_DAYS, uniapi_token_usage
from core.ledger import COUNT_CREDITS, CREDITS
from core.money_format import usd_json
from core.pricing.listing import price_rows
from core.timeutil import to_unix
from core.usage import Usage
from routes._http import authenticate, caller_ip, current_config, read_json, require_admin, whole_number
from routes._json import ExactJSONResponse


def _actor(request: Request, config: Config) -> Actor:
    """The admin calling (403 for anyone else), as the audit log records them."""
    return Actor.of(require_admin(request, config), caller_ip(request, config))


def _paid_key(request: Request, config: Config) -> ApiKey:
    secret = request.query_params.get("paid_key")
    if not secret:
        raise bad_request("The 'paid_key' parameter is required.", "missing_paid_key", "paid_key")
    key = config.key_index.find(secret)
    if key is None:
        raise not_found("No API key matches 'paid_key'.", "key_not_found", "paid_key")
    return key


async def api_keys_states(request: Request) -> Response:
    config = current_config(request)
    require_admin(request, config)
    states = await key_states(config, request.app.state.ledger, list(config.keys))
    # uni-api's shape, keyed by secret; a key whose secret is not known (made or rotated
    # through the keys API: only its digest is stored) appears under its id.
    keyed = {key.secret or key.id: states[key.id] for key in config.keys}
    return ExactJSONResponse({"api_keys_states": keyed, "model_prices": price_rows(config.preferences.prices)})


def _grant_endpoint(kind: str):  # type: ignore[no-untyped-def]
    async def handle(request: Request) -> Response:
        config = current_config(request)
        actor = _actor(request, config)
        key = _paid_key(request, config)
        ledger = request.app.state.ledger
        amount = request.query_params.get("amount", "")
        state = request.app.state
        idempotency_key = request.headers.get("idempotency-key") or None
        applied = await add_credit(ledger, key, kind, amount, request.query_params.get("reason"), idempotency_key, state.clock(), actor, state.alerts)
        key_state_now = await key_state(config, ledger, key)
        # uni-api's answer names the new total (`new_credits`; its count-billing guide's script reads `new_count_credits`)
        new_total = {"new_count_credits": key_state_now["count_credits"]} if kind == COUNT_CREDITS else {"new_credits": key_state_now["credits"]}
        return ExactJSONResponse({"applied": applied, **new_total, "api_key_state": key_state_now})

    handle.__name__ = f"add_{kind}"
    return handle


async def set_billing_mode(request: Request) -> Response:
    config = current_config(request)
    actor = _actor(request, config)
    key = _paid_key(request, config)
    store: ConfigStore = request.app.state.store
    state = request.app.state
    updated = await admin_actions.set_billing_mode(store, state.ledger, key, request.query_params.get("billing_mode", ""), state.clock(), actor)
    return ExactJSONResponse({"api_key_state": await key_state(store.current, request.app.state.ledger, updated)})


MAX_DAYS = 36_500  # a century: timedelta itself stops at 999,999,999 days
_UNIX_TIME = re.compile(r"\d{1,12}(\.\d{1,6})?")
FORMATS = ("tollgate", "uniapi")


def _time_range(request: Request) -> tuple[float | None, float | None]:
    params = request.query_params
    start = _datetime_param(params.get("start_datetime"), "start_datetime")
    end = _datetime_param(params.get("end_datetime"), "end_datetime")
    last = params.get("last_n_days")
    if last is not None:
        days = whole_number(last)
        if days is None or not 0 < days <= MAX_DAYS:
            raise bad_request(f"The 'last_n_days' parameter must be a whole number from 1 to {MAX_DAYS}, got '{last}'.", "invalid_last_n_days", "last_n_days")
        start = time.time() - timedelta(days=days).total_seconds()
    return start, end


def _datetime_param(raw: str | None, name: str) -> float | None:
    """ISO 8601, or a Unix timestamp as uni-api also accepts."""
    if not raw:
        return None
    try:
        return float(raw) if _UNIX_TIME.fullmatch(raw.strip()) else to_unix(raw)
    except ValueError:
        raise bad_request(f"The '{name}' parameter must be an ISO 8601 time, got '{raw}'.", f"invalid_{name}", name) from None


async def token_usage(request: Request) -> Response:
    """Usage per key and model. Admins may ask about any key (or all); others only themselves.
    `?format=uniapi` answers in uni-api's shape (core/keys/uniapi_usage.py)."""
    config = current_config(request)
    caller = authenticate(request, config)
    answer_format = request.query_params.get("format") or FORMATS[0]
    if answer_format not in FORMATS:
        raise bad_request(f"The 'format' parameter must be one of {', '.join(FORMATS)}, got '{answer_format}'.", "invalid_format", "format")
    asked = request.query_params.get("api_key_param")
    if asked:
        target = config.key_index.find(asked)
        if target is None or (target is not caller and not caller.is_admin):
            if not caller.is_admin:
                raise forbidden("A non-admin key may only read its own usage.", "not_your_key")
            raise not_found("No API key matches 'api_key_param'.", "key_not_found", "api_key_param")
        keys = [target]
    else:
        keys = [*config.keys, *config.deleted_keys.values()] if caller.is_admin else [caller]  # a deleted key's history stays readable
    start, end = _time_range(request)
    model = request.query_params.get("model") or None
    ledger = request.app.state.ledger
    if answer_format == "uniapi":
        window = _uniapi_window(request, start, end)
        single = keys[0] if asked or not caller.is_admin else None
        key_filter = keys[0].masked if asked else ("all" if caller.is_admin else "self")  # uni-api echoes the secret; never here
        return ExactJSONResponse(await uniapi_token_usage(config, ledger, keys, window, model, key_filter, single))
    states = await key_states(config, ledger, keys)
    stats = []
    for key in keys:
        state = states[key.id]
        since = max(start or 0.0, key.billing.created_at)
        stats.append(
            {
                "api_key": key.masked,
                "name": key.name,
                "billing_mode": state["billing_mode"],
                "credits": state["credits"],
                "remaining_credits": state["remaining_credits"],
                "remaining_count_credits": state["remaining_count_credits"],
                "total_cost": state["total_cost"],
                "usage": await usage_rows(ledger, key, since, end, model),
            }
        )
    return ExactJSONResponse({"stats": stats})


def _uniapi_window(request: Request, start: float | None, end: float | None) -> tuple[float | None, float | None]:
    """uni-api's window: `last_n_days` and no times at all (its last 30 days) end now."""
    params = request.query_params
    now = request.app.state.clock()
    if params.get("last_n_days") is not None:
        return start, now
    if not params.get("start_datetime") and not params.get("end_datetime"):
        return now - timedelta(days=DEFAULT_DAYS).total_seconds(), now
    return start, end


async def report_usage(request: Request) -> Response:
    """Record usage that happened outside the gateway, billed by the same rules."""
    config = current_config(request)
    actor = _actor(request, config)
    body = await read_json(request, config.preferences.max_request_body_bytes)
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", "invalid_body")
    key = config.key_index.find(str(body.get("api_key") or ""))
    if key is None:
        raise not_found("No API key matches 'api_key'.", "key_not_found", "api_key")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field is required.", "missing_model", "model")
    usage = Usage(
        _whole(body, "prompt_tokens"),
        _whole(body, "completion_tokens"),
        _whole(body, "cached_tokens"),
        images=_whole(body, "images"),
        audio_ms=_whole(body, "audio_ms"),
        characters=_whole(body, "characters"),
    )
    meter: BillingMeter = request.app.state.gateway.meter
    provider = str(body.get("provider") or "external")
    cost_nanos = await admin_actions.report_usage(meter, config, key, model, usage, provider, request.app.state.clock(), actor)
    return ExactJSONResponse({"cost": usd_json(cost_nanos), "api_key_state": await key_state(config, request.app.state.ledger, key)})


def _whole(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 10**12:
        raise bad_request(f"The '{name}' field must be a non-negative whole number.", f"invalid_{name}", name)
    return value


routes = [
    Route("/v1/api_keys_states", api_keys_states, methods=["GET"]),
    Route("/v1/add_credits", _grant_endpoint(CREDITS), methods=["POST"]),
    Route("/v1/add_count_credits", _grant_endpoint(COUNT_CREDITS), methods=["POST"]),
    Route("/v1/set_billing_mode", set_billing_mode, methods=["POST"]),
    Route("/v1/token_usage", token_usage, methods=["GET"]),
    Route("/v1/usage/report", report_usage, methods=["POST"]),
]
