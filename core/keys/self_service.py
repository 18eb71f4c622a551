"""Key holders making keys (the sub2api flow): an account with `preferences.self_service_keys:
true` lets its own non-admin keys make, list, read and revoke keys in it.

Never more than an admin gave them: a key they make is in their account (so it draws on the
same balance, which only admins top up), is never an admin, uses no model the maker's key may
not use, and sets only its own name, models and limits (a quota, rate limits, an expiry). Keys
of other accounts do not exist for them (404, as for an id no key has).
"""

from __future__ import annotations

import copy
from typing import Any

from core.config import KEY_KEYS, KEY_PREFERENCE_KEYS, ApiKey, Config
from core.config.yamlsource import ConfigError
from core.errors import GatewayError, bad_request, forbidden
from core.keys.admin import invalid_entry, key_not_found
from core.keys.records import build_key

HOLDER_FIELDS = ("name", "role", "account", "model", "preferences")
HOLDER_PREFERENCES = (
    "enabled", "expires_at", "allowed_ips", "allowed_clients", "quota", "quota_type", "rate_limit", "token_rate_limit", "concurrency_limit",
    "daily_cost_limit", "weekly_cost_limit", "monthly_cost_limit", "budget", "budget_period", "timezone",
)  # fmt: skip


def managed_account(caller: ApiKey) -> ApiKey:
    """The account whose keys `caller` (not an admin) may manage; 403 when it may manage none."""
    account = caller.account
    if account is None:
        raise forbidden("This endpoint needs an admin key.", "admin_required")
    if not account.self_service_keys:
        message = f"Account '{account.name}' does not let its keys make or revoke keys (an admin can allow it: preferences.self_service_keys)."
        raise forbidden(message, "self_service_disabled")
    return account


def in_account(key: ApiKey, account: ApiKey) -> bool:
    return key.account is not None and key.account.name == account.name


def holder_entry(config: Config, caller: ApiKey, account: ApiKey, body: Any) -> dict[str, Any]:
    """The entry of the key a holder asks for, put in their account (its models, when it names
    none, are the maker's); 403 for anything only an admin may give, 400 for a wrong value."""
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object: a key entry as in api.yaml.", "invalid_body")
    entry = copy.deepcopy(body)
    for name in entry:
        if name in KEY_KEYS and name not in HOLDER_FIELDS:
            raise _admin_only(name)
    if entry.get("role") == "admin":
        raise _admin_only("role")
    if entry.setdefault("account", account.name) != account.name:
        raise _refused(f"A key you make is always in your own account ('{account.name}').", "not_your_account", "account")
    preferences = entry.get("preferences")
    for name in preferences if isinstance(preferences, dict) else ():
        if name in KEY_PREFERENCE_KEYS and name not in HOLDER_PREFERENCES:
            raise _admin_only(f"preferences.{name}")
    if "model" not in entry and "model" in caller.entry:
        entry["model"] = copy.deepcopy(caller.entry["model"])
    try:
        key = build_key(config, "self-service", entry)
    except ConfigError as exc:
        raise invalid_entry(exc) from None
    _check_models(config, caller, key)
    return entry


def _check_models(config: Config, caller: ApiKey, key: ApiKey) -> None:
    for routes in config.routes.values():
        for route in routes:
            if key.access.allows(route) and not caller.access.allows(route):
                message = f"Your key may not use '{route.label}', so a key you make may not either."
                raise _refused(message, "model_not_allowed", "model")


def _admin_only(field: str) -> GatewayError:
    return _refused(f"Only an admin may set '{field}' on a key; yours may set its name, models (within your own) and limits.", "admin_required", field)


def _refused(message: str, code: str, param: str) -> GatewayError:
    return GatewayError(403, "permission_error", code, message, param=param)


def holder_target(config: Config, account: ApiKey, key_id: str) -> ApiKey:
    """A key of the holder's account by id, live or deleted; 404 for any other (another
    account's keys are not told apart from ids no key has)."""
    key = config.keys_by_id.get(key_id) or config.deleted_keys.get(key_id)
    if key is None or not in_account(key, account):
        raise key_not_found(key_id)
    return key


def check_holder_may_delete(key: ApiKey) -> None:
    if key.is_admin:
        raise forbidden("Only an admin may delete an admin key.", "admin_required")
