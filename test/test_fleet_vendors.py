"""Fleet mode, the vendor side: several real `python main.py` processes on one real PostgreSQL,
two fake vendors, and the providers' monthly budgets kept exactly across them (the month's
vendor cost in `provider_spend`, moved by every settlement; core/vendors/months.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.ledger import UsageRecord
from core.ledger.postgres import VENDOR_SPEND_LOCK, PgLedger
from core.ledger.postgres_schema import MIGRATIONS
from core.limits import period_bounds
from test.postgres import PostgresServer
from test.servers import FakeUpstream, completion_body
from test.test_fleet import ADMIN, KEY, MESSAGES, Fleet, Instance, fire_keys, slow_words

# Each answer of the fake vendors: 11 prompt and 7 completion tokens; at the cost price
# 1000,2000 (USD per 1M) that is $0.025 for the operator.
COST_PER_CALL = 25_000_000
DEADLINE = 10.0  # seconds: far beyond the 0.5 s refresh, for a loaded machine


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init().start()
    yield server
    server.destroy()


@pytest.fixture
def fleet(tmp_path: Path, postgres: PostgresServer, upstream: FakeUpstream) -> Iterator[Fleet]:
    made = Fleet(tmp_path, postgres, upstream)
    yield made
    made.stop()


def two_providers(fleet: Fleet, p1: str, p2: str = "", prefs: str = "") -> str:
    """api.yaml with p1 and p2 both serving echo-1, tried in that order; `p1`/`p2`: each
    provider's vendor terms (flow mapping entries); `prefs`: more global preferences."""
    provider = "  - provider: {name}\n    base_url: {url}\n    api: k\n    model: [echo-1]\n    preferences: {{cost_price: {{default: '1000,2000'}}{terms}}}\n"
    return (
        "providers:\n"
        + provider.format(name="p1", url="{upstream}", terms=f", {p1}" if p1 else "")
        + provider.format(name="p2", url=fleet.upstream.base_url("p2"), terms=f", {p2}" if p2 else "")
        + f"api_keys:\n  - api: {ADMIN}\n    role: admin\n  - api: {KEY}\n    name: fleet-user\n"
        + f"preferences:\n  SCHEDULING_ALGORITHM: fixed_priority\n  model_price: {{default: '1000,2000'}}\n{prefs}"
    )


def ask(instance: Instance) -> httpx.Response:
    """One chat completion through `instance`, as any HTTP client sends it."""
    return httpx.post(
        f"{instance.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"model": "echo-1", "messages": MESSAGES}, timeout=30
    )


def served_by(instance: Instance) -> str:
    answer = ask(instance)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-tollgate-provider"]


def until(what: Any, deadline: float = DEADLINE, pause: float = 0.05) -> Any:
    """Poll `what()` until it returns something true (the polled condition is the assertion)."""
    ends = time.monotonic() + deadline
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < ends, f"not within {deadline} s"
        time.sleep(pause)


def vendor_spend(fleet: Fleet, provider: str) -> int:
    """The provider's vendor cost in the ledger's usage rows (every charge ever written)."""
    return int(fleet.sql(f"SELECT COALESCE(SUM(vendor_cost_nanos), 0) FROM usage WHERE provider = '{provider}'"))


def provider_state(instance: Instance, provider: str) -> dict[str, Any]:
    """The provider's entry in GET /v1/providers_states through `instance`, its numbers exact."""
    answer = instance.get("/v1/providers_states")
    assert answer.status_code == 200, answer.text
    states = json.loads(answer.text, parse_float=Decimal)["providers"]
    return next(state for state in states if state["provider"] == provider)  # type: ignore[no-any-return]


def flush_all(fleet: Fleet) -> None:
    """Each instance writes what it has queued (a read that needs the whole ledger flushes)."""
    for instance in fleet.instances:
        assert instance.get("/v1/providers_states").status_code == 200


def test_a_provider_that_spent_its_budget_is_skipped_by_every_instance_then_none_left_is_503(fleet):
    instances = fleet.start("", text=two_providers(fleet, "monthly_budget: 0.1, budget_action: stop", "monthly_budget: 0.5, budget_action: stop"))

    # Requests spread over every instance spend p1's budget ($0.1: four calls of $0.025).
    turn = 0
    while vendor_spend(fleet, "p1") < 100_000_000:
        assert turn < 8
        served_by(instances[turn % 3])
        turn += 1
        flush_all(fleet)

    # Within the refresh interval every instance sees the fleet's spend and goes to p2 (each
    # instance's last calls may still reach p1 before it has read the others' charges).
    for instance in instances:
        until(lambda instance=instance: served_by(instance) == "p2")
    p1_calls = vendor_spend(fleet, "p1") // COST_PER_CALL
    assert [served_by(instance) for instance in instances * 2] == ["p2"] * 6
    assert vendor_spend(fleet, "p1") // COST_PER_CALL == p1_calls  # and p1 stays skipped

    # p2 spends its budget too: then no provider is left, and every instance says so.
    def refused(instance: Instance) -> httpx.Response | None:
        answer = ask(instance)
        return answer if answer.status_code == 503 else None

    for instance in instances:
        answer = until(lambda instance=instance: refused(instance))
        body = answer.json()["error"]
        assert (body["type"], body["code"]) == ("api_error", "provider_budget_exhausted"), body
        assert body["message"].startswith("Every provider of the model 'echo-1' has reached its monthly budget (p1, p2); it resets at ")
    assert vendor_spend(fleet, "p2") >= 500_000_000
    flush_all(fleet)
    fleet.assert_balances_equal_ledger_sums()
    assert (provider_state(instances[1], "p1")["status"], provider_state(instances[1], "p2")["status"]) == ("over_budget", "over_budget")


@contextlib.contextmanager
def vendor_writes_held(fleet: Fleet) -> Iterator[None]:
    """Settlements that carry a vendor cost wait (their shared VENDOR_SPEND_LOCK is taken
    here alone) while reads go on: the ledger's writes lagging behind its answers, as behind
    a slow commit or a busy database."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(fleet.database)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", VENDOR_SPEND_LOCK)
            locked.set()
            while not release.is_set():
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def test_an_instances_own_charges_count_against_a_stop_budget_while_its_writes_lag(fleet):
    (instance,) = fleet.start("", count=1, text=two_providers(fleet, "monthly_budget: 0.1, budget_action: stop"))
    assert served_by(instance) == "p1"  # $0.025 of $0.1, written
    flush_all(fleet)

    with vendor_writes_held(fleet):  # for about 3 s: six refreshes of the month's spend
        providers = []
        for _ in range(12):
            providers.append(served_by(instance))
            time.sleep(0.25)

    # Three more calls reach the budget; every later one goes to p2, however many times the
    # month was read again from a database that did not have them yet.
    assert providers == ["p1"] * 3 + ["p2"] * 9
    flush_all(fleet)
    assert vendor_spend(fleet, "p1") == 4 * COST_PER_CALL
    fleet.assert_balances_equal_ledger_sums()


async def varied(body: dict[str, Any], request: Request) -> Response:
    """Answers after up to 3 s (settlements spread over the burst) with 1 to 60 completion
    tokens (each call's vendor cost differs)."""
    await asyncio.sleep(random.uniform(0, 3))
    answer = completion_body(body)
    completion = random.randint(1, 60)
    answer["usage"] = {"prompt_tokens": 11, "completion_tokens": completion, "total_tokens": 11 + completion}
    return JSONResponse(answer)


# A month's row against the usage rows it sums, in one snapshot (a settlement writes both at once).
MONTH_VS_USAGE = (
    "SELECT s.nanos, (SELECT COALESCE(SUM(u.vendor_cost_nanos), 0) FROM usage u WHERE u.provider = s.provider AND u.ts >= s.since AND u.ts < s.period_end)"
    " FROM provider_spend s"
)


@contextlib.contextmanager
def month_row_churned(fleet: Fleet) -> Iterator[list[tuple[int, int]]]:
    """Delete the month's row and make it again from the rollup every 10 ms or so, through a
    ledger of our own (as the first instance into a new month does; the instances' refreshes
    make it too) while the instances' settlements commit; before each deletion, compare it
    with the usage rows. Yields the mismatches seen."""
    wrong: list[tuple[int, int]] = []
    done = threading.Event()

    async def churn() -> None:
        ledger = await PgLedger.open(fleet.database)
        since, until = period_bounds("monthly", ZoneInfo("UTC"), time.time())
        try:
            while not done.is_set():
                wrong.extend((row[0], row[1]) for row in await ledger.pool.fetch(MONTH_VS_USAGE) if row[0] != row[1])
                await ledger.pool.execute("DELETE FROM provider_spend")
                await ledger.vendor_month("p1", since, until)[1]
                await asyncio.sleep(0.01)
        finally:
            await ledger.close()

    thread = threading.Thread(target=asyncio.run, args=(churn(),))
    thread.start()
    try:
        yield wrong
    finally:
        done.set()
        thread.join()


def test_sixty_concurrent_requests_over_three_instances_move_provider_spend_exactly(fleet):
    fleet.upstream.script("p1", varied)
    instances = fleet.start("", text=two_providers(fleet, "monthly_budget: 1000"))
    assert served_by(instances[0]) == "p1"  # the month's row exists

    with month_row_churned(fleet) as wrong:
        statuses = fire_keys(instances, [KEY], 60)
    assert statuses == [200] * 60
    assert wrong == []

    flush_all(fleet)
    until(lambda: fleet.sql("SELECT COUNT(*) FROM provider_spend") == "1")  # made again by a refresh
    flush_all(fleet)
    total = vendor_spend(fleet, "p1")
    assert int(fleet.sql("SELECT COUNT(*) FROM usage WHERE provider = 'p1' AND vendor_cost_nanos IS NOT NULL")) == 61
    assert fleet.sql(MONTH_VS_USAGE) == f"{total}|{total}"
    states = [provider_state(instance, "p1") for instance in instances]
    assert {state["cost_this_month"] * 10**9 for state in states} == {total}
    used = (Decimal(total) / 10**12).quantize(Decimal("0.0001"), rounding="ROUND_DOWN")  # of the $1000 budget
    assert {(state["requests_this_month"], state["budget_used"]) for state in states} == {(61, used)}
    fleet.assert_balances_equal_ledger_sums()


def test_a_provider_budget_alert_crossed_on_three_instances_is_delivered_once(fleet, receiver):
    alerts = f"  alerts: {{thresholds: [0.5, 1.0], webhook_url: '{receiver.url}'}}\n"
    instances = fleet.start("", text=two_providers(fleet, "monthly_budget: 0.1", prefs=alerts))

    assert fire_keys(instances, [KEY], 6) == [200] * 6  # $0.15 of $0.1 at once, over every instance
    events = until(lambda: len(receiver.received) >= 2 and receiver.received)

    for instance in instances:  # every instance has read the month past both thresholds
        until(lambda instance=instance: provider_state(instance, "p1")["budget_used"] >= Decimal("1.5"))
    time.sleep(2)  # four refreshes of the month on every instance: a second record or delivery would be here
    assert sorted((e["provider"], e["metric"], e["threshold"], e["limit"]) for e in receiver.received) == [
        ("p1", "provider_monthly_budget", 0.5, "0.1"),
        ("p1", "provider_monthly_budget", 1.0, "0.1"),
    ], events
    assert all("key_id" not in event for event in receiver.received)
    assert fleet.sql("SELECT key_id, metric, status, attempts FROM alert_events ORDER BY threshold") == (
        "provider:p1|provider_monthly_budget|sent|1\nprovider:p1|provider_monthly_budget|sent|1"
    )
    assert fleet.sql("SELECT COUNT(*) FROM alert_fired") == "2"


def test_a_fleet_upgraded_from_schema_7_counts_its_earlier_calls_as_of_unknown_vendor_cost(fleet):
    """Usage rows and a dead instance's stream written before the vendor side (schema 7) are
    calls of unknown vendor cost: in the provider rollup, never $0 of known cost; the month's
    budget counts what is known."""
    now = time.time()
    old_stream = list(UsageRecord("r-stream", now, "k-old", "old", "echo-1", "p1", "echo-1", 11, 3, 0, "token", cost_nanos=5000))[:21]
    assert len(old_stream) == 21 and old_stream[-1] == 0  # a schema-7 record ends with `characters`

    async def schema_7() -> None:
        conn = await asyncpg.connect(fleet.database)
        try:
            async with conn.transaction():
                for version in range(1, 8):
                    await conn.execute(MIGRATIONS[version])
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (7)")
                for n, (provider, status) in enumerate([("p1", "ok"), ("p1", "error"), ("p1", "ok"), ("p2", "ok")]):
                    await conn.execute(
                        "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens,"
                        " cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES ($1, $2, 'k-old', 'old', 'echo-1', $3,"
                        " 'echo-1', 11, 7, 0, 'token', '{}', 25000, 0, $4)",
                        f"r-old-{n}",
                        now - 60,
                        provider,
                        status,
                    )
                await conn.execute(
                    "INSERT INTO reservations (request_id, key_id, instance_id, nanos, balance_nanos, count, tokens, admitted_at, reported)"
                    " VALUES ('r-stream', 'k-old', 'gone:1:dead', 0, 0, 0, 0, $1, $2)",
                    now - 30,
                    json.dumps(old_stream),
                )
        finally:
            await conn.close()

    asyncio.run(schema_7())
    instances = fleet.start("", count=2, text=two_providers(fleet, "monthly_budget: 0.1, budget_action: stop"))

    until(lambda: fleet.sql("SELECT COUNT(*) FROM reservations") == "0")  # the dead instance's stream billed, as a failed call
    assert fleet.sql("SELECT status, vendor_cost_nanos IS NULL FROM usage WHERE request_id = 'r-stream'") == "error|t"
    rollup = "SELECT provider, SUM(requests), SUM(vendor_cost_nanos), SUM(unknown_cost), SUM(priced_billed_nanos), SUM(errors) FROM usage_provider_slot"
    assert fleet.sql(rollup + " GROUP BY 1 ORDER BY 1") == "p1|4|0|4|0|2\np2|1|0|1|0|0"
    assert served_by(instances[0]) == "p1" and served_by(instances[1]) == "p1"  # two calls of known cost, $0.05 of the $0.1 budget
    flush_all(fleet)
    assert fleet.sql("SELECT nanos FROM provider_spend WHERE provider = 'p1'") == str(2 * COST_PER_CALL)
    state = provider_state(instances[1], "p1")
    assert (state["requests_this_month"], state["unknown_cost_requests"], state["errors_this_month"]) == (6, 4, 2)
    assert (state["cost_this_month"], state["budget_used"], state["status"]) == (Decimal("0.05"), Decimal("0.5"), "ok")
    assert (state["billed_this_month"], state["margin_this_month"]) == (Decimal("0.05008"), 0)  # the margin over the two priced calls only


def test_a_paused_instances_stream_billed_by_another_then_settled_by_itself_moves_the_month_once(fleet):
    """An instance stopped (SIGSTOP) past its lease: another frees its stream's hold and bills
    what it had reported, vendor cost included; resumed, it settles the same request itself,
    which applies nothing (as a batch retried after a lost reply): the month counts it once."""
    release = threading.Event()
    fleet.upstream.script("p1", slow_words(release))
    os.environ["TOLLGATE_STREAM_REPORT_SECONDS"] = "0.2"
    try:
        paused, survivor = fleet.start("", count=2, text=two_providers(fleet, "monthly_budget: 1000"))
    finally:
        del os.environ["TOLLGATE_STREAM_REPORT_SECONDS"]

    async def stream_pause_resume() -> None:
        stream = await paused.client().chat.completions.create(model="echo-1", messages=MESSAGES, stream=True)
        await stream.__anext__()  # relaying: its progress is reported every 0.2 s
        until(lambda: fleet.sql("SELECT COUNT(*) FROM reservations WHERE reported IS NOT NULL") == "1")
        os.kill(paused.process.pid, signal.SIGSTOP)
        try:
            until(lambda: fleet.sql("SELECT COUNT(*) FROM usage") == "1", deadline=30)  # billed by the survivor
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
        release.set()  # the vendor stops; the resumed instance ends the stream and settles it
        with pytest.raises(openai.APIError, match="ended the stream early"):
            async for _ in stream:
                pass

    try:
        asyncio.run(stream_pause_resume())
    finally:
        release.set()
    flush_all(fleet)
    until(lambda: fleet.sql("SELECT COUNT(*) FROM provider_spend") == "1")
    assert fleet.sql("SELECT status, vendor_cost_nanos > 0 FROM usage") == "error|t"
    assert fleet.sql(MONTH_VS_USAGE) == f"{vendor_spend(fleet, 'p1')}|{vendor_spend(fleet, 'p1')}"
    for instance in (survivor, paused):
        assert provider_state(instance, "p1")["cost_this_month"] * 10**9 == vendor_spend(fleet, "p1")
    fleet.assert_balances_equal_ledger_sums()
