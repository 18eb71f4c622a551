"""What an admin does to accounts through the accounts API: make, change and delete them, each
in force at once and audited.

Accounts are stored as keys are (core/keys/records.py): one made through the API lives in the
ledger database as a whole entry (the shape of an api.yaml account entry); an API change to an
account api.yaml defines is stored as a JSON merge patch over the file's entry. Either way every
key in the account is built again on its new terms, so a top-up of the terms (new credits, say)
is in force for all of them at once. Top-ups (grants) stay in the ledger, as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from core.audit import CREATE_ACCOUNT, DELETE_ACCOUNT, UPDATE_ACCOUNT, Actor, AuditEntry
from core.config import API, FILE, ApiKey, Config
from core.config.reload import ConfigStore
from core.config.yamlsource import ConfigError
from core.errors import GatewayError, bad_request, not_found
from core.keys.admin import jsonable
from core.keys.records import AccountChange, AccountRecord, build_account, patched_record
from core.ledger import Ledger


def account_not_found(name: str) -> GatewayError:
    return not_found(f"No account is named '{name}'.", "account_not_found", "name")


def account_deleted(name: str) -> GatewayError:
    return GatewayError(409, "conflict_error", "account_deleted", f"The account '{name}' was deleted; it cannot be changed.")


def duplicate_account(name: str) -> GatewayError:
    message = f"An account named '{name}' exists or existed (a deleted account's history keeps its name)."
    return GatewayError(409, "conflict_error", "duplicate_account", message, param="name")


def _entry_of(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object: an account entry as in api.yaml.", "invalid_body")
    return dict(body)


def _validated(store: ConfigStore, entry: dict[str, Any]) -> ApiKey:
    """The account an entry makes, validated as api.yaml's (400 naming the field)."""
    config = store.current
    try:
        account = build_account(config, entry)
    except ConfigError as exc:
        raise bad_request(exc.reason, "invalid_account_entry", exc.field) from None
    return account


def current_account(config: Config, name: str) -> ApiKey:
    """A live account by name: 404 if there is none, 409 if it was deleted."""
    account = config.accounts.get(name)
    if account is None:
        raise account_deleted(name) if name in config.deleted_accounts else account_not_found(name)
    return account


def keys_in(config: Config, name: str) -> list[ApiKey]:
    """The live keys drawing on the account."""
    return [key for key in config.keys if key.account is not None and key.account.name == name]


async def _store(store: ConfigStore, ledger: Ledger, name: str, change: AccountChange) -> None:
    """Store the change, then serve it here at once (other instances within a second)."""
    await ledger.change_account_record(name, change)
    store.apply_records(await ledger.key_records(), await ledger.account_records())


def _audit_entry(account: ApiKey) -> dict[str, Any]:
    return {"entry": jsonable(account.entry, fragments=False)}


async def create_account(store: ConfigStore, ledger: Ledger, body: Any, now: float, actor: Actor) -> ApiKey:
    """Make an account from an api.yaml-shaped entry (`{"name": "acme", "preferences": {...}}`)."""
    entry = _entry_of(body)
    config = store.current
    name = _validated(store, entry).name
    if name in config.accounts or name in config.deleted_accounts or name in store.file_config.accounts:
        raise duplicate_account(name)

    def make(stored: AccountRecord | None) -> AccountRecord:
        if stored is not None and (stored.defined_in == API or name in store.file_config.accounts):
            raise duplicate_account(name)
        return AccountRecord(name, API, entry, created_at=now, updated_at=now)  # (a stale change of a removed file account is replaced)

    await _store(store, ledger, name, make)
    made = current_account(store.current, name)
    await ledger.append_audit(AuditEntry(now, actor, CREATE_ACCOUNT, made, {}, _audit_entry(made)))
    return made


async def update_account(store: ConfigStore, ledger: Ledger, name: str, body: Any, now: float, actor: Actor) -> ApiKey:
    """Merge a partial entry into the account (JSON merge patch: `null` removes a setting); its
    keys draw on the new terms at once."""
    patch = _entry_of(body)
    if patch.get("name", name) != name:
        raise bad_request("'name' cannot be changed: an account's name is its id in the ledger and in its keys' entries.", "immutable_field", "name")
    patch.pop("name", None)
    before = current_account(store.current, name)
    file_account = store.file_config.accounts.get(name) if before.defined_in == FILE else None

    def change(stored: AccountRecord | None) -> AccountRecord:
        if stored is not None and stored.deleted_at is not None:
            raise account_deleted(name)
        if file_account is None and stored is None:
            raise account_not_found(name)
        file_entry = file_account.entry if file_account is not None else None
        return patched_record(
            stored,
            patch,
            file_entry,
            lambda entry: _validated(store, entry),
            lambda changes: AccountRecord(name, FILE, changes, created_at=now, updated_at=now),
            now,
        )

    await _store(store, ledger, name, change)
    after = current_account(store.current, name)
    detail = {"patch": jsonable(patch, fragments=False)}
    await ledger.append_audit(AuditEntry(now, actor, UPDATE_ACCOUNT, after, _audit_entry(before), _audit_entry(after), detail))
    return after


async def delete_account(store: ConfigStore, ledger: Ledger, name: str, now: float, actor: Actor) -> ApiKey:
    """Delete an account no live key draws on (409 `account_in_use` otherwise); its history
    stays readable, and its name stays taken."""
    before = current_account(store.current, name)

    def change(stored: AccountRecord | None) -> AccountRecord:
        if stored is not None and stored.deleted_at is not None:
            raise account_deleted(name)
        in_use = keys_in(store.current, name)  # again, as late as can be: a key may have joined it meanwhile
        if in_use:
            names = ", ".join(f"'{key.name}'" for key in in_use[:5]) + (", ..." if len(in_use) > 5 else "")
            message = f"The account '{name}' still has {len(in_use)} live key(s) ({names}): delete them or move them to another account first."
            raise GatewayError(409, "conflict_error", "account_in_use", message, param="name")
        base = stored if stored is not None else AccountRecord(name, FILE, {}, created_at=now)
        return replace(base, deleted_at=now, updated_at=now)

    await _store(store, ledger, name, change)
    deleted = store.current.deleted_accounts.get(name, before)
    await ledger.append_audit(AuditEntry(now, actor, DELETE_ACCOUNT, deleted, {"status": "active"}, {"status": "deleted"}))
    return deleted
