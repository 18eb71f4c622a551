"""The usage page's keys of the holder's account (self-service keys): what the section shows.

Only for a key of an account with `preferences.self_service_keys: true`; the forms it holds
post to routes/web_usage_keys.py."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from core import statements
from core.config import ApiKey, Config
from core.keys.self_service import in_account
from core.ledger import Account, Ledger
from routes.web_views import limit_rows


async def account_keys_section(request: Request, config: Config, me: ApiKey, **shown: Any) -> dict[str, Any] | None:
    """The section's rows, or None when `me` may not manage keys. `shown`: what a form just
    did (`new_key`: its name and secret, shown this once; `error`: why nothing was made)."""
    account = me.account
    if me.is_admin or account is None or not account.self_service_keys:
        return None
    keys = [key for key in config.keys if in_account(key, account)]
    ledger: Ledger = request.app.state.ledger
    balances = await ledger.accounts([(key.id, key.billing) for key in keys])
    now = request.app.state.clock()
    return {"account": account.name, "rows": [_row(key, balances[key.id], me, now) for key in keys], "notice": _notice(request, config, account), **shown}


def _notice(request: Request, config: Config, account: ApiKey) -> str | None:
    """What the last form did, from the URL it returned to (a key's id, never a secret)."""
    params = request.query_params
    revoked = config.deleted_keys.get(params.get("revoked") or "")
    if revoked is not None and in_account(revoked, account):
        return f"Key '{revoked.name}' revoked: it no longer works."
    made = config.keys_by_id.get(params.get("made") or "") or config.deleted_keys.get(params.get("made") or "")
    if made is not None and in_account(made, account):
        return f"Key '{made.name}' was already made by this form; its secret was shown then, once."
    return None


def _row(key: ApiKey, balance: Account, me: ApiKey, now: float) -> dict[str, Any]:
    limits = key.limits
    if not limits.enabled:
        status = "disabled"
    elif limits.expires_at is not None and now >= limits.expires_at:
        status = "expired"
    else:
        status = "active"
    quota = statements.quota_use(key, balance)
    return {
        "id": key.id,
        "name": key.name,
        "masked": key.masked,
        "status": status,
        "quota": limit_rows([quota])[0] if quota is not None else None,
        "is_me": key.id == me.id,
        "revocable": key.id != me.id and not key.is_admin,  # (revoking the key you are using would log you out)
    }
