"""The ledger's PostgreSQL schema and its migrations, numbered in `schema_version`.

The reporting tables (`usage`, `grants`, the rollups, alerts, audit) have the SQLite
ledger's columns, so the page and report queries (core/reports.py, core/ledger/sums.py) run
unchanged on both. Fleet mode adds the live state every instance shares: `accounts` (each
key's counters within its billing window), `reservations` (what requests in flight hold,
each leased by the instance that admitted it), `rate_windows`, `period_spend`, `instances`
and `key_settings`.

Several instances may start at once: migrations run under a transaction-scoped advisory
lock, so exactly one applies them and the others find the work done.
"""

from __future__ import annotations

import logging

import asyncpg

log = logging.getLogger("tollgate.ledger")

MIGRATION_LOCK = 0x70_11_6A_7E  # pg_advisory_xact_lock key: "tollgate" schema changes

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE usage (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        cost_type TEXT NOT NULL,
        unit_prices TEXT NOT NULL,
        cost_nanos BIGINT NOT NULL,
        count_charged BIGINT NOT NULL,
        status TEXT NOT NULL,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        reasoning_tokens BIGINT NOT NULL DEFAULT 0
    );
    -- A settlement retried after a lost reply must apply once: the request id is its identity.
    CREATE UNIQUE INDEX usage_request ON usage (request_id);
    CREATE INDEX usage_by_key_time ON usage (key_id, ts);
    CREATE TABLE grants (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('credits', 'count_credits')),
        amount BIGINT NOT NULL CHECK (amount > 0),
        reason TEXT NOT NULL,
        idempotency_key TEXT,
        ts DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX grants_by_key_time ON grants (key_id, ts);
    CREATE UNIQUE INDEX grants_idempotency ON grants (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE usage_daily (
        key_id TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL, cost_type TEXT NOT NULL,
        requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        cost_nanos BIGINT NOT NULL, count_charged BIGINT NOT NULL, errors BIGINT NOT NULL,
        PRIMARY KEY (key_id, day, model, cost_type)
    );
    CREATE INDEX usage_daily_by_day ON usage_daily (day);
    CREATE TABLE usage_key_day (
        key_id TEXT NOT NULL, day TEXT NOT NULL, requests BIGINT NOT NULL, cost_nanos BIGINT NOT NULL,
        token_cost_nanos BIGINT NOT NULL, count_charged BIGINT NOT NULL, errors BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        PRIMARY KEY (key_id, day)
    );
    CREATE INDEX usage_key_day_by_day ON usage_key_day (day);
    CREATE TABLE usage_key_month (
        key_id TEXT NOT NULL, month TEXT NOT NULL, requests BIGINT NOT NULL, cost_nanos BIGINT NOT NULL,
        PRIMARY KEY (key_id, month)
    );
    CREATE INDEX usage_key_month_by_month ON usage_key_month (month, cost_nanos);
    CREATE TABLE usage_key_model (
        key_id TEXT NOT NULL, model TEXT NOT NULL, cost_type TEXT NOT NULL, requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        cost_nanos BIGINT NOT NULL, count_charged BIGINT NOT NULL, errors BIGINT NOT NULL,
        PRIMARY KEY (key_id, model, cost_type)
    );
    CREATE TABLE usage_day_model (
        day TEXT NOT NULL, model TEXT NOT NULL, requests BIGINT NOT NULL, cost_nanos BIGINT NOT NULL,
        PRIMARY KEY (day, model)
    );
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE alert_events (
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        metric TEXT NOT NULL,
        threshold DOUBLE PRECISION NOT NULL,
        used TEXT NOT NULL,
        limit_value TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        webhook_url TEXT,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX alert_events_by_key ON alert_events (key_id, ts);
    CREATE TABLE alert_fired (
        key_id TEXT NOT NULL,
        metric TEXT NOT NULL,
        threshold DOUBLE PRECISION NOT NULL,
        fired_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key_id, metric, threshold)
    );
    CREATE TABLE audit_log (
        id BIGSERIAL PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
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
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

    -- Each key's charges and grants within its billing window (from window_start on), kept in
    -- step with `usage` and `grants` by the transactions that write them; every change to a
    -- key's live state happens under this row's lock.
    CREATE TABLE accounts (
        key_id TEXT PRIMARY KEY,
        window_start DOUBLE PRECISION NOT NULL,
        spent_nanos BIGINT NOT NULL DEFAULT 0,
        count_used BIGINT NOT NULL DEFAULT 0,
        total_cost_nanos BIGINT NOT NULL DEFAULT 0,
        request_count BIGINT NOT NULL DEFAULT 0,
        tokens_used BIGINT NOT NULL DEFAULT 0,
        granted_nanos BIGINT NOT NULL DEFAULT 0,
        count_granted BIGINT NOT NULL DEFAULT 0
    );
    -- What each request in flight holds, leased by the instance that admitted it: when an
    -- instance stops heartbeating its rows are deleted, which frees what they held.
    CREATE TABLE reservations (
        request_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        nanos BIGINT NOT NULL,  -- the estimate quotas and budgets hold
        balance_nanos BIGINT NOT NULL,  -- what the balance holds (0 for count-billed and unlimited keys)
        count BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        admitted_at DOUBLE PRECISION NOT NULL,
        reported TEXT  -- a long stream's usage so far (a usage row as JSON): billed if its instance dies
    );
    CREATE INDEX reservations_by_key ON reservations (key_id);
    CREATE INDEX reservations_by_instance ON reservations (instance_id);
    -- Fixed rate windows: requests (or tokens, estimates until settled) admitted in the window.
    CREATE TABLE rate_windows (
        key_id TEXT NOT NULL, kind TEXT NOT NULL, seconds BIGINT NOT NULL,
        window_start DOUBLE PRECISION NOT NULL, used BIGINT NOT NULL,
        PRIMARY KEY (key_id, kind, seconds)
    );
    -- Spend in the current budget period, counted from `since` (the period's start, or the
    -- billing window's if later) until `period_end`.
    CREATE TABLE period_spend (
        key_id TEXT NOT NULL, name TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL, period_end DOUBLE PRECISION NOT NULL, nanos BIGINT NOT NULL,
        PRIMARY KEY (key_id, name)
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        config_hash TEXT NOT NULL DEFAULT '',
        config_error TEXT
    );
    -- Admission's read, in one round trip: lock the key's account (created on first use),
    -- then read, each statement with a snapshot taken after the lock (READ COMMITTED), its
    -- counters, what requests in flight hold, its rate windows and its budget periods.
    CREATE FUNCTION tollgate_key_state(p_key TEXT) RETURNS TABLE (
        window_start DOUBLE PRECISION, spent_nanos BIGINT, count_used BIGINT, total_cost_nanos BIGINT, request_count BIGINT,
        tokens_used BIGINT, granted_nanos BIGINT, count_granted BIGINT,
        held_requests BIGINT, held_nanos BIGINT, held_balance_nanos BIGINT, held_count BIGINT, held_tokens BIGINT,
        rate_kinds TEXT[], rate_seconds BIGINT[], rate_starts DOUBLE PRECISION[], rate_used BIGINT[],
        period_names TEXT[], period_since DOUBLE PRECISION[], period_ends DOUBLE PRECISION[], period_nanos BIGINT[]
    ) LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM accounts a WHERE a.key_id = p_key FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO accounts (key_id, window_start) VALUES (p_key, '-infinity') ON CONFLICT DO NOTHING;
            PERFORM 1 FROM accounts a WHERE a.key_id = p_key FOR UPDATE;
        END IF;
        RETURN QUERY
        SELECT a.window_start, a.spent_nanos, a.count_used, a.total_cost_nanos, a.request_count, a.tokens_used, a.granted_nanos, a.count_granted,
               h.n, h.nanos, h.balance, h.cnt, h.tokens,
               w.kinds, w.seconds, w.starts, w.used, p.names, p.since, p.ends, p.nanos
        FROM accounts a,
             LATERAL (SELECT COUNT(*), COALESCE(SUM(r.nanos), 0)::BIGINT, COALESCE(SUM(r.balance_nanos), 0)::BIGINT,
                             COALESCE(SUM(r.count), 0)::BIGINT, COALESCE(SUM(r.tokens), 0)::BIGINT
                      FROM reservations r WHERE r.key_id = p_key) AS h(n, nanos, balance, cnt, tokens),
             LATERAL (SELECT array_agg(x.kind), array_agg(x.seconds), array_agg(x.window_start), array_agg(x.used)
                      FROM rate_windows x WHERE x.key_id = p_key) AS w(kinds, seconds, starts, used),
             LATERAL (SELECT array_agg(y.name), array_agg(y.since), array_agg(y.period_end), array_agg(y.nanos)
                      FROM period_spend y WHERE y.key_id = p_key) AS p(names, since, ends, nanos)
        WHERE a.key_id = p_key;
    END $$;

    -- Settings changed through the admin API (billing mode), layered over api.yaml on every
    -- instance; `version` tells instances polling for changes that something moved.
    CREATE TABLE key_settings (
        key_id TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key_id, name)
    );
    """,
    # Alerts shared by the fleet (core/alerts.py): a delivery is claimed by the instance sending
    # it, and a crossing remembers the limit it was fired against (re-arming needs a higher one).
    2: """
    ALTER TABLE alert_events ADD COLUMN claimed_at DOUBLE PRECISION;
    ALTER TABLE alert_fired ADD COLUMN fired_limit BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX alert_events_owed ON alert_events (id) WHERE status = 'pending';  -- each instance's sweep
    """,
    # Keys made through the keys API, and API changes of api.yaml's keys (core/keys/records.py),
    # replacing `key_settings`: its billing modes become merge patches. Secrets: digests only.
    3: """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        defined_in TEXT NOT NULL CHECK (defined_in IN ('api', 'api.yaml')),
        entry TEXT NOT NULL,
        digest BYTEA,
        masked TEXT,
        previous_digest BYTEA,
        previous_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        deleted_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE UNIQUE INDEX api_keys_by_digest ON api_keys (digest) WHERE digest IS NOT NULL;
    INSERT INTO api_keys (id, defined_in, entry, created_at, updated_at)
        SELECT key_id, 'api.yaml', json_build_object('preferences', json_build_object('billing_mode', value))::text, updated_at, updated_at
        FROM key_settings WHERE name = 'billing_mode';
    DROP TABLE key_settings;
    """,
    # Accounts (api.yaml `accounts:`), as in SQLite's schema 10: each charge names the account
    # whose balance paid, and a per account and day rollup sums them.
    4: """
    ALTER TABLE usage ADD COLUMN account_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX usage_by_account_time ON usage (account_id, ts) WHERE account_id <> '';
    CREATE TABLE usage_account_day (
        account_id TEXT NOT NULL, day TEXT NOT NULL, requests BIGINT NOT NULL, cost_nanos BIGINT NOT NULL,
        token_cost_nanos BIGINT NOT NULL, count_charged BIGINT NOT NULL, errors BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        PRIMARY KEY (account_id, day)
    );
    -- An account's balance is a row of `accounts` under its id (`account:NAME`); what its keys'
    -- requests in flight hold of it is found by each reservation's owner.
    ALTER TABLE reservations ADD COLUMN owner_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX reservations_by_owner ON reservations (owner_id) WHERE owner_id <> '';
    -- Admission of a key in an account first locks the account's row (always before any key's:
    -- settlements lock accounts first too, so the two never deadlock) and reads its state as
    -- tollgate_key_state reads a key's: its balance, what its keys' requests in flight hold
    -- (found by owner_id), and the account's own rate windows and budget periods. (The same
    -- query as tollgate_key_state but for the reservations' filter: one function choosing
    -- its filter at run time could not use either index, on every admission.)
    CREATE FUNCTION tollgate_owner_state(p_owner TEXT) RETURNS TABLE (
        window_start DOUBLE PRECISION, spent_nanos BIGINT, count_used BIGINT, total_cost_nanos BIGINT, request_count BIGINT,
        tokens_used BIGINT, granted_nanos BIGINT, count_granted BIGINT,
        held_requests BIGINT, held_nanos BIGINT, held_balance_nanos BIGINT, held_count BIGINT, held_tokens BIGINT,
        rate_kinds TEXT[], rate_seconds BIGINT[], rate_starts DOUBLE PRECISION[], rate_used BIGINT[],
        period_names TEXT[], period_since DOUBLE PRECISION[], period_ends DOUBLE PRECISION[], period_nanos BIGINT[]
    ) LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM accounts a WHERE a.key_id = p_owner FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO accounts (key_id, window_start) VALUES (p_owner, '-infinity') ON CONFLICT DO NOTHING;
            PERFORM 1 FROM accounts a WHERE a.key_id = p_owner FOR UPDATE;
        END IF;
        RETURN QUERY
        SELECT a.window_start, a.spent_nanos, a.count_used, a.total_cost_nanos, a.request_count, a.tokens_used, a.granted_nanos, a.count_granted,
               h.n, h.nanos, h.balance, h.cnt, h.tokens,
               w.kinds, w.seconds, w.starts, w.used, p.names, p.since, p.ends, p.nanos
        FROM accounts a,
             LATERAL (SELECT COUNT(*), COALESCE(SUM(r.nanos), 0)::BIGINT, COALESCE(SUM(r.balance_nanos), 0)::BIGINT,
                             COALESCE(SUM(r.count), 0)::BIGINT, COALESCE(SUM(r.tokens), 0)::BIGINT
                      FROM reservations r WHERE r.owner_id = p_owner) AS h(n, nanos, balance, cnt, tokens),
             LATERAL (SELECT array_agg(x.kind), array_agg(x.seconds), array_agg(x.window_start), array_agg(x.used)
                      FROM rate_windows x WHERE x.key_id = p_owner) AS w(kinds, seconds, starts, used),
             LATERAL (SELECT array_agg(y.name), array_agg(y.since), array_agg(y.period_end), array_agg(y.nanos)
                      FROM period_spend y WHERE y.key_id = p_owner) AS p(names, since, ends, nanos)
        WHERE a.key_id = p_owner;
    END $$;
    """,
    # Accounts made through the accounts API, and API changes of api.yaml's accounts, as in
    # SQLite's schema 11 (core/keys/records.py: AccountRecord).
    5: """
    CREATE TABLE api_accounts (
        name TEXT PRIMARY KEY,
        defined_in TEXT NOT NULL CHECK (defined_in IN ('api', 'api.yaml')),
        entry TEXT NOT NULL,
        deleted_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # The media endpoints' units, as in SQLite's schema 12.
    6: """
    ALTER TABLE usage ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_daily ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN characters BIGINT NOT NULL DEFAULT 0;
    """,
    # Responses an upstream stores, as in SQLite's schema 13: read by any instance of the fleet.
    7: """
    CREATE TABLE stored_responses (
        response_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX stored_responses_by_time ON stored_responses (created_at);
    """,
    # The vendor side, as in SQLite's schema 14; and each provider's vendor cost per budget
    # month (`provider_spend`), moved by the settlements that add to it, so that every
    # instance reads one exact figure (core/vendors/months.py).
    8: """
    ALTER TABLE usage ADD COLUMN vendor_cost_nanos BIGINT;
    ALTER TABLE usage ADD COLUMN vendor_unit_prices TEXT NOT NULL DEFAULT '';
    CREATE TABLE usage_provider_slot (
        provider TEXT NOT NULL, slot BIGINT NOT NULL, upstream_model TEXT NOT NULL, requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        cost_nanos BIGINT NOT NULL, vendor_cost_nanos BIGINT NOT NULL, unknown_cost BIGINT NOT NULL, priced_billed_nanos BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        PRIMARY KEY (provider, slot, upstream_model)
    );
    CREATE INDEX usage_provider_slot_by_slot ON usage_provider_slot (slot);
    INSERT INTO usage_provider_slot
        SELECT provider, (floor(ts / 900) * 900)::int8, upstream_model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
               SUM(cost_nanos), 0, COUNT(*), 0, SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END)
        FROM usage WHERE provider <> '' GROUP BY 1, 2, 3;
    CREATE TABLE provider_spend (
        provider TEXT NOT NULL, since DOUBLE PRECISION NOT NULL, period_end DOUBLE PRECISION NOT NULL, nanos BIGINT NOT NULL,
        PRIMARY KEY (provider, since, period_end)
    );
    """,
    # Cache writes summed in the rollups beside the cache reads, as in SQLite's schema 15.
    9: """
    ALTER TABLE usage_daily ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_day ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_key_model ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_account_day ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_provider_slot ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
    CREATE TEMP TABLE cache_writes ON COMMIT DROP AS
        SELECT key_id, account_id, to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, model, cost_type, provider,
               (floor(ts / 900) * 900)::int8 AS slot, upstream_model, cache_write_tokens AS n
        FROM usage WHERE cache_write_tokens > 0;
    UPDATE usage_daily d SET cache_write_tokens = w.n
        FROM (SELECT key_id, day, model, cost_type, SUM(n) AS n FROM cache_writes GROUP BY 1, 2, 3, 4) AS w
        WHERE d.key_id = w.key_id AND d.day = w.day AND d.model = w.model AND d.cost_type = w.cost_type;
    UPDATE usage_key_day d SET cache_write_tokens = w.n
        FROM (SELECT key_id, day, SUM(n) AS n FROM cache_writes GROUP BY 1, 2) AS w
        WHERE d.key_id = w.key_id AND d.day = w.day;
    UPDATE usage_key_model m SET cache_write_tokens = w.n
        FROM (SELECT key_id, model, cost_type, SUM(n) AS n FROM cache_writes GROUP BY 1, 2, 3) AS w
        WHERE m.key_id = w.key_id AND m.model = w.model AND m.cost_type = w.cost_type;
    UPDATE usage_account_day d SET cache_write_tokens = w.n
        FROM (SELECT account_id, day, SUM(n) AS n FROM cache_writes WHERE account_id <> '' GROUP BY 1, 2) AS w
        WHERE d.account_id = w.account_id AND d.day = w.day;
    UPDATE usage_provider_slot s SET cache_write_tokens = w.n
        FROM (SELECT provider, slot, upstream_model, SUM(n) AS n FROM cache_writes WHERE provider <> '' GROUP BY 1, 2, 3) AS w
        WHERE s.provider = w.provider AND s.slot = w.slot AND s.upstream_model = w.upstream_model;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)


class SchemaError(Exception):
    pass


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version found. One instance at a time
    (an advisory lock held for the transaction), each step in the same transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            await conn.execute("INSERT INTO schema_version VALUES (0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise SchemaError(f"database schema version {version} is newer than this Tollgate ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            log.info("migrating the PostgreSQL ledger to schema version %d", target)
            await conn.execute(MIGRATIONS[target])
            await conn.execute("UPDATE schema_version SET version = $1", target)
        return int(version)
