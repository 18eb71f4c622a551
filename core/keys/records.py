"""Keys and accounts made and changed through the API, stored in the ledger database and
applied over api.yaml.

The rule, the same with one process and in a fleet: api.yaml is the operator's file, and the
keys API never rewrites it. A key made through the API lives in the database as a whole entry
(the shape of an api.yaml key entry); an API change to a key api.yaml defines (an edit, a
rotation, a deletion) is stored there too, as a JSON merge patch over the file's entry plus
the new secret's digest or the deletion time. Every load of the file, and every change of a
record, builds the config in force from both. Secrets are never stored: only their digests.

Accounts are stored and applied the same way (`AccountRecord`, by name), first: every key in
an account whose terms changed is built again, so it draws on the account's new terms.

A stored change that no longer fits the file (the operator removed a model the patch allows,
say) is not applied, and `GET /v1/config/status` says why: the file keeps working as written.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson

from core.config import ACCOUNT_ID_PREFIX, API, FILE, ApiKey, Config, read_account, read_key
from core.config.reader import Section
from core.config.yamlsource import ConfigError
from core.keys.index import KeyIndex

log = logging.getLogger("tollgate.keys")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    defined_in: str  # API: the whole key lives here; FILE: changes to api.yaml's key with this id
    entry: dict[str, Any]  # API: the key's entry; FILE: a JSON merge patch over the file's entry
    digest: bytes | None = field(default=None, repr=False)  # the secret the API chose (made or rotated)
    masked: str | None = None
    previous_digest: bytes | None = field(default=None, repr=False)  # the secret a rotation replaced,
    previous_until: float = 0.0  # valid until then (a grace period)
    deleted_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class AccountRecord:
    name: str
    defined_in: str  # API: the whole account lives here; FILE: changes to api.yaml's account of this name
    entry: dict[str, Any]  # API: the account's entry; FILE: a JSON merge patch over the file's entry
    deleted_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


KeyRecords = dict[str, KeyRecord]
RecordChange = Callable[[KeyRecord | None], KeyRecord]  # the stored record (None: none yet) → the new one
AccountRecords = dict[str, AccountRecord]
AccountChange = Callable[[AccountRecord | None], AccountRecord]


Patched = TypeVar("Patched", KeyRecord, AccountRecord)


def patched_record(
    stored: Patched | None,
    patch: dict[str, Any],
    file_entry: dict[str, Any] | None,
    validate: Callable[[dict[str, Any]], object],
    new: Callable[[dict[str, Any]], Patched],
    now: float,
) -> Patched:
    """A key's or account's record after a merge patch (the caller has refused a deleted or
    missing one). Made through the API (`file_entry` None): the whole entry is patched. Defined
    in api.yaml: the patch composes with the stored changes, validated over the file's entry."""
    if file_entry is None:
        assert stored is not None
        entry = merge_patch(stored.entry, patch)
        validate(entry)
        return replace(stored, entry=entry, updated_at=now)
    changes = compose_patches(stored.entry if stored is not None else {}, patch)
    validate(merge_patch(file_entry, changes))
    return new(changes) if stored is None else replace(stored, entry=changes, updated_at=now)


class RecordConflict(Exception):
    """Another record has this id, or this secret (`what`: "id" or "secret")."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386: `target` with `patch` applied (objects merge, `null` removes); a new object."""
    merged = copy.deepcopy(target)
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        elif isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = merge_patch(merged[name], value)
        elif isinstance(value, dict):
            merged[name] = merge_patch({}, value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def compose_patches(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One patch doing what `first` then `second` do (a `null` is kept: it removes a value
    the file sets)."""
    composed = copy.deepcopy(first)
    for name, value in second.items():
        if isinstance(value, dict) and isinstance(composed.get(name), dict):
            composed[name] = compose_patches(composed[name], value)
        else:
            composed[name] = copy.deepcopy(value)
    return composed


def build_key(config: Config, key_id: str, entry: dict[str, Any], *, secret: str | None = None, line: int | None = None) -> ApiKey:
    """A key from an entry, validated as api.yaml's are; ConfigError says which field is wrong."""
    providers = {provider.name: provider for provider in config.providers}
    section = Section(entry, "api_keys", "")
    return read_key(section, providers, config.routes, config.preferences, config.accounts, secret=secret, line=line, key_id=key_id, unserved=config.unserved)


def apply_record(config: Config, record: KeyRecord, file_key: ApiKey | None) -> ApiKey:
    """The key `record` says, over api.yaml's `file_key` (None for a key made by the API)."""
    if file_key is not None:
        entry = merge_patch(file_key.entry, record.entry) if record.entry else file_key.entry
        key = build_key(config, file_key.id, entry, secret=file_key.secret, line=file_key.line) if record.entry else file_key
    else:
        key = replace(build_key(config, record.id, record.entry), defined_in=API)
    if record.digest is not None:
        key = replace(key, secret=None, digest=record.digest, masked=record.masked or "…")
    if record.previous_digest is not None:
        key = replace(key, previous_digest=record.previous_digest, previous_until=record.previous_until)
    return key


def build_account(config: Config, entry: dict[str, Any], *, line: int | None = None) -> ApiKey:
    """An account from an entry, validated as api.yaml's are; ConfigError says which field is wrong."""
    return read_account(Section(entry, "accounts", ""), config.preferences, line)


class BuiltKeys:
    """Keys built from records, kept for the next layering: each admin change re-layers every
    record, and building 10,000 keys from their entries took 0.7 s of the event loop; with
    this, only the record that changed is built again. A key is reused while its record, the
    file's config and its account are the same."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[KeyRecord, Config, bool, ApiKey]] = {}

    def get(self, base: Config, config: Config, record: KeyRecord, deleted: bool) -> ApiKey | None:
        found = self.entries.get(record.id)
        if found is None or found[1] is not base or found[2] != deleted or found[0] != record:
            return None
        key = found[3]
        if key.account is not None and config.accounts.get(key.account.name, config.deleted_accounts.get(key.account.name)) != key.account:
            return None
        return key


def layered(config: Config, records: KeyRecords, accounts: AccountRecords | None = None, built: BuiltKeys | None = None) -> Config:
    """`config` (as api.yaml says) with the stored records applied; the same object when there
    are none. Accounts first (their keys are built again on their new terms); deleted keys
    move to `deleted_keys` (their history stays readable by id), and a record that cannot be
    applied is named in `key_problems`."""
    if not records and not accounts:
        if built is not None:
            built.entries = {}
        return config
    problems: dict[str, str] = {}
    base, built = config, built if built is not None else BuiltKeys()
    kept: dict[str, tuple[KeyRecord, Config, bool, ApiKey]] = {}

    def made(on: Config, record: KeyRecord, file_key: ApiKey | None, deleted: bool) -> ApiKey:
        key = built.get(base, on, record, deleted)
        if key is None:
            key = apply_record(on, record, file_key)
        kept[record.id] = (record, base, deleted, key)
        return key

    config = _with_accounts(config, accounts or {}, problems)
    # A deleted key may name a deleted account: built with every account, so its history stays readable.
    history = replace(config, accounts={**config.deleted_accounts, **config.accounts}) if config.deleted_accounts else config
    keys: list[ApiKey] = []
    deleted: dict[str, ApiKey] = {}
    for key in config.keys:
        record = records.get(key.id)
        if record is None:
            keys.append(key)
            continue
        if record.defined_in != FILE:
            problems[key.id] = f"api.yaml defines a key with the id '{key.id}', which a key made through the API has: api.yaml's is used"
            keys.append(key)
            continue
        is_deleted = record.deleted_at is not None
        try:
            changed = made(history if is_deleted else config, record, key, is_deleted)
        except ConfigError as exc:
            problems[key.id] = f"the change stored through the API no longer fits api.yaml: {exc.reason}"
            changed = key
        if is_deleted:
            deleted[key.id] = changed
        else:
            keys.append(changed)
    file_ids = {key.id for key in config.keys}
    for record in records.values():
        if record.defined_in != API or record.id in file_ids:
            continue
        try:
            key = made(history if record.deleted_at is not None else config, record, None, record.deleted_at is not None)
        except ConfigError as exc:
            problems[record.id] = f"the key made through the API no longer fits the config: {exc.reason}"
            continue
        if record.deleted_at is not None:
            deleted[key.id] = key
        else:
            keys.append(key)
    built.entries = kept
    for key_id, problem in problems.items():
        log.warning("stored change of %s not applied: %s", key_id, problem)
    all_keys = tuple(keys)
    by_id = {key.id: key for key in all_keys}
    return replace(config, keys=all_keys, key_index=KeyIndex(all_keys), keys_by_id=by_id, deleted_keys=deleted, key_problems=problems)


def _with_accounts(config: Config, records: AccountRecords, problems: dict[str, str]) -> Config:
    """`config` with the stored accounts applied, and api.yaml's keys in a changed account
    built again on its new terms (key records are applied over these afterwards)."""
    if not records:
        return config
    live, deleted = dict(config.accounts), {}
    for name, record in records.items():
        account = _account_of(config, record, problems)
        if account is None:
            continue
        if record.deleted_at is None:
            live[name] = account
            continue
        deleted[name] = account
        live.pop(name, None)
    for key in config.keys:  # the file's keys name the file's accounts: a deletion under them is not applied
        if key.account is not None and key.account.name in deleted:
            name = key.account.name
            problems[ACCOUNT_ID_PREFIX + name] = f"api.yaml has keys in account '{name}': its deletion through the API is not applied"
            live[name] = deleted.pop(name)
    changed = {name for name, account in live.items() if config.accounts.get(name) is not account}
    config = replace(config, accounts=live, deleted_accounts=deleted)
    if not changed:
        return config
    keys = tuple(_rebuilt(config, key, problems) if key.account is not None and key.account.name in changed else key for key in config.keys)
    return replace(config, keys=keys)


def _account_of(config: Config, record: AccountRecord, problems: dict[str, str]) -> ApiKey | None:
    """The account `record` says (over api.yaml's of that name, if any); None if there is
    nothing to apply."""
    file_account = config.accounts.get(record.name)
    problem_id = ACCOUNT_ID_PREFIX + record.name
    if file_account is None and record.defined_in != API:
        return None  # a change of an account api.yaml no longer has
    if file_account is not None and record.defined_in != FILE:
        problems[problem_id] = f"api.yaml defines an account named '{record.name}', which an account made through the API has: api.yaml's is used"
        return file_account
    try:
        if file_account is None:
            return replace(build_account(config, record.entry), defined_in=API)
        return build_account(config, merge_patch(file_account.entry, record.entry), line=file_account.line) if record.entry else file_account
    except ConfigError as exc:
        problems[problem_id] = f"the account's stored change no longer fits the config: {exc.reason}"
        return file_account


def _rebuilt(config: Config, key: ApiKey, problems: dict[str, str]) -> ApiKey:
    """api.yaml's key built again from its entry, on its account's terms in `config`."""
    try:
        return build_key(config, key.id, key.entry, secret=key.secret, line=key.line)
    except ConfigError as exc:
        problems[key.id] = f"the key no longer fits its account's stored change: {exc.reason}"
        return key


# --- storage: the same table in both ledgers (SQLite's `?` placeholders; PgLedger numbers them) ---

RECORD_COLUMNS = ("id", "defined_in", "entry", "digest", "masked", "previous_digest", "previous_until", "deleted_at", "created_at", "updated_at")
SELECT_RECORDS = f"SELECT {', '.join(RECORD_COLUMNS)} FROM api_keys"
INSERT_RECORD = f"INSERT INTO api_keys ({', '.join(RECORD_COLUMNS)}) VALUES ({', '.join('?' for _ in RECORD_COLUMNS)})"
UPDATE_RECORD = f"UPDATE api_keys SET {', '.join(f'{name} = ?' for name in RECORD_COLUMNS[1:])} WHERE id = ?"


def record_row(record: KeyRecord) -> tuple[Any, ...]:
    """The record in RECORD_COLUMNS order (the entry as JSON text)."""
    entry = orjson.dumps(record.entry).decode()
    return (record.id, record.defined_in, entry, record.digest, record.masked, record.previous_digest, record.previous_until,
            record.deleted_at, record.created_at, record.updated_at)  # fmt: skip


def update_params(record: KeyRecord) -> tuple[Any, ...]:
    """UPDATE_RECORD's parameters: every column but the id, then the id."""
    row = record_row(record)
    return (*row[1:], row[0])


def record_from_row(row: Any) -> KeyRecord:
    values = list(row)
    values[2] = orjson.loads(values[2])
    for index in (3, 5):  # digests: bytes from SQLite's BLOB and PostgreSQL's BYTEA alike
        values[index] = bytes(values[index]) if values[index] is not None else None
    return KeyRecord(*values)


ACCOUNT_COLUMNS = ("name", "defined_in", "entry", "deleted_at", "created_at", "updated_at")
SELECT_ACCOUNTS = f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM api_accounts"
INSERT_ACCOUNT = f"INSERT INTO api_accounts ({', '.join(ACCOUNT_COLUMNS)}) VALUES ({', '.join('?' for _ in ACCOUNT_COLUMNS)})"
UPDATE_ACCOUNT = f"UPDATE api_accounts SET {', '.join(f'{name} = ?' for name in ACCOUNT_COLUMNS[1:])} WHERE name = ?"


def account_row(record: AccountRecord) -> tuple[Any, ...]:
    """The record in ACCOUNT_COLUMNS order (the entry as JSON text)."""
    return (record.name, record.defined_in, orjson.dumps(record.entry).decode(), record.deleted_at, record.created_at, record.updated_at)


def account_update_params(record: AccountRecord) -> tuple[Any, ...]:
    """UPDATE_ACCOUNT's parameters: every column but the name, then the name."""
    row = account_row(record)
    return (*row[1:], row[0])


def account_from_row(row: Any) -> AccountRecord:
    values = list(row)
    values[2] = orjson.loads(values[2])
    return AccountRecord(*values)
