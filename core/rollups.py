"""Rollup tables kept in step with `usage`: each batch of records is summed per group and
upserted in the same transaction as the rows themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.ledger import UsageRecord
from core.ledger_sums import utc_day

MEASURES = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nanos", "token_cost_nanos", "count_charged", "errors")


def _measures(record: UsageRecord) -> tuple[int, ...]:
    """In the order of MEASURES."""
    return (
        1,
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.cost_nanos,
        record.cost_nanos if record.cost_type == "token" else 0,
        record.count_charged,
        int(record.status == "error"),
    )


@dataclass(frozen=True, slots=True)
class Rollup:
    table: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    group: Callable[[UsageRecord, str], tuple[str, ...]]  # (record, its UTC day) -> group key

    @property
    def sql(self) -> str:
        columns = (*self.keys, *self.values)
        updates = ", ".join(f"{v} = {v} + excluded.{v}" for v in self.values)
        return f"INSERT INTO {self.table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT ({', '.join(self.keys)}) DO UPDATE SET {updates}"

    def rows(self, records: list[tuple[UsageRecord, str, tuple[int, ...]]]) -> list[tuple[Any, ...]]:
        positions = [MEASURES.index(name) for name in self.values]
        sums: dict[tuple[str, ...], list[int]] = {}
        for record, day, measures in records:
            row = sums.setdefault(self.group(record, day), [0] * len(positions))
            for index, position in enumerate(positions):
                row[index] += measures[position]
        return [(*group, *values) for group, values in sums.items()]


_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens")
ROLLUPS = (
    Rollup(
        "usage_daily",
        ("key_id", "day", "model", "cost_type"),
        ("requests", *_TOKENS, "cost_nanos", "count_charged", "errors"),
        lambda r, day: (r.key_id, day, r.model, r.cost_type),
    ),
    Rollup(
        "usage_key_day", ("key_id", "day"), ("requests", "cost_nanos", "token_cost_nanos", "count_charged", "errors", *_TOKENS), lambda r, day: (r.key_id, day)
    ),
    Rollup("usage_key_month", ("key_id", "month"), ("requests", "cost_nanos"), lambda r, day: (r.key_id, day[:7])),
    Rollup(
        "usage_key_model",
        ("key_id", "model", "cost_type"),
        ("requests", *_TOKENS, "cost_nanos", "count_charged", "errors"),
        lambda r, day: (r.key_id, r.model, r.cost_type),
    ),
    Rollup("usage_day_model", ("day", "model"), ("requests", "cost_nanos"), lambda r, day: (day, r.model)),
)


def rollup_statements(records: list[UsageRecord]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """(upsert SQL, rows) for every rollup table, for one batch of records."""
    prepared = [(record, utc_day(record.ts), _measures(record)) for record in records]
    return [(rollup.sql, rollup.rows(prepared)) for rollup in ROLLUPS]
