"""What an admin can do to a key, shared by the admin API and the web pages."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from pathlib import Path

from core.alerts import Alerts
from core.audit import ADD_COUNT_CREDITS, ADD_CREDITS, REPORT_USAGE, SET_BILLING_MODE, Actor, AuditEntry, balance
from core.billing import BillingMeter, check_window_open
from core.config import FILE, ApiKey, Config
from core.config.billing import BILLING_MODES
from core.config.reload import ConfigStore, ReloadError
from core.config.writer import ConfigChangedError, ConfigWriteError, set_key_preference
from core.config.yamlsource import ConfigError
from core.errors import GatewayError, bad_request
from core.keys.admin import update_key
from core.ledger import COUNT_CREDITS, CREDITS, Grant, Ledger
from core.pricing import format_usd, to_nanos
from core.usage import Usage

MAX_AMOUNT = Decimal(10) ** 9
MAX_IDEMPOTENCY_KEY = 200
MAX_REASON = 500


# Plain ASCII decimals only: Decimal() also reads '1_000', exponents and any script's digits.
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_amount(raw: str, kind: str) -> Decimal:
    """A top-up amount: a positive number of USD, or a positive whole number of count credits,
    written as plain ASCII digits with an optional decimal point (the API and the page form)."""
    whole = kind == COUNT_CREDITS
    text = raw.strip() if isinstance(raw, str) else ""
    amount = Decimal(text) if _PLAIN_DECIMAL.fullmatch(text) else Decimal("NaN")
    if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT or (whole and amount != amount.to_integral_value()):
        what = "a positive whole number" if whole else "a positive number"
        raise bad_request(f"The 'amount' parameter must be {what} (at most 1e9), got '{raw}'.", "invalid_amount", "amount")
    if not whole and to_nanos(amount) <= 0:
        raise bad_request(f"The 'amount' parameter is below the smallest unit (1e-9 USD), got '{raw}'.", "invalid_amount", "amount")
    return amount


async def add_credit(
    ledger: Ledger,
    key: ApiKey,
    kind: str,
    raw_amount: str,
    reason: str | None,
    idempotency_key: str | None,
    now: float,
    actor: Actor,
    alerts: Alerts | None = None,
) -> bool:
    """Grant USD credits or count credits; False when the idempotency key was used before.
    A key in an account has no balance of its own to raise (409 `key_in_account`). A top-up that lifts the key back under an alert threshold re-arms that alert. Audited."""
    if kind not in (CREDITS, COUNT_CREDITS):
        raise bad_request(f"Unknown credit kind '{kind}'.", "invalid_kind")
    if key.account is not None:  # its balance is the account's: a grant to the key would never count
        raise key_in_account(key, key.account)
    amount = parse_amount(raw_amount, kind)
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise bad_request(f"The Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters.", "invalid_idempotency_key")
    check_window_open(key.billing, now, 409)  # a grant before it would be written yet never count
    units = to_nanos(amount) if kind == CREDITS else int(amount)
    grant = Grant(key.id, kind, units, (reason or "admin top-up")[:MAX_REASON], idempotency_key, now)
    account = await ledger.account(key.id, key.billing)
    before = balance(key, account)
    applied = await ledger.grant(grant, key.billing)
    if alerts is not None:
        alerts.check(key, account)
    shown = format_usd(units) if kind == CREDITS else str(units)  # what was granted, in plain digits (str(Decimal) wrote 1E-7)
    detail = {"amount": shown, "reason": grant.reason, "idempotency_key": idempotency_key, "applied": applied}
    action = ADD_CREDITS if kind == CREDITS else ADD_COUNT_CREDITS
    await ledger.append_audit(AuditEntry(now, actor, action, key, before, balance(key, account), detail))
    return applied


def key_in_account(key: ApiKey, account: ApiKey) -> GatewayError:
    """409 `key_in_account`: the key spends its account's balance, which is what a top-up raises."""
    message = f"The key '{key.name}' draws on the balance of account '{account.name}': top up the account (POST /v1/accounts/{account.name}/credits)."
    return GatewayError(409, "conflict_error", "key_in_account", message)


async def set_billing_mode(store: ConfigStore, ledger: Ledger, key: ApiKey, mode: str, now: float, actor: Actor) -> ApiKey:
    """Set a key's billing mode and apply it; the updated key. Audited.

    uni-api's endpoint writes api.yaml, and so does this one for a key api.yaml defines, on
    one process, while the file's secret is the key's and no API change sets its mode: that
    one value is rewritten, atomically. A file that does not load is not touched: 409
    `config_invalid` says where it is wrong; one saved by someone else during the edit
    neither: 409 `config_changed`. Every other key (made or changed through the keys API, or
    in a fleet, where each instance has its own copy of the file) gets the mode the keys API's
    way: stored in the database over the file (core/keys/records.py)."""
    if mode not in BILLING_MODES:
        raise bad_request(f"The 'billing_mode' parameter must be one of {', '.join(BILLING_MODES)}, got '{mode}'.", "invalid_billing_mode", "billing_mode")
    record = store.records.get(key.id)
    changed_by_api = record is not None and (record.digest is not None or "billing_mode" in (record.entry.get("preferences") or {}))
    if ledger.shared or key.defined_in != FILE or key.secret is None or changed_by_api:
        before = store.current.keys_by_id.get(key.id, key)
        updated = await update_key(store, ledger, key.id, {"preferences": {"billing_mode": mode}}, now, actor, audited=False)
        entry = AuditEntry(
            now, actor, SET_BILLING_MODE, updated, {"billing_mode": before.billing.mode}, {"billing_mode": updated.billing.mode, "stored_in": "database"}
        )
        await ledger.append_audit(entry)
        return updated
    async with store.edit_lock:  # one edit at a time: each rewrites the file from the text it read
        before = await _reloaded_key(store, key)
        try:  # parsing a large file takes a while: not on the event loop
            await asyncio.to_thread(set_key_preference, store.path, key.secret, "billing_mode", mode)
        except ConfigError as exc:  # broken between the reload and the write
            raise config_invalid(exc) from None
        except ConfigChangedError as exc:
            raise GatewayError(409, "conflict_error", "config_changed", str(exc)) from None
        except ConfigWriteError as exc:
            raise GatewayError(409, "conflict_error", "config_not_writable", f"Could not update the config file: {exc}") from None
        updated = await _reloaded_key(store, key)
    entry = AuditEntry(now, actor, SET_BILLING_MODE, updated, {"billing_mode": before.billing.mode}, {"billing_mode": updated.billing.mode})
    await ledger.append_audit(entry)
    return updated


async def _reloaded_key(store: ConfigStore, key: ApiKey) -> ApiKey:
    """`key` as the file says now (an edit made since the last reload is looked at, not lost)."""
    await store.reload()
    if store.last_error is not None:
        raise config_invalid(store.last_error)
    found = store.current.keys_by_id.get(key.id)
    if found is None:
        raise GatewayError(409, "conflict_error", "key_removed", "The key is no longer in the config.")
    return found


def config_invalid(error: ConfigError | ReloadError) -> GatewayError:
    """409 `config_invalid`: "api.yaml has an error at line L, column C: reason; fix it first"."""
    return GatewayError(409, "conflict_error", "config_invalid", config_error_message(error))


def config_error_message(error: ConfigError | ReloadError) -> str:
    """Where the config file is wrong, in a sentence for an admin (API answer and page)."""
    where = f" at line {error.line}" if error.line else ""
    if where and error.column:
        where += f", column {error.column}"
    return f"{Path(error.file).name} has an error{where}: {error.reason}; fix it first"


async def report_usage(meter: BillingMeter, config: Config, key: ApiKey, model: str, usage: Usage, provider: str, now: float, actor: Actor) -> int:
    """Charge usage that happened outside the gateway (billed by the same rules); its cost. Audited."""
    ledger = meter.ledger
    account = await ledger.account(key.id, key.billing)
    before = balance(key, account)
    cost_nanos = await meter.record_external(config, key, model, usage, provider)
    detail = {"model": model, "provider": provider, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
              "cached_tokens": usage.cached_tokens, "cost": format_usd(cost_nanos)}  # fmt: skip
    detail.update({unit: getattr(usage, unit) for unit in ("images", "audio_ms", "characters") if getattr(usage, unit)})
    await ledger.append_audit(AuditEntry(now, actor, REPORT_USAGE, key, before, balance(key, account), detail))
    return cost_nanos
