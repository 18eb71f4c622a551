"""What an admin does to keys through the keys API (and the pages): make, change, rotate and
delete them, each in force at once and audited.

Every change is stored as a record in the ledger database and applied over api.yaml
(core/keys/records.py); the file itself is never written. A request is validated exactly as
api.yaml is, so the same mistake gets the same message in both places; a refused change
stores nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

from core.audit import CREATE_KEY, DELETE_KEY, ROTATE_KEY, UPDATE_KEY, Actor, AuditEntry
from core.config import API, FILE, ApiKey, Config, read_key_id
from core.config.reader import Section
from core.config.reload import ConfigStore
from core.config.yamlsource import ConfigError
from core.errors import GatewayError, bad_request, not_found
from core.keys.index import digest_of, mask_key
from core.keys.records import KeyRecord, RecordChange, RecordConflict, build_key, patched_record
from core.ledger import Ledger

SECRET_BYTES = 32  # 256 bits of randomness: 43 URL-safe characters after `sk-`
MAX_SECRET_LENGTH = 512
MAX_GRACE_SECONDS = 30 * 86400
IMMUTABLE = {"api": "rotate the key (POST /v1/api_keys/{id}/rotate) to change its secret", "id": "a key's id never changes"}


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(SECRET_BYTES)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def invalid_entry(exc: ConfigError) -> GatewayError:
    """400 naming the field, in api.yaml's words ("preferences.quota must be >= 0, got -5")."""
    return bad_request(exc.reason, "invalid_key_entry", exc.field)


def key_not_found(key_id: str) -> GatewayError:
    return not_found(f"No API key has the id '{key_id}'.", "key_not_found", "id")


def key_deleted(key_id: str) -> GatewayError:
    return GatewayError(409, "conflict_error", "key_deleted", f"The API key '{key_id}' was deleted; it cannot be changed.")


def _entry_of(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object: a key entry as in api.yaml.", "invalid_body")
    return dict(body)


def _validated(config: Config, key_id: str, entry: dict[str, Any], secret: str | None = None) -> ApiKey:
    try:
        return build_key(config, key_id, entry, secret=secret)
    except ConfigError as exc:
        raise invalid_entry(exc) from None


async def _store(store: ConfigStore, ledger: Ledger, key_id: str, change: RecordChange) -> None:
    """Store the change, then serve it here at once (other instances within a second)."""
    try:
        await ledger.change_key_record(key_id, change)
    except RecordConflict as exc:
        if exc.what == "secret":
            raise GatewayError(409, "conflict_error", "duplicate_key", "Another key already has this secret.", param="api") from None
        raise GatewayError(409, "conflict_error", "duplicate_key_id", f"Another key already has the id '{key_id}'.", param="id") from None
    store.apply_records(await ledger.key_records())


def _current(store: ConfigStore, key_id: str) -> ApiKey:
    key = store.current.keys_by_id.get(key_id)
    if key is None:
        raise key_deleted(key_id) if key_id in store.current.deleted_keys else key_not_found(key_id)
    return key


def _audit_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {"entry": jsonable(entry, fragments=False)}


async def create_key(store: ConfigStore, ledger: Ledger, body: Any, now: float, actor: Actor) -> tuple[str, ApiKey]:
    """Make a key from an api.yaml-shaped entry; (its secret, shown this once, and the key)."""
    entry = _entry_of(body)
    secret = entry.pop("api", None)
    if secret is None:
        secret = new_secret()
    elif not isinstance(secret, str) or not secret.strip() or secret != secret.strip() or len(secret) > MAX_SECRET_LENGTH:
        raise bad_request(f"'api' must be a non-empty secret without surrounding spaces, at most {MAX_SECRET_LENGTH} characters.", "invalid_key_entry", "api")
    config = store.current
    if entry.get("id") is not None:
        try:
            key_id = read_key_id(Section(entry, "api_keys", ""))
        except ConfigError as exc:
            raise invalid_entry(exc) from None
    else:
        key_id = new_key_id()
    entry.pop("id", None)
    _validated(config, key_id, entry)
    if key_id in config.keys_by_id or key_id in config.deleted_keys or key_id in store.file_config.keys_by_id:
        raise GatewayError(409, "conflict_error", "duplicate_key_id", f"Another key already has the id '{key_id}'.", param="id")
    if config.key_index.find(secret) is not None:
        raise GatewayError(409, "conflict_error", "duplicate_key", "Another key already has this secret.", param="api")
    digest, masked = digest_of(secret), mask_key(secret)

    def make(stored: KeyRecord | None) -> KeyRecord:
        if stored is not None:
            raise RecordConflict("id")
        return KeyRecord(key_id, API, entry, digest, masked, created_at=now, updated_at=now)

    await _store(store, ledger, key_id, make)
    key = _current(store, key_id)
    await ledger.append_audit(AuditEntry(now, actor, CREATE_KEY, key, {}, _audit_entry(key.entry), {"api": key.masked}))
    return secret, key


async def update_key(store: ConfigStore, ledger: Ledger, key_id: str, body: Any, now: float, actor: Actor, *, audited: bool = True) -> ApiKey:
    """Merge a partial entry into the key (JSON merge patch: `null` removes a setting).
    `audited=False`: the caller records the action in its own words."""
    patch = _entry_of(body)
    for name, why in IMMUTABLE.items():
        if name in patch:
            raise bad_request(f"'{name}' cannot be changed here: {why}.", "immutable_field", name)
    before = _current(store, key_id)
    config = store.current
    file_key = store.file_config.keys_by_id.get(key_id) if before.defined_in == FILE else None

    def change(stored: KeyRecord | None) -> KeyRecord:
        if stored is not None and stored.deleted_at is not None:
            raise key_deleted(key_id)
        if file_key is None and stored is None:
            raise key_not_found(key_id)
        secret = file_key.secret if file_key is not None else None
        file_entry = file_key.entry if file_key is not None else None
        return patched_record(
            stored,
            patch,
            file_entry,
            lambda entry: _validated(config, key_id, entry, secret),
            lambda changes: KeyRecord(key_id, FILE, changes, created_at=now, updated_at=now),
            now,
        )

    await _store(store, ledger, key_id, change)
    after = _current(store, key_id)
    if not audited:
        return after
    await ledger.append_audit(
        AuditEntry(now, actor, UPDATE_KEY, after, _audit_entry(before.entry), _audit_entry(after.entry), {"patch": jsonable(patch, fragments=False)})
    )
    return after


async def rotate_key(store: ConfigStore, ledger: Ledger, key_id: str, grace_seconds: int, now: float, actor: Actor) -> tuple[str, ApiKey]:
    """A new secret for the key; the old one stops working at once, or after `grace_seconds`.
    The id, and with it the balance, quota use, limits and history, stay."""
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise bad_request(f"'grace_seconds' must be a whole number from 0 to {MAX_GRACE_SECONDS}.", "invalid_grace_seconds", "grace_seconds")
    before = _current(store, key_id)
    secret = new_secret()
    digest, masked = digest_of(secret), mask_key(secret)

    def change(stored: KeyRecord | None) -> KeyRecord:
        if stored is not None and stored.deleted_at is not None:
            raise key_deleted(key_id)
        base = stored if stored is not None else KeyRecord(key_id, FILE, {}, created_at=now)
        previous = before.digest if grace_seconds else None
        return replace(
            base, digest=digest, masked=masked, previous_digest=previous, previous_until=now + grace_seconds if grace_seconds else 0.0, updated_at=now
        )

    await _store(store, ledger, key_id, change)
    after = _current(store, key_id)
    detail = {"grace_seconds": grace_seconds}
    await ledger.append_audit(AuditEntry(now, actor, ROTATE_KEY, after, {"api": before.masked}, {"api": after.masked}, detail))
    return secret, after


async def delete_key(store: ConfigStore, ledger: Ledger, key_id: str, now: float, actor: Actor) -> ApiKey:
    """The key's secret stops working at once; its history stays readable under its id."""
    before = _current(store, key_id)

    def change(stored: KeyRecord | None) -> KeyRecord:
        if stored is not None and stored.deleted_at is not None:
            raise key_deleted(key_id)
        base = stored if stored is not None else KeyRecord(key_id, FILE, {}, created_at=now)
        return replace(base, deleted_at=now, previous_digest=None, previous_until=0.0, updated_at=now)

    await _store(store, ledger, key_id, change)
    deleted = store.current.deleted_keys.get(key_id, before)
    await ledger.append_audit(AuditEntry(now, actor, DELETE_KEY, deleted, {"status": "active"}, {"status": "deleted"}))
    return deleted


def jsonable(value: Any, *, fragments: bool = True) -> Any:
    """An entry as JSON can carry it: dates as ISO text, and YAML's floats as plain decimals
    (never `1e-08`: as exact JSON numbers in answers, as strings in the audit log)."""
    if isinstance(value, dict):
        return {str(name): jsonable(item, fragments=fragments) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, fragments=fragments) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (float, Decimal)) and not isinstance(value, bool):
        text = format(Decimal(repr(value)) if isinstance(value, float) else value, "f")
        return orjson.Fragment(text.encode()) if fragments else text
    return value


def iso(ts: float | None) -> str | None:
    return None if not ts else datetime.fromtimestamp(ts, UTC).isoformat()
