"""The SQLite ledger on a real database file: balances always equal the ledger's sums."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from core.config.billing import KeyBilling
from core.ledger import COUNT_CREDITS, CREDITS, Grant, InsufficientBalance, UsageRecord
from core.ledger.rollups import ROLLUP_STATEMENTS
from core.ledger.sqlite import SqliteLedger


def record(key_id: str, cost_nanos: int, cost_type: str = "token", count: int = 0) -> UsageRecord:
    return UsageRecord("req", time.time(), key_id, "name", "m", "p", "m", 1, 0, 0, cost_type, '{"input":"0.12"}', cost_nanos, count)


async def rebuilt(path: Path, key_id: str, terms: KeyBilling):
    ledger = await SqliteLedger.open(path)
    try:
        return await ledger.account(key_id, terms)
    finally:
        await ledger.close()


def test_ten_thousand_tiny_charges_sum_exactly(tmp_path):
    terms = KeyBilling(credits_nanos=10**9)

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        for _ in range(10_000):
            ledger.settle(await ledger.reserve("k", terms, 120, 0), record("k", 120))
        live = await ledger.account("k", terms)
        await ledger.close()
        return live.remaining_nanos(terms), (await rebuilt(tmp_path / "l.db", "k", terms)).remaining_nanos(terms)

    live, after_restart = asyncio.run(scenario())
    assert live == after_restart == 10**9 - 1_200_000
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT SUM(cost_nanos), COUNT(*) FROM usage").fetchone() == (1_200_000, 10_000)


@pytest.mark.parametrize("rows", [1, 3, 5, 37, 293])
def test_every_row_of_a_batch_is_written_exactly_as_recorded(tmp_path, rows):
    """Batches are written as multi-row inserts in chunks: every size must land row by row,
    column by column, in order."""
    terms = KeyBilling(credits_nanos=10**12)
    records = [
        UsageRecord(f"req-{i}", 1_700_000_000 + i, "k", f"name-{i}", f"m{i}", "p", f"up{i}", i, 2 * i, 3 * i, "token", "{}", 7 * i, i % 2, "ok", 4 * i, 5 * i)
        for i in range(rows)
    ]

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        for row in records:  # all within one group-commit window: one batch
            ledger.settle(await ledger.reserve("k", terms, 0, 0), row)
        await ledger.close()

    asyncio.run(scenario())
    columns = ", ".join(UsageRecord._fields)
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert [UsageRecord(*row) for row in db.execute(f"SELECT {columns} FROM usage ORDER BY id")] == records


def test_each_commit_reads_only_its_own_rows_however_big_the_ledger(tmp_path):
    """The rollups sum a batch's rows by rowid range. Left to itself, SQLite's planner walked
    a whole index of `usage` for three of them (to save a sort for GROUP BY key_id): every
    commit then cost time in proportion to the ledger's size."""

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        await ledger.close()

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "l.db") as db:
        db.executemany(
            "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens,"
            " cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES (?, ?, ?, 'n', 'm', 'p', 'm', 1, 1, 0, 'token', '{}', 1, 0, 'ok')",
            [(f"r{i}", 1_700_000_000 + i, f"k{i % 50}") for i in range(5000)],
        )
        for analyzed in (False, True):  # without statistics (as shipped) and with them
            if analyzed:
                db.execute("ANALYZE")
            for statement in ROLLUP_STATEMENTS:
                plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement, (4990,))]
                assert any("USING INTEGER PRIMARY KEY (rowid>?)" in step for step in plan), (analyzed, statement, plan)
                assert not any(step.startswith("SCAN usage") for step in plan), (analyzed, statement, plan)


def test_count_reservations_are_exact_under_concurrency(tmp_path):
    terms = KeyBilling(mode="count", count_credits=7)

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")

        async def one():
            try:
                reservation = await ledger.reserve("k", terms, 0, 1)
            except InsufficientBalance:
                return False
            await asyncio.sleep(0.01)  # the upstream call
            ledger.settle(reservation, record("k", 1000, "count", 1))
            return True

        results = await asyncio.gather(*(one() for _ in range(50)))
        await ledger.close()
        return results

    assert sum(asyncio.run(scenario())) == 7


def test_a_changed_billing_window_recounts_exactly_with_requests_in_flight(tmp_path):
    old = KeyBilling(credits_nanos=10_000, created_at=0.0)

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        ledger.settle(await ledger.reserve("k", old, 100, 0), record("k", 100))
        await ledger.flush()
        window = time.time()
        ledger.settle(await ledger.reserve("k", old, 100, 0), record("k", 70))  # after the new window starts
        in_flight = await ledger.reserve("k", old, 100, 0)
        new = KeyBilling(credits_nanos=10_000, created_at=window)
        recount = asyncio.create_task(ledger.account("k", new))
        await asyncio.sleep(0)
        ledger.settle(in_flight, record("k", 40))  # settles while the recount is queued
        account = await recount
        await ledger.grant(Grant("k", CREDITS, 500, "top-up", None, time.time()), new)
        live = account.remaining_nanos(new), account.reserved_nanos
        await ledger.close()
        return live, (await rebuilt(tmp_path / "l.db", "k", new)).remaining_nanos(new)

    (live_remaining, reserved), rebuilt_remaining = asyncio.run(scenario())
    assert reserved == 0
    assert live_remaining == rebuilt_remaining == 10_000 + 500 - 70 - 40


def test_what_is_timed_before_the_window_counts_neither_live_nor_after_a_restart(tmp_path):
    """One rule in memory, at rebuild and for grants: a charge, a release or a grant counts
    only from `created_at` on (a reload can move the window past requests in flight)."""
    terms = KeyBilling(credits_nanos=10_000, created_at=time.time() + 3600)

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        ledger.settle(await ledger.reserve("k", terms, 100, 0), record("k", 100))
        ledger.release(await ledger.reserve("k", terms, 100, 0), record("k", 0))
        await ledger.grant(Grant("k", CREDITS, 500, "top-up", None, time.time()), terms)
        account = await ledger.account("k", terms)
        live = account.remaining_nanos(terms), account.request_count, account.reserved_nanos
        await ledger.close()
        again = await rebuilt(tmp_path / "l.db", "k", terms)
        return live, (again.remaining_nanos(terms), again.request_count, again.reserved_nanos)

    live, after_restart = asyncio.run(scenario())
    assert live == after_restart == (10_000, 0, 0)


def test_grants_are_idempotent_per_key(tmp_path):
    terms = KeyBilling(mode="count", count_credits=0)

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        grant = Grant("k", COUNT_CREDITS, 5, "top-up", "once", time.time())
        applied = await asyncio.gather(ledger.grant(grant, terms), ledger.grant(grant, terms))
        other_key = await ledger.grant(Grant("k2", COUNT_CREDITS, 5, "top-up", "once", time.time()), terms)
        account = await ledger.account("k", terms)
        await ledger.close()
        return sorted(applied), other_key, account.remaining_count(terms)

    applied, other_key, remaining = asyncio.run(scenario())
    assert applied == [False, True] and other_key is True and remaining == 5


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")

    async def scenario():
        await SqliteLedger.open(path)

    with pytest.raises(Exception, match="schema version 99 is newer"):
        asyncio.run(scenario())


def _raw_totals(path: Path, key_id: str, since: float, until: float | None) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        sql = "SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM usage WHERE key_id = ? AND ts >= ?"
        params: list = [key_id, since]
        if until is not None:
            sql += " AND ts < ?"
            params.append(until)
        return db.execute(sql, params).fetchone()


def test_window_totals_from_the_daily_rollup_equal_the_raw_rows(tmp_path):
    from core.ledger.sums import DAY, Totals, Window, window_totals

    base = 1_700_000_000.0 - (1_700_000_000 % DAY)  # a UTC midnight
    stamps = [base + offset for offset in (-5, 0, 1, 3600, DAY - 1, DAY, DAY + 7, 2 * DAY + 100, 3 * DAY + 50, 5 * DAY)]

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        for i, ts in enumerate(stamps):
            ledger._queue.put_nowait(UsageRecord(f"r{i}", ts, "k", "n", "m", "p", "m", 1, 1, 0, "token", "{}", 1000 + i, 0))
        await ledger.flush()
        windows = [
            (0.0, None),
            (base + 1, None),
            (base + 1, base + DAY + 7),
            (base + 2, base + 3),
            (base + DAY, base + 3 * DAY + 50),
            (base - 5, base + 5 * DAY),
        ]
        results = []
        for since, until in windows:
            totals = (await window_totals(ledger.reader, [Window("k", since, until)])).get(("k",), Totals())
            results.append(((since, until), (totals.requests, totals.cost_nanos)))
        await ledger.close()
        return results

    for (since, until), totals in asyncio.run(scenario()):
        assert totals == _raw_totals(tmp_path / "l.db", "k", since, until), (since, until)


def test_a_new_ledger_is_made_at_the_current_version_in_one_logged_step(tmp_path, caplog):
    from core.ledger.sqlite_schema import SCHEMA_VERSION

    caplog.set_level(logging.INFO, logger="tollgate.ledger")

    async def scenario() -> None:
        ledger = await SqliteLedger.open(tmp_path / "new.db")
        await ledger.close()

    asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records if r.name == "tollgate.ledger"] == [f"creating a new ledger at schema version {SCHEMA_VERSION}"]
    with sqlite3.connect(tmp_path / "new.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrating_a_version_1_database_backfills_the_rollup(tmp_path, caplog):
    from core.ledger.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

    caplog.set_level(logging.INFO, logger="tollgate.ledger")

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[1])
        db.execute("PRAGMA user_version = 1")
        rows = [("r", 1_700_000_000.0 + i * 40_000, "k", "n", "m", "p", "m", 10, 5, 0, "count", "{}", 2_000_000, 1, "ok") for i in range(5)]
        db.executemany(
            "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens,"
            " cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    terms = KeyBilling(mode="count", count_credits=10)
    account = asyncio.run(rebuilt(path, "k", terms))
    assert account.count_used == 5 and account.total_cost_nanos == 10_000_000 and account.request_count == 5
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 2
        assert db.execute("SELECT SUM(requests), SUM(cost_nanos) FROM usage_daily").fetchone() == (5, 10_000_000)
    migrating = [r.getMessage() for r in caplog.records if r.getMessage().startswith("migrating the ledger")]
    assert len(migrating) == SCHEMA_VERSION - 1  # an existing ledger says what each step is doing


def rollups_before_schema_15() -> list[str]:
    """The rollup upserts as the gateway wrote them before cache writes were summed (schemas 12 to 14)."""
    from dataclasses import replace

    from core.ledger.rollups import ROLLUPS

    return [replace(rollup, values=tuple(v for v in rollup.values if v != "cache_write_tokens")).sql for rollup in ROLLUPS]


@pytest.mark.parametrize("version", [*range(1, 7), 13, 14])
def test_every_earlier_schema_version_migrates_and_keeps_its_money(tmp_path, version):
    """A ledger left at each earlier schema version, with charges and a top-up, opens at the
    current version with the same balance, rollups that match the rows, and an audit log."""
    from core.ledger.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, _statements

    path = tmp_path / f"v{version}.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for step in range(1, version + 1):
            for statement in _statements(MIGRATIONS[step]):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
        rows = [("r", 1_700_000_000.0 + i * 40_000, "k", "n", "m", "p", "m", 10, 5, 0, "token", "{}", 3_000_000, 0, "ok") for i in range(6)]
        db.executemany(
            "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens,"
            " cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if version >= 12:  # today's rollups but cache writes (and before 14 the vendor side's): as that version's gateway wrote them
            for sql in rollups_before_schema_15():
                if version >= 14 or "usage_provider_slot" not in sql:
                    db.execute(sql, (0,))
        elif version >= 2:  # the rollups existed: keep them in step, as that version's gateway did
            db.execute("DELETE FROM usage_daily")
            db.execute(
                "INSERT INTO usage_daily SELECT key_id, strftime('%Y-%m-%d', ts, 'unixepoch'), model, cost_type, COUNT(*), SUM(prompt_tokens),"
                " SUM(completion_tokens), SUM(cached_tokens), SUM(cost_nanos), SUM(count_charged), SUM(status = 'error') FROM usage GROUP BY 1, 2, 3, 4"
            )
        if 3 <= version < 12:
            for table in ("usage_key_day", "usage_key_month", "usage_key_model", "usage_day_model"):
                db.execute(f"DELETE FROM {table}")
            for statement in _statements(MIGRATIONS[3]):
                if statement.startswith("INSERT"):
                    db.execute(statement)
        db.execute("INSERT INTO grants (key_id, kind, amount, reason, idempotency_key, ts) VALUES ('k', 'credits', 5000000, 'top-up', NULL, 1700000000)")
    terms = KeyBilling(mode="token", credits_nanos=100_000_000)
    account = asyncio.run(rebuilt(path, "k", terms))
    assert account.spent_nanos == 18_000_000 and account.granted_nanos == 5_000_000 and account.request_count == 6
    assert account.remaining_nanos(terms) == 100_000_000 + 5_000_000 - 18_000_000
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT SUM(requests), SUM(cost_nanos) FROM usage_key_model").fetchone() == (6, 18_000_000)
        assert db.execute("SELECT COUNT(*) FROM audit_log").fetchone() == (0,)
        # The vendor side's rollup holds the earlier charges, their vendor cost unknown (not $0).
        vendor_side = "SELECT SUM(requests), SUM(cost_nanos), SUM(vendor_cost_nanos), SUM(unknown_cost), SUM(priced_billed_nanos) FROM usage_provider_slot"
        assert db.execute(vendor_side).fetchone() == (6, 18_000_000, 0, 6, 0)
        assert db.execute("SELECT COUNT(*) FROM usage WHERE vendor_cost_nanos IS NULL AND vendor_unit_prices = ''").fetchone() == (6,)


def _rollup_cache_writes(db: sqlite3.Connection) -> dict[str, tuple[list[tuple], list[tuple]]]:
    """Per rollup: its groups' cache writes, and the same summed from the raw rows."""
    from core.ledger.rollups import _GROUPS, ROLLUPS

    found = {}
    for rollup in ROLLUPS:
        if "cache_write_tokens" in rollup.values:
            keys, groups = ", ".join(rollup.keys), ", ".join(_GROUPS[key] for key in rollup.keys)
            where = f"WHERE {rollup.only}" if rollup.only else ""
            summed = db.execute(f"SELECT {keys}, cache_write_tokens FROM {rollup.table} ORDER BY {keys}").fetchall()
            raw = db.execute(f"SELECT {groups}, SUM(cache_write_tokens) FROM usage {where} GROUP BY {groups} ORDER BY {groups}").fetchall()
            found[rollup.table] = (summed, raw)
    return found


def test_cache_writes_recorded_before_schema_15_are_summed_into_every_rollup_with_later_ones(tmp_path):
    """Schema 15 gave the rollups a column for cache writes: the charges written before it are
    summed in from their rows at the upgrade, and the totals the pages and the API read hold
    them with the charges written after it, over whole days and the raw rows at a window's edges."""
    from core.ledger.sqlite_schema import MIGRATIONS, _statements
    from core.ledger.sums import DAY, Window, account_totals

    base = 1_700_000_000.0 - (1_700_000_000 % DAY)  # a UTC midnight
    team = "account:team"

    def charge(request_id: str, ts: float, key_id: str, model: str, cache_writes: int, account_id: str = "") -> UsageRecord:
        return UsageRecord(
            request_id, ts, key_id, "n", model, f"p-{model}", f"up-{model}", 500, 10, 100, "token", "{}", 1000, 0, "ok", cache_writes, 0, account_id
        )

    old = [
        charge("r0", base + 10, "k", "m", 300),
        charge("r1", base + DAY + 10, "k", "m", 40, team),
        charge("r2", base + DAY + 20, "k", "m2", 5),
        charge("r3", base + 2 * DAY + 5, "k", "m", 0),
        charge("r4", base + 30, "k2", "m", 7, team),
    ]
    path = tmp_path / "v14.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for step in range(1, 15):
            for statement in _statements(MIGRATIONS[step]):
                db.execute(statement)
        db.execute("PRAGMA user_version = 14")
        db.executemany(f"INSERT INTO usage ({', '.join(UsageRecord._fields)}) VALUES ({', '.join('?' for _ in UsageRecord._fields)})", old)
        for sql in rollups_before_schema_15():
            db.execute(sql, (0,))

    async def scenario():
        ledger = await SqliteLedger.open(path)
        try:
            ledger.settle(await ledger.reserve("k", KeyBilling(credits_nanos=10**9), 0, 0), charge("r5", base + 2 * DAY + 50, "k", "m", 1000, team))
            all_time = await ledger.totals([Window("k", 0), Window("k2", 0)])
            by_model = await ledger.totals([Window("k", 0)], by_model=True)
            edges = await ledger.totals([Window("k", base + 20, base + 2 * DAY + 60)])  # r0 out; r1, r2 (a whole day), r3, r5 in
            accounts = await account_totals(ledger.reader, [Window(team, 0)])
            return all_time, by_model, edges, accounts
        finally:
            await ledger.close()

    all_time, by_model, edges, accounts = asyncio.run(scenario())
    assert (all_time[("k",)].cache_write_tokens, all_time[("k2",)].cache_write_tokens) == (1345, 7)
    assert all_time[("k",)].cached_tokens == 500  # beside the cache reads, which stay as they were
    assert {model: t.cache_write_tokens for (_, model, _), t in by_model.items()} == {"m": 1340, "m2": 5}
    assert edges[("k",)].cache_write_tokens == 1045
    assert accounts[(team,)].cache_write_tokens == 1047
    with sqlite3.connect(path) as db:
        for table, (summed, raw) in _rollup_cache_writes(db).items():
            assert summed == raw and any(row[-1] for row in summed), table


def test_stored_responses_are_written_in_batches_kept_across_restarts_and_pruned_after_30_days(tmp_path):
    from core.ledger import RESPONSE_RETENTION_SECONDS, StoredResponse

    now = [1_800_000_000.0]

    async def scenario():
        ledger = await SqliteLedger.open(tmp_path / "l.db", clock=lambda: now[0])
        old = StoredResponse("resp_old", "k", "p1", now[0] - RESPONSE_RETENTION_SECONDS - 1)
        ledger.remember_response(old)
        ledger.settle(await ledger.reserve("k", KeyBilling(credits_nanos=10**9), 1, 0), record("k", 1))
        ledger.remember_response(StoredResponse("resp_new", "k", "p2", now[0]))
        await ledger.flush()
        found = await ledger.stored_response("resp_new"), await ledger.stored_response("resp_old"), await ledger.stored_response("resp_none")
        await ledger.close()
        reopened = await SqliteLedger.open(tmp_path / "l.db")
        try:
            return found, await reopened.stored_response("resp_new")
        finally:
            await reopened.close()

    (new, old, unknown), after_restart = asyncio.run(scenario())
    assert new == after_restart == ("resp_new", "k", "p2", 1_800_000_000.0)
    assert old is None and unknown is None  # pruned in the batch that stored the new one
