"""Fleet admission on a real PostgreSQL, at the ledger: the requests of one key waiting in an
instance are admitted together, in one transaction, each checked against what those before it
hold; a request refused by a later check, or whose client left, holds nothing afterwards."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.config import ApiKey, Config, load_config
from core.errors import GatewayError
from core.ledger import InsufficientBalance, Reservation
from core.ledger.postgres import PgLedger
from test.postgres import PostgresServer

NANOS = 10**9


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init().start()
    yield server
    server.destroy()


def key_of(tmp_path: Path, name: str, text: str) -> tuple[Config, ApiKey]:
    path = tmp_path / "api.yaml"
    path.write_text(
        f"providers:\n  - provider: p1\n    base_url: http://127.0.0.1:9/v1\n    api: k\n    model: [m]\npreferences:\n  model_price: {{m: 0}}\n{text}"
    )
    config = load_config(path)
    return config, next(key for key in config.keys_by_id.values() if key.name == name)


def with_ledger(postgres: PostgresServer, test: Callable[[PgLedger], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        ledger = await PgLedger.open(postgres.new_database())
        try:
            return await test(ledger)
        finally:
            await ledger.close()

    return asyncio.run(run())


async def admit_all(ledger: PgLedger, key: ApiKey, total: int, balance_nanos: int = 0, tokens: int = 15) -> list[Reservation | Exception]:
    """`total` admissions of `key` at once, each with its own clock reading."""
    base = 1_800_000_000.0

    async def one(i: int) -> Reservation | Exception:
        try:
            return await ledger.admit(key, balance_nanos, balance_nanos, 0, tokens, base + i / 1000, uuid.uuid4().hex)
        except (GatewayError, InsufficientBalance) as exc:
            return exc

    return list(await asyncio.gather(*(one(i) for i in range(total))))


def codes(results: list[Reservation | Exception]) -> list[str]:
    return sorted(
        "admitted" if isinstance(result, Reservation) else result.code if isinstance(result, GatewayError) else "insufficient_balance" for result in results
    )


async def held(ledger: PgLedger) -> tuple[int, int]:
    """Reservations in the database, and the number of distinct admission times among them."""
    await ledger.flush()
    row = await ledger.pool.fetchrow("SELECT COUNT(*), COUNT(DISTINCT admitted_at) FROM reservations")
    return row[0], row[1]


def test_a_keys_requests_waiting_together_are_admitted_in_one_transaction(postgres, tmp_path):
    _, key = key_of(tmp_path, "busy", "api_keys:\n  - api: sk-batch-000001\n    name: busy\n    preferences: {concurrency_limit: 60}\n")

    async def test(ledger: PgLedger) -> None:
        results = await admit_all(ledger, key, 100)
        assert codes(results) == ["admitted"] * 60 + ["concurrency_limit_exceeded"] * 40
        # one batch: every hold written by one statement, at the batch's time (the latest clock reading)
        assert await held(ledger) == (60, 1)
        assert {result.admitted_at for result in results if isinstance(result, Reservation)} == {1_800_000_000.0 + 99 / 1000}
        assert ledger.limiter.state(key).in_flight == 60
        for result in results:
            if isinstance(result, Reservation):
                ledger.release(result)
        assert await held(ledger) == (0, 0)
        assert codes(await admit_all(ledger, key, 61)) == ["admitted"] * 60 + ["concurrency_limit_exceeded"]

    with_ledger(postgres, test)


def test_requests_refused_for_the_balance_hold_no_place_against_the_keys_concurrency_limit(postgres, tmp_path):
    # $1 of credit, $0.10 held per request: 10 admitted. The 30 refused for the balance must give
    # back the concurrency place their first check took, or the batch's later ones read 12 in flight.
    _, key = key_of(
        tmp_path, "short", "api_keys:\n  - api: sk-batch-000002\n    name: short\n    preferences: {billing_mode: token, credits: 1, concurrency_limit: 12}\n"
    )

    async def test(ledger: PgLedger) -> None:
        results = await admit_all(ledger, key, 40, balance_nanos=NANOS // 10)
        assert codes(results) == ["admitted"] * 10 + ["insufficient_balance"] * 30
        assert ledger.limiter.state(key).in_flight == 10
        assert await held(ledger) == (10, 1)

    with_ledger(postgres, test)


def test_requests_refused_by_their_accounts_limit_hold_nothing_of_their_keys_quota(postgres, tmp_path):
    # The key's own token quota covers 10 requests (15 tokens each); its account admits 5 at a
    # time. The 25 refused by the account must give back the quota their key's check held.
    _, key = key_of(
        tmp_path,
        "acme-one",
        "accounts:\n  - name: acme\n    preferences: {billing_mode: token, credits: 100, concurrency_limit: 5}\n"
        "api_keys:\n  - api: sk-batch-000003\n    name: acme-one\n    account: acme\n    preferences: {quota: 150, quota_type: tokens}\n",
    )

    async def test(ledger: PgLedger) -> None:
        results = await admit_all(ledger, key, 30)
        assert codes(results) == ["admitted"] * 5 + ["concurrency_limit_exceeded"] * 25
        assert all("account 'acme'" in str(result) for result in results if isinstance(result, GatewayError))
        assert ledger.limiter.state(key).quota_reserved == 5 * 15
        assert await held(ledger) == (5, 1)

    with_ledger(postgres, test)


@pytest.mark.parametrize(
    "blocked_on",
    [
        "SELECT 1 FROM accounts FOR UPDATE",  # their batch waits to read the key's state
        "SELECT 1 FROM rate_windows FOR UPDATE",  # their batch has checked them and waits to write their holds
    ],
    ids=["before-the-state-read", "while-the-holds-are-written"],
)
def test_a_request_that_leaves_while_waiting_for_admission_holds_nothing(postgres, tmp_path, blocked_on):
    # Ten of thirty leave while their batch is held up by another transaction's lock.
    _, key = key_of(tmp_path, "leaving", "api_keys:\n  - api: sk-batch-000004\n    name: leaving\n    preferences: {rate_limit: '1000/day'}\n")

    async def test(ledger: PgLedger) -> None:
        ledger.release(await ledger.admit(key, 0, 0, 0, 1, 1_800_000_000.0, uuid.uuid4().hex))  # the key's rows exist
        await ledger.flush()
        blocker = await asyncpg.connect(ledger.url)
        try:
            async with blocker.transaction():
                await blocker.execute(blocked_on)
                requests = [asyncio.create_task(ledger.admit(key, 0, 0, 0, 1, 1_800_000_000.0, uuid.uuid4().hex)) for _ in range(30)]
                deadline = time.monotonic() + 30
                while not await blocker.fetchval("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
                    assert time.monotonic() < deadline, "the batch never waited for the lock"
                    await asyncio.sleep(0.01)
                for request in requests[:10]:
                    request.cancel()
            results = await asyncio.gather(*requests, return_exceptions=True)
        finally:
            await blocker.close()
        assert all(isinstance(result, asyncio.CancelledError) for result in results[:10])
        assert all(isinstance(result, Reservation) for result in results[10:])
        assert ledger.limiter.state(key).in_flight == 20
        assert (await held(ledger))[0] == 20

    with_ledger(postgres, test)


def test_an_instance_whose_pool_is_all_at_work_still_renews_its_lease(postgres):
    # Under load every pooled connection may be busy admitting; a heartbeat queued behind them
    # could let the lease run out while the instance serves, and another would free its holds.
    async def test(ledger: PgLedger) -> None:
        assert ledger._heartbeat_task is not None
        ledger._heartbeat_task.cancel()  # this test beats itself
        await asyncio.gather(ledger._heartbeat_task, return_exceptions=True)
        observer = await asyncpg.connect(ledger.url)
        try:
            before = await observer.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", ledger.instance_id)
            async with ledger.pool.acquire(), ledger.pool.acquire():  # the whole pool (pool_size=2)
                await asyncio.wait_for(ledger.heartbeat(), 30)  # (without its own connection it waits for ever)
            after = await observer.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", ledger.instance_id)
        finally:
            await observer.close()
        assert after > before

    async def run() -> None:
        ledger = await PgLedger.open(postgres.new_database(), pool_size=2)
        try:
            await test(ledger)
        finally:
            await ledger.close()

    asyncio.run(run())


def test_requests_leaving_at_any_moment_of_their_admission_hold_nothing(postgres, tmp_path):
    # Rounds of fifty admissions, each cancelled after a random few milliseconds: before its
    # batch, during it, after its hold was handed over but before it woke. Whichever, what stays
    # held is exactly what was admitted and kept.
    _, key = key_of(tmp_path, "restless", "api_keys:\n  - api: sk-batch-000005\n    name: restless\n    preferences: {concurrency_limit: 10000}\n")
    chance = random.Random(21)

    async def test(ledger: PgLedger) -> None:
        kept: list[Reservation] = []
        for _ in range(20):
            requests = [asyncio.create_task(ledger.admit(key, 0, 0, 0, 1, 1_800_000_000.0, uuid.uuid4().hex)) for _ in range(50)]
            for request in requests:
                asyncio.get_running_loop().call_later(chance.uniform(0, 0.006), request.cancel)
            results = await asyncio.gather(*requests, return_exceptions=True)
            await asyncio.sleep(0.01)  # (the last cancels fire on finished requests: no-ops)
            kept += [result for result in results if isinstance(result, Reservation)]
        assert (await held(ledger))[0] == len(kept)
        await ledger.refresh_view(key, 1_800_000_000.0)  # (a batch's read counts releases still queued: the view lags)
        assert ledger.limiter.state(key).in_flight == len(kept)

    with_ledger(postgres, test)


def test_a_batch_never_counts_in_a_rate_window_older_than_the_databases(postgres, tmp_path):
    # Another host's clock a little ahead opened this minute's window; a request here, its clock
    # still in the last minute, counts in that window rather than starting the old one again.
    _, key = key_of(tmp_path, "skewed", "api_keys:\n  - api: sk-batch-000006\n    name: skewed\n    preferences: {rate_limit: '100/min'}\n")
    minute = 1_800_000_000.0 // 60 * 60

    async def test(ledger: PgLedger) -> None:
        first = await ledger.admit(key, 0, 0, 0, 1, minute + 1, uuid.uuid4().hex)
        second = await ledger.admit(key, 0, 0, 0, 1, minute - 2, uuid.uuid4().hex)
        row = await ledger.pool.fetchrow("SELECT window_start, used FROM rate_windows WHERE kind = 'requests'")
        assert (row["window_start"], row["used"]) == (minute, 2)
        assert first.admitted_at == minute + 1 and second.admitted_at == minute  # settlements find the window they counted in

    with_ledger(postgres, test)
