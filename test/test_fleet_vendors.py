"""Fleet mode, the vendor side: several real `python main.py` processes on one real PostgreSQL,
two fake vendors, and the providers' monthly budgets kept exactly across them (the month's
vendor cost in `provider_spend`, moved by every settlement; core/vendors/months.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core.ledger.postgres import VENDOR_SPEND_LOCK
from test.postgres import PostgresServer
from test.servers import FakeUpstream, ServerThread, WebhookReceiver
from test.test_fleet import ADMIN, KEY, MESSAGES, Fleet, Instance

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


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    hook.server = ServerThread(hook.app()).start()
    yield hook
    hook.server.stop()


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
    states = {state["provider"]: state for state in instances[1].get("/v1/providers_states").json()["providers"]}
    assert (states["p1"]["status"], states["p2"]["status"]) == ("over_budget", "over_budget")


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
