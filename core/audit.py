"""The audit trail: every admin action, who did it, from where, and what changed.

Rows go to the `audit_log` table, which its triggers make append-only. Amounts are
recorded as exact decimal strings, never floats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.config import ApiKey
from core.ledger import Account
from core.money_format import count_text, usd_text
from core.pricing import format_usd, to_nanos
from core.units_format import units_text

LOGIN = "login"
ADD_CREDITS = "add_credits"
ADD_COUNT_CREDITS = "add_count_credits"
SET_BILLING_MODE = "set_billing_mode"
REPORT_USAGE = "report_usage"
CREATE_KEY, UPDATE_KEY, ROTATE_KEY, DELETE_KEY = "create_key", "update_key", "rotate_key", "delete_key"
CREATE_ACCOUNT, UPDATE_ACCOUNT, DELETE_ACCOUNT = "create_account", "update_account", "delete_account"


@dataclass(frozen=True, slots=True)
class Actor:
    """The admin behind an action: the key's name (never the key), its id, the address."""

    name: str
    key_id: str
    address: str | None

    @classmethod
    def of(cls, key: ApiKey, address: str | None) -> Actor:
        return cls(key.name, key.id, address)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    actor: Actor
    action: str
    target: ApiKey | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> tuple[Any, ...]:
        """In the column order of core.ledger.sqlite's audit insert."""
        target = self.target
        return (
            self.ts,
            self.actor.name,
            self.actor.key_id,
            self.actor.address,
            self.action,
            target.id if target else None,
            target.name if target else None,
            _json(self.before),
            _json(self.after),
            _json(self.detail),
        )


def balance(key: ApiKey, account: Account) -> dict[str, Any]:
    """What a top-up or a charge changes, as exact strings."""
    remaining = account.remaining_nanos(key.billing)
    return {
        "remaining_credits": "unlimited" if remaining is None else format_usd(remaining),
        "remaining_count_credits": account.remaining_count(key.billing),
    }


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# What a recorded field is called for a reader, and whether it holds USD.
FIELDS = {
    "remaining_credits": ("credits", True),
    "remaining_count_credits": ("count credits", False),
    "billing_mode": ("billing mode", False),
    "status": ("status", False),  # the keys API's deletion
    "api": ("secret", False),  # masked: a rotation
}


def describe(row: dict[str, Any]) -> tuple[str, str]:
    """A stored entry in words for the audit page: (what changed, note), e.g.
    ("credits $4.9969 → $9.9969", "+$5.00 · invoice 7"). Reads the JSON columns `row` holds."""
    before, after, detail = (json.loads(row[column] or "{}") for column in ("before", "after", "detail"))
    changes = []
    for name, (label, is_usd) in FIELDS.items():
        if name in before and name in after and before[name] != after[name]:
            changes.append(f"{label} {_shown(before[name], is_usd)} → {_shown(after[name], is_usd)}")
    if "entry" in after:  # the keys API made or changed a key: its settings that differ
        changes.extend(_entry_changes(_flat(before.get("entry") or {}), _flat(after["entry"])))
    if before and after and not changes:
        changes.append("no change")
    return "; ".join(changes), _note(row["action"], detail)


def _entry_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """`preferences.quota 2000 → 5000`, `preferences.rate_limit removed`, `name ci-bot` (new)."""
    out = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            out.append(f"{name} removed")
        elif name not in old:
            out.append(f"{name} {new[name]}")
        elif old[name] != new[name]:
            out.append(f"{name} {old[name]} → {new[name]}")
    return out


def _flat(entry: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A recorded key entry as dotted names and plain text (its numbers are exact strings)."""
    out: dict[str, str] = {}
    for name, value in entry.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = ", ".join(str(item) for item in value) if isinstance(value, list) else str(value)
    return out


def _note(action: str, detail: dict[str, Any]) -> str:
    if action in (ADD_CREDITS, ADD_COUNT_CREDITS):
        amount = _shown(detail.get("amount", "0"), action == ADD_CREDITS)
        parts = [f"+{amount}", str(detail.get("reason") or "")]
        if detail.get("applied") is False:
            parts.append("already applied (same idempotency key)")
        return " · ".join(part for part in parts if part)
    if action == REPORT_USAGE:
        tokens = f"{count_text(detail.get('prompt_tokens', 0))} + {count_text(detail.get('completion_tokens', 0))} tokens"
        units = units_text(detail.get("images", 0), detail.get("audio_ms", 0), detail.get("characters", 0))
        return f"{detail.get('model')} via {detail.get('provider')}: {tokens}{', ' + units if units else ''}, {_shown(detail.get('cost', '0'), True)}"
    if detail.get("grace_seconds"):  # a rotation that kept the old secret working a while
        return f"the previous secret worked {count_text(detail['grace_seconds'])} s more"
    return ""


def _shown(value: Any, is_usd: bool) -> str:
    """A recorded value (exact decimal strings for USD, `unlimited`, ints, modes) for a reader."""
    if isinstance(value, str) and value != "unlimited" and (is_usd or value.replace(".", "", 1).isdigit()):  # older rows: "1.0"
        number = Decimal(value)
        return usd_text(to_nanos(number)) if is_usd else count_text(int(number))
    return count_text(value) if isinstance(value, int) else str(value)


# The audit log's SQL, shared by both ledgers (`?` placeholders; the PostgreSQL reader numbers them).
INSERT_AUDIT = """INSERT INTO audit_log (ts, actor, actor_key_id, address, action, target_key_id, target_name, before, after, detail)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


def audit_page_query(limit: int, before_id: int | None = None, key_id: str | None = None) -> tuple[str, list[Any]]:
    """Newest first, `limit` rows older than `before_id` (keyset paging), for one key or all."""
    query = "SELECT id, ts, actor, actor_key_id, address, action, target_key_id, target_name, before, after, detail FROM audit_log WHERE id < ?"
    params: list[Any] = [before_id if before_id is not None else 2**62]
    if key_id is not None:
        query += " AND target_key_id = ?"
        params.append(key_id)
    return query + " ORDER BY id DESC LIMIT ?", [*params, limit]


async def read_audit_page(reader: Any, limit: int, before_id: int | None = None, key_id: str | None = None) -> list[dict[str, Any]]:
    """One page of the audit log through a ledger's reader (aiosqlite's shape on both)."""
    query, params = audit_page_query(limit, before_id, key_id)
    async with reader.execute(query, params) as cursor:
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
