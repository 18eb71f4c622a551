"""The audit trail: every admin action, who did it, from where, and what changed.

Rows go to the `audit_log` table, which its triggers make append-only. Amounts are
recorded as exact decimal strings, never floats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core.config import ApiKey
from core.ledger import Account
from core.pricing import format_usd

LOGIN = "login"
ADD_CREDITS = "add_credits"
ADD_COUNT_CREDITS = "add_count_credits"
SET_BILLING_MODE = "set_billing_mode"
REPORT_USAGE = "report_usage"


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
        """In the column order of core.sqlite_ledger's audit insert."""
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
