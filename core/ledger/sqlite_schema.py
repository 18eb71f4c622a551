"""The ledger's SQLite schema and its migrations, numbered by `PRAGMA user_version`."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable

import aiosqlite

log = logging.getLogger("tollgate.ledger")

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_type TEXT NOT NULL,
        unit_prices TEXT NOT NULL,
        cost_nanos INTEGER NOT NULL,
        count_charged INTEGER NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX usage_by_key_time ON usage (key_id, ts);
    CREATE INDEX usage_by_time ON usage (ts);
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('credits', 'count_credits')),
        amount INTEGER NOT NULL CHECK (amount > 0),
        reason TEXT NOT NULL,
        idempotency_key TEXT,
        ts REAL NOT NULL
    );
    CREATE INDEX grants_by_key_time ON grants (key_id, ts);
    CREATE UNIQUE INDEX grants_idempotency ON grants (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    """,
    # A per key, UTC day, model and cost type rollup of `usage`, written in the same
    # transaction as the rows it sums: pages and balances aggregate days, not the whole log.
    2: """
    CREATE TABLE usage_daily (
        key_id TEXT NOT NULL,
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        cost_type TEXT NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_nanos INTEGER NOT NULL,
        count_charged INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        PRIMARY KEY (key_id, day, model, cost_type)
    ) WITHOUT ROWID;
    CREATE INDEX usage_daily_by_day ON usage_daily (day);
    INSERT INTO usage_daily
        SELECT key_id, strftime('%Y-%m-%d', ts, 'unixepoch'), model, cost_type, COUNT(*), SUM(prompt_tokens),
               SUM(completion_tokens), SUM(cached_tokens), SUM(cost_nanos), SUM(count_charged), SUM(status = 'error')
        FROM usage GROUP BY 1, 2, 3, 4;
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # Coarser rollups, so that no page or balance query grows with the number of requests:
    # per key and day (charts, requests today, balances), per key and month (spend this
    # month), per key and model since the start (key states), per day and model (overview).
    3: """
    CREATE TABLE usage_key_day (
        key_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        token_cost_nanos INTEGER NOT NULL, count_charged INTEGER NOT NULL, errors INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        PRIMARY KEY (key_id, day)
    ) WITHOUT ROWID;
    CREATE INDEX usage_key_day_by_day ON usage_key_day (day);
    CREATE TABLE usage_key_month (
        key_id TEXT NOT NULL, month TEXT NOT NULL, requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        PRIMARY KEY (key_id, month)
    ) WITHOUT ROWID;
    CREATE INDEX usage_key_month_by_month ON usage_key_month (month, cost_nanos);
    CREATE TABLE usage_key_model (
        key_id TEXT NOT NULL, model TEXT NOT NULL, cost_type TEXT NOT NULL, requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        cost_nanos INTEGER NOT NULL, count_charged INTEGER NOT NULL, errors INTEGER NOT NULL,
        PRIMARY KEY (key_id, model, cost_type)
    ) WITHOUT ROWID;
    CREATE TABLE usage_day_model (
        day TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        PRIMARY KEY (day, model)
    ) WITHOUT ROWID;
    INSERT INTO usage_key_day
        SELECT key_id, day, SUM(requests), SUM(cost_nanos), SUM(CASE WHEN cost_type = 'token' THEN cost_nanos ELSE 0 END), SUM(count_charged),
               SUM(errors), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens)
        FROM usage_daily GROUP BY key_id, day;
    INSERT INTO usage_key_month SELECT key_id, substr(day, 1, 7), SUM(requests), SUM(cost_nanos) FROM usage_daily GROUP BY key_id, substr(day, 1, 7);
    INSERT INTO usage_key_model
        SELECT key_id, model, cost_type, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(cost_nanos),
               SUM(count_charged), SUM(errors)
        FROM usage_daily GROUP BY key_id, model, cost_type;
    INSERT INTO usage_day_model SELECT day, model, SUM(requests), SUM(cost_nanos) FROM usage_daily GROUP BY day, model;
    """,
    # Threshold alerts: every event (and its delivery), and which crossings have fired, so a
    # restart neither repeats an alert nor forgets one.
    4: """
    CREATE TABLE alert_events (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        metric TEXT NOT NULL,
        threshold REAL NOT NULL,
        used TEXT NOT NULL,
        limit_value TEXT NOT NULL,
        ts REAL NOT NULL,
        webhook_url TEXT,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX alert_events_by_key ON alert_events (key_id, ts);
    CREATE TABLE alert_fired (
        key_id TEXT NOT NULL,
        metric TEXT NOT NULL,
        threshold REAL NOT NULL,
        fired_at REAL NOT NULL,
        PRIMARY KEY (key_id, metric, threshold)
    ) WITHOUT ROWID;
    """,
    # Vendors report cache writes (Anthropic) and reasoning tokens (OpenAI o-series, Gemini).
    5: """
    ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
    """,
    # Every index costs each charge a b-tree insert: the time index only served the
    # all-keys export, which now reads in insertion order instead.
    6: """
    DROP INDEX IF EXISTS usage_by_time;
    """,
    # Every admin action: who (the admin key's name), what, when, from where, before/after.
    # Append-only: the triggers refuse to change or remove a row once written.
    7: """
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        actor_key_id TEXT NOT NULL,
        address TEXT,
        action TEXT NOT NULL,
        target_key_id TEXT,
        target_name TEXT,
        before TEXT NOT NULL,
        after TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_target ON audit_log (target_key_id, id);
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # Alerts shared by a fleet (core/alerts.py): a delivery is claimed by the process sending
    # it, and a crossing remembers the limit it was fired against (re-arming needs a higher one).
    8: """
    ALTER TABLE alert_events ADD COLUMN claimed_at REAL;
    ALTER TABLE alert_fired ADD COLUMN fired_limit INTEGER NOT NULL DEFAULT 0;
    """,
    # Keys made through the keys API, and API changes of api.yaml's keys (core/keys/records.py).
    # Secrets are stored only as their sha256 digests.
    9: """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        defined_in TEXT NOT NULL CHECK (defined_in IN ('api', 'api.yaml')),
        entry TEXT NOT NULL,
        digest BLOB,
        masked TEXT,
        previous_digest BLOB,
        previous_until REAL NOT NULL DEFAULT 0,
        deleted_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX api_keys_by_digest ON api_keys (digest) WHERE digest IS NOT NULL;
    """,
    # Accounts (api.yaml `accounts:`): each charge names the account whose balance paid, and a
    # per account and day rollup sums them (an account's balance is rebuilt from it).
    10: """
    ALTER TABLE usage ADD COLUMN account_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX usage_by_account_time ON usage (account_id, ts) WHERE account_id <> '';
    CREATE TABLE usage_account_day (
        account_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,
        token_cost_nanos INTEGER NOT NULL, count_charged INTEGER NOT NULL, errors INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        PRIMARY KEY (account_id, day)
    ) WITHOUT ROWID;
    """,
    # Accounts made through the accounts API, and API changes of api.yaml's accounts
    # (core/keys/records.py: AccountRecord), as `api_keys` holds keys.
    11: """
    CREATE TABLE api_accounts (
        name TEXT PRIMARY KEY,
        defined_in TEXT NOT NULL CHECK (defined_in IN ('api', 'api.yaml')),
        entry TEXT NOT NULL,
        deleted_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # The media endpoints' units (images generated, milliseconds of audio, characters read
    # aloud), on each charge and summed in the rollups the reports read.
    12: """
    ALTER TABLE usage ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN audio_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN audio_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN audio_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN audio_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN audio_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    """,
    # Responses an upstream stores (Responses API): who made each and which provider holds it,
    # so follow-ups reach it and only that key reads it. Pruned by age (core/ledger/__init__.py).
    13: """
    CREATE TABLE stored_responses (
        response_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX stored_responses_by_time ON stored_responses (created_at);
    """,
    # The vendor side (core/vendors): each charge's vendor cost (NULL: unknown) at the unit prices
    # beside it, and a per provider, 15-minute slot and upstream model rollup. Earlier rows are
    # summed in with an unknown vendor cost.
    14: """
    ALTER TABLE usage ADD COLUMN vendor_cost_nanos INTEGER;
    ALTER TABLE usage ADD COLUMN vendor_unit_prices TEXT NOT NULL DEFAULT '';
    CREATE TABLE usage_provider_slot (
        provider TEXT NOT NULL, slot INTEGER NOT NULL, upstream_model TEXT NOT NULL, requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        cost_nanos INTEGER NOT NULL, vendor_cost_nanos INTEGER NOT NULL, unknown_cost INTEGER NOT NULL, priced_billed_nanos INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        PRIMARY KEY (provider, slot, upstream_model)
    ) WITHOUT ROWID;
    CREATE INDEX usage_provider_slot_by_slot ON usage_provider_slot (slot);
    INSERT INTO usage_provider_slot
        SELECT provider, CAST(ts / 900 AS INTEGER) * 900, upstream_model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
               SUM(cost_nanos), 0, COUNT(*), 0, SUM(status = 'error')
        FROM usage WHERE provider <> '' GROUP BY 1, 2, 3;
    """,
    # Cache writes (Anthropic's cache_creation_input_tokens) summed in the rollups beside the
    # cache reads, so pages and the API show them; earlier rows are summed in from `usage`,
    # read once: only the rows with cache writes are gathered, then added to each rollup.
    15: """
    ALTER TABLE usage_daily ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_provider_slot ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    CREATE TEMP TABLE cache_writes AS
        SELECT key_id, account_id, strftime('%Y-%m-%d', ts, 'unixepoch') AS day, model, cost_type, provider,
               CAST(ts / 900 AS INTEGER) * 900 AS slot, upstream_model, cache_write_tokens AS n
        FROM usage WHERE cache_write_tokens > 0;
    UPDATE usage_daily SET cache_write_tokens = w.n
        FROM (SELECT key_id, day, model, cost_type, SUM(n) AS n FROM cache_writes GROUP BY 1, 2, 3, 4) AS w
        WHERE usage_daily.key_id = w.key_id AND usage_daily.day = w.day AND usage_daily.model = w.model AND usage_daily.cost_type = w.cost_type;
    UPDATE usage_key_day SET cache_write_tokens = w.n
        FROM (SELECT key_id, day, SUM(n) AS n FROM cache_writes GROUP BY 1, 2) AS w
        WHERE usage_key_day.key_id = w.key_id AND usage_key_day.day = w.day;
    UPDATE usage_key_model SET cache_write_tokens = w.n
        FROM (SELECT key_id, model, cost_type, SUM(n) AS n FROM cache_writes GROUP BY 1, 2, 3) AS w
        WHERE usage_key_model.key_id = w.key_id AND usage_key_model.model = w.model AND usage_key_model.cost_type = w.cost_type;
    UPDATE usage_account_day SET cache_write_tokens = w.n
        FROM (SELECT account_id, day, SUM(n) AS n FROM cache_writes WHERE account_id <> '' GROUP BY 1, 2) AS w
        WHERE usage_account_day.account_id = w.account_id AND usage_account_day.day = w.day;
    UPDATE usage_provider_slot SET cache_write_tokens = w.n
        FROM (SELECT provider, slot, upstream_model, SUM(n) AS n FROM cache_writes WHERE provider <> '' GROUP BY 1, 2, 3) AS w
        WHERE usage_provider_slot.provider = w.provider AND usage_provider_slot.slot = w.slot AND usage_provider_slot.upstream_model = w.upstream_model;
    DROP TABLE cache_writes;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)


class SchemaError(Exception):
    pass


def _statements(script: str) -> list[str]:
    """Split a script into statements, keeping a trigger's `BEGIN ...; END` in one piece."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    return statements


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the old version. A new ledger is made in
    one transaction; an existing one moves one logged transaction per step (a large one takes
    a while: version 2 builds the rollups from every row)."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise SchemaError(f"database schema version {version} is newer than this Tollgate ({SCHEMA_VERSION})")
    if version == 0:
        log.info("creating a new ledger at schema version %d", SCHEMA_VERSION)
        await _apply(db, range(1, SCHEMA_VERSION + 1))
        return version
    for target in range(version + 1, SCHEMA_VERSION + 1):
        log.info("migrating the ledger to schema version %d (a large ledger takes a while, once)", target)
        await _apply(db, [target])
    return version


async def _apply(db: aiosqlite.Connection, targets: Iterable[int]) -> None:
    """Run these migrations in one transaction, ending at the last one's version."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        for target in targets:
            for statement in _statements(MIGRATIONS[target]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
