"""Rollup tables kept in step with `usage`: each batch's new rows are summed per group and
upserted in the same transaction as the rows themselves.

The sums are SQL over the batch's rows (`id > ?`), so SQLite does them in C, off Python's
GIL, rather than the database thread competing with the event loop for it.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOT_SECONDS = 900  # the provider rollup's time slot

# How each rollup column is computed from `usage` rows.
_GROUPS = {
    "key_id": "key_id",
    "account_id": "account_id",
    "model": "model",
    "cost_type": "cost_type",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",  # the UTC day, as core.ledger.sums.utc_day
    "month": "strftime('%Y-%m', ts, 'unixepoch')",
    "provider": "provider",
    "upstream_model": "upstream_model",
    # 15-minute slots: every time zone in use today is a whole number of quarter hours from UTC,
    # so a day or a month in `preferences.timezone` is a whole number of slots.
    "slot": f"CAST(ts / {SLOT_SECONDS} AS INTEGER) * {SLOT_SECONDS}",
}
_MEASURES = {
    "requests": "COUNT(*)",
    "prompt_tokens": "SUM(prompt_tokens)",
    "completion_tokens": "SUM(completion_tokens)",
    "cached_tokens": "SUM(cached_tokens)",
    "cache_write_tokens": "SUM(cache_write_tokens)",
    "cost_nanos": "SUM(cost_nanos)",
    "token_cost_nanos": "SUM(CASE WHEN cost_type = 'token' THEN cost_nanos ELSE 0 END)",
    "count_charged": "SUM(count_charged)",
    "errors": "SUM(status = 'error')",
    "images": "SUM(images)",
    "audio_ms": "SUM(audio_ms)",
    "characters": "SUM(characters)",
    "vendor_cost_nanos": "COALESCE(SUM(vendor_cost_nanos), 0)",  # the known costs; `unknown_cost` counts the rest
    "unknown_cost": "SUM(vendor_cost_nanos IS NULL)",
    "priced_billed_nanos": "SUM(CASE WHEN vendor_cost_nanos IS NOT NULL THEN cost_nanos ELSE 0 END)",  # billed, where the vendor cost is known
}
# PostgreSQL spells the UTC day and month, and the count of errors, its own way.
_PG_GROUPS = {
    **_GROUPS,
    "day": "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "month": "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM')",
    "slot": f"(floor(ts / {SLOT_SECONDS}) * {SLOT_SECONDS})::int8",
}
_PG_MEASURES = {
    **_MEASURES,
    "errors": "SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END)",
    "unknown_cost": "SUM(CASE WHEN vendor_cost_nanos IS NULL THEN 1 ELSE 0 END)",
}


@dataclass(frozen=True, slots=True)
class Rollup:
    table: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    only: str = ""  # a condition on the rows summed (the account rollup skips keys' own rows)

    @property
    def sql(self) -> str:
        """Upsert the sums of the `usage` rows with `id > ?` (one batch) into this table."""
        return self._upsert(_GROUPS, _MEASURES, "usage NOT INDEXED WHERE id > ?" + (f" AND {self.only}" if self.only else ""), "", "")

    def pg_upsert(self, source: str) -> str:
        """PostgreSQL: upsert the sums of the rows of `source` (a CTE of new usage rows). Groups
        are written in key order, so that instances committing at once lock rollup rows in the
        same order and cannot deadlock."""
        return self._upsert(_PG_GROUPS, _PG_MEASURES, source + (f" WHERE {self.only}" if self.only else ""), f"{self.table}.", " ORDER BY {groups}")

    def _upsert(self, groups_sql: dict[str, str], measures_sql: dict[str, str], source: str, current: str, order: str) -> str:
        columns = ", ".join((*self.keys, *self.values))
        selected = ", ".join([groups_sql[k] for k in self.keys] + [measures_sql[v] for v in self.values])
        updates = ", ".join(f"{v} = {current}{v} + excluded.{v}" for v in self.values)
        groups = ", ".join(str(i) for i in range(1, len(self.keys) + 1))
        return (
            f"INSERT INTO {self.table} ({columns}) SELECT {selected} FROM {source} GROUP BY {groups}{order.format(groups=groups)} "
            f"ON CONFLICT ({', '.join(self.keys)}) DO UPDATE SET {updates}"
        )


_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens")
UNITS = ("images", "audio_ms", "characters")  # the media endpoints' units (core/usage.py)
ROLLUPS = (
    Rollup("usage_daily", ("key_id", "day", "model", "cost_type"), ("requests", *_TOKENS, "cost_nanos", "count_charged", "errors", *UNITS)),
    Rollup("usage_key_day", ("key_id", "day"), ("requests", "cost_nanos", "token_cost_nanos", "count_charged", "errors", *_TOKENS, *UNITS)),
    Rollup("usage_key_month", ("key_id", "month"), ("requests", "cost_nanos")),
    Rollup("usage_key_model", ("key_id", "model", "cost_type"), ("requests", *_TOKENS, "cost_nanos", "count_charged", "errors", *UNITS)),
    Rollup("usage_day_model", ("day", "model"), ("requests", "cost_nanos")),
    # What the keys of each account charged to its shared balance, per day.
    Rollup(
        "usage_account_day",
        ("account_id", "day"),
        ("requests", "cost_nanos", "token_cost_nanos", "count_charged", "errors", *_TOKENS, *UNITS),
        "account_id <> ''",
    ),
    # The vendor side (core/vendors): per provider, 15-minute slot and upstream model, what keys
    # were billed for its calls and what it costs; released requests (no provider) are left out.
    Rollup(
        "usage_provider_slot",
        ("provider", "slot", "upstream_model"),
        ("requests", *_TOKENS, "cost_nanos", "vendor_cost_nanos", "unknown_cost", "priced_billed_nanos", "errors"),
        "provider <> ''",
    ),
)
ROLLUP_STATEMENTS = tuple(rollup.sql for rollup in ROLLUPS)
