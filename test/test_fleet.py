"""Fleet mode: several real `python main.py` processes on one real PostgreSQL, each money and
limit guarantee checked across them (requests spread over every instance), and the ledger
checked by SQL afterwards: every balance equals the sum of its ledger rows."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from core.ledger.postgres_schema import SCHEMA_VERSION
from test.conftest import clear_of_window_edge
from test.postgres import PostgresServer
from test.servers import FakeUpstream, ResponsesVendor, WebhookReceiver, held_stream, images_like, openai_like, stream_chunks
from test.test_billing import MEDIA_REPORTS
from test.test_cli import ROOT, _free_port, wait_until_healthy
from test.test_web import Browser

ADMIN = "sk-fleet-admin-0001"
KEY = "sk-fleet-user-0002"
MESSAGES = [{"role": "user", "content": "hello there"}]  # 10 prompt tokens estimated; the fake answers 5 completion tokens


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init().start()
    yield server
    server.destroy()


def config(prefs: str, upstream: str) -> str:
    return (
        f"providers:\n  - provider: p1\n    base_url: {upstream}\n    api: k\n    model: [echo-1]\n"
        f"api_keys:\n  - api: {ADMIN}\n    role: admin\n"
        f"  - api: {KEY}\n    name: fleet-user\n    preferences: {{{prefs}}}\n"
        "preferences:\n  model_price: {default: '1000,2000'}\n  count_billing: {default_count_price: 0.002}\n"
    )


class Instance:
    """One `python main.py --database postgresql://…` process, as an operator runs it."""

    def __init__(self, config_path: Path, database: str, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "main.py", "--config", str(config_path), "--database", database, "--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = {**os.environ, "TOLLGATE_HEARTBEAT_SECONDS": "1", "TOLLGATE_LEASE_SECONDS": "5"}
        # Its log to a file: a pipe nobody reads would block the gateway once full (a line per request).
        with open(config_path.parent / f"gateway-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stderr=log, env=env, start_new_session=True)
        wait_until_healthy(self.process, self.url, timeout=30)

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def get(self, path: str, key: str = ADMIN) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)

    def post(self, path: str, key: str = ADMIN, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}, timeout=10, **kwargs)

    def state(self) -> dict[str, Any]:
        return self.get("/v1/api_keys_states").json()["api_keys_states"][KEY]  # type: ignore[no-any-return]

    def kill(self) -> None:
        """kill -9 the process and, with --workers, its workers (its process group)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Fleet:
    def __init__(self, tmp: Path, postgres: PostgresServer, upstream: FakeUpstream):
        self.tmp, self.postgres, self.upstream = tmp, postgres, upstream
        self.database = postgres.new_database()
        self.instances: list[Instance] = []  # the ones requests go to
        self.started: list[Instance] = []  # every one started, stopped at the end
        self.paths: list[Path] = []

    def start(self, prefs: str, count: int = 3, *extra: str, one_file: bool = False, text: str | None = None) -> list[Instance]:
        """`count` instances, each with its own copy of api.yaml (as on separate hosts), or all
        on one file (`one_file`: a ConfigMap or network share mounted on every host). `text`:
        a whole api.yaml instead (`{upstream}` is the vendor's URL)."""
        self.paths = [self.tmp / ("shared" if one_file else f"host{i}") / "api.yaml" for i in range(count)]
        for path in self.paths:
            path.parent.mkdir(exist_ok=True)
            url = self.upstream.base_url("p1")
            path.write_text(text.replace("{upstream}", url) if text is not None else config(prefs, url))
        self.instances = [Instance(path, self.database, *extra) for path in self.paths]
        self.started += self.instances
        return self.instances

    def fire(self, total: int, **create: Any) -> list[int]:
        """`total` chat completions at once, spread round-robin over every instance; statuses."""
        return fire_keys(self.instances, [KEY], total, **create)

    def sql(self, query: str) -> str:
        return self.postgres.psql(query, self.database.rsplit("/", 1)[1])

    def assert_balances_equal_ledger_sums(self) -> None:
        """Every key's counters equal the sums of its usage and grant rows; nothing is held."""
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.get("/v1/api_keys_states")  # flushes that instance's queued charges
        mismatches = self.sql(
            "SELECT a.key_id FROM accounts a LEFT JOIN (SELECT key_id, SUM(cost_nanos) c, SUM(count_charged) n, COUNT(*) r,"
            " SUM(CASE WHEN cost_type = 'token' THEN cost_nanos ELSE 0 END) t FROM usage GROUP BY key_id"
            " UNION ALL SELECT account_id, SUM(cost_nanos), SUM(count_charged), COUNT(*),"  # an account's row: its keys' charges
            " SUM(CASE WHEN cost_type = 'token' THEN cost_nanos ELSE 0 END) FROM usage WHERE account_id <> '' GROUP BY account_id) u ON u.key_id = a.key_id"
            " LEFT JOIN (SELECT key_id, SUM(CASE WHEN kind = 'credits' THEN amount ELSE 0 END) g, SUM(CASE WHEN kind = 'count_credits' THEN amount ELSE 0 END) gc"
            " FROM grants GROUP BY key_id) g ON g.key_id = a.key_id"
            " WHERE a.total_cost_nanos <> COALESCE(u.c, 0) OR a.count_used <> COALESCE(u.n, 0) OR a.request_count <> COALESCE(u.r, 0)"
            " OR a.spent_nanos <> COALESCE(u.t, 0) OR a.granted_nanos <> COALESCE(g.g, 0) OR a.count_granted <> COALESCE(g.gc, 0)"
        )
        assert mismatches == "", f"accounts differing from their ledger rows: {mismatches}"
        assert self.sql("SELECT COUNT(*) FROM reservations") == "0", "reservations left behind"

    def stop(self) -> None:
        for instance in self.started:
            instance.kill()


async def slow(body: dict[str, Any], request: Request) -> Response:
    """A vendor that takes 0.5 s per answer, so that every request of a burst is in flight at once."""
    await asyncio.sleep(0.5)
    return await openai_like(body, request)


@pytest.fixture
def fleet(tmp_path: Path, postgres: PostgresServer, upstream: FakeUpstream) -> Iterator[Fleet]:
    """A fleet on the module's PostgreSQL in front of the slow vendor (a test may script another
    before it starts the instances)."""
    upstream.script("p1", slow)
    made = Fleet(tmp_path, postgres, upstream)
    yield made
    made.stop()


def test_count_credits_are_exact_over_three_instances(fleet):
    fleet.start("billing_mode: count, count_credits: 20")

    results = fleet.fire(60)

    assert results.count(200) == 20 and results.count(402) == 40
    fleet.assert_balances_equal_ledger_sums()
    assert [instance.state()["remaining_count_credits"] for instance in fleet.instances] == [0, 0, 0]


def test_token_credits_admit_what_the_balance_covers_over_three_instances(fleet):
    # Each request reserves its estimate, 10 prompt + 5 completion tokens at 1000/2000 USD per
    # 1M: $0.02. The README's bound: admitted while the balance covers every reservation in
    # flight, so below zero only by what answers cost beyond their reservations.
    fleet.start("billing_mode: token, credits: 0.2")

    results = fleet.fire(50, max_tokens=5)

    assert results.count(200) == 10 and results.count(402) == 40
    fleet.assert_balances_equal_ledger_sums()
    spent = int(fleet.sql("SELECT SUM(cost_nanos) FROM usage"))
    assert {instance.state()["remaining_credits"] for instance in fleet.instances} == {(200_000_000 - spent) / 10**9}


@pytest.mark.parametrize(
    ("prefs", "refused", "window"),
    [
        ("concurrency_limit: 10", 429, 0),
        ("rate_limit: '10/day'", 429, 86400),
        ("rate_limit: '10/month'", 429, 30 * 86400),  # uni-api's month: 30 days
        ("token_rate_limit: '150/day'", 429, 86400),  # 15 tokens reserved per request
        ("quota: 150, quota_type: tokens", 402, 0),
        ("quota: 0.2, quota_type: usd", 402, 0),
        ("daily_cost_limit: 0.2", 402, 86400),  # $0.02 reserved per request
        ("monthly_cost_limit: 0.2", 402, 0),
    ],
)
def test_fifty_requests_over_three_instances_against_a_limit_of_ten_admit_exactly_ten(fleet, prefs, refused, window):
    if window:
        clear_of_window_edge(window)
    fleet.start(prefs)

    results = fleet.fire(50, max_tokens=5)

    assert results.count(200) == 10 and results.count(refused) == 40, results
    fleet.assert_balances_equal_ledger_sums()


def test_a_top_up_through_one_instance_is_in_force_on_every_instance_at_once(fleet):
    first, second, third = fleet.start("billing_mode: count, count_credits: 1")
    assert sorted(fleet.fire(2)) == [200, 402]

    answer = first.post("/v1/add_count_credits", params={"paid_key": KEY, "amount": "3"}, headers={"Idempotency-Key": "top-up-1"})
    assert answer.status_code == 200, answer.text

    assert {instance.state()["remaining_count_credits"] for instance in (first, second, third)} == {3}
    assert second.state() == third.state() == first.state()
    assert fleet.fire(4).count(200) == 3
    fleet.assert_balances_equal_ledger_sums()


def test_an_idempotent_top_up_sent_to_every_instance_at_once_applies_once(fleet):
    instances = fleet.start("billing_mode: count, count_credits: 0")

    def top_up(instance: Instance, answers: list[int]) -> None:
        response = instance.post("/v1/add_count_credits", params={"paid_key": KEY, "amount": "5"}, headers={"Idempotency-Key": "same-one"})
        answers.append(response.status_code)

    answers: list[int] = []
    threads = [threading.Thread(target=top_up, args=(instance, answers)) for instance in instances for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers == [200] * 9
    assert fleet.sql("SELECT COUNT(*), SUM(amount) FROM grants") == "1|5"
    assert {instance.state()["remaining_count_credits"] for instance in instances} == {5}
    fleet.assert_balances_equal_ledger_sums()


def test_an_instance_killed_mid_request_has_its_holds_freed_within_30_seconds(fleet):
    release = threading.Event()
    fleet.upstream.script("p1", held_stream(release, ["one", "two", "three"]))
    made = fleet
    try:
        doomed, survivor = made.start("billing_mode: count, count_credits: 100, concurrency_limit: 2", count=2)

        async def held_streams() -> None:
            client = doomed.client()
            streams = [await client.chat.completions.create(model="echo-1", messages=MESSAGES, stream=True) for _ in range(2)]
            for stream in streams:  # the first event of each: both are admitted and relaying
                await stream.__anext__()
            doomed.kill()

        asyncio.run(held_streams())
        assert made.sql("SELECT COUNT(*) FROM reservations") == "2"
        refused = survivor.post("/v1/chat/completions", key=KEY, json={"model": "echo-1", "messages": MESSAGES})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"

        deadline = time.monotonic() + 30
        while made.sql("SELECT COUNT(*) FROM reservations") != "0":
            assert time.monotonic() < deadline, "the killed instance's reservations were not freed within 30 s"
            time.sleep(0.5)
        release.set()
        after = survivor.post("/v1/chat/completions", key=KEY, json={"model": "echo-1", "messages": MESSAGES, "stream": True})
        assert after.status_code == 200 and "three" in after.text
        made.instances = [survivor]
        made.assert_balances_equal_ledger_sums()
        assert made.sql("SELECT COUNT(*) FROM instances") == "1"
    finally:
        release.set()
        made.stop()


def test_postgres_going_away_fails_closed_and_loses_no_charge(tmp_path, upstream):
    server = PostgresServer().init().start()  # its own: the test stops it
    release = threading.Event()
    upstream.script("p1", held_stream(release, ["one", "two", "three"]))
    made = Fleet(tmp_path, server, upstream)
    try:
        (instance,) = made.start("billing_mode: count, count_credits: 100", count=1)
        received: list[str] = []

        def stream_through() -> None:
            response = openai.OpenAI(base_url=f"{instance.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
                model="echo-1", messages=MESSAGES, stream=True
            )
            received.extend(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)

        reader = threading.Thread(target=stream_through)
        reader.start()
        deadline = time.monotonic() + 10
        while made.sql("SELECT COUNT(*) FROM reservations") != "1":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop("fast")  # the database goes away with a request in flight
        release.set()
        reader.join(10)
        assert "".join(received) == "onetwothree"  # the answer was delivered ...

        refused = instance.post("/v1/chat/completions", key=KEY, json={"model": "echo-1", "messages": MESSAGES})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "ledger_unavailable"
        health = instance.get("/health").json()
        assert health["ledger"]["unwritten_rows"] == 1  # ... and its charge waits in memory
        deadline = time.monotonic() + 10
        while instance.get("/health").json()["ledger"]["database_reachable"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for path, key in (("/v1/config/status", ADMIN), ("/v1/usage", KEY), ("/v1/audit_log", ADMIN)):  # reads say so too: 503, not 500
            answer = instance.get(path, key=key)
            assert answer.status_code == 503 and answer.json()["error"]["code"] in ("ledger_unavailable", "ledger_not_writing"), (path, answer.text)

        server.start()
        deadline = time.monotonic() + 30
        while made.sql("SELECT COUNT(*) FROM usage") != "1":
            assert time.monotonic() < deadline, "the held charge was not written once the database was back"
            time.sleep(0.2)
        assert instance.post("/v1/chat/completions", key=KEY, json={"model": "echo-1", "messages": MESSAGES, "stream": True}).status_code == 200
        assert instance.state()["remaining_count_credits"] == 98
        made.assert_balances_equal_ledger_sums()
    finally:
        release.set()
        made.stop()
        server.destroy()


def test_a_billing_mode_change_through_one_instance_is_in_force_on_every_instance_within_2_seconds(fleet):
    first, second, third = fleet.start("billing_mode: token, credits: 1, count_credits: 3")
    config_before = fleet.paths[1].read_text()

    answer = second.post("/v1/set_billing_mode", params={"paid_key": KEY, "billing_mode": "count"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["api_key_state"]["billing_mode"] == "count"

    deadline = time.monotonic() + 2
    while {instance.state()["billing_mode"] for instance in (first, second, third)} != {"count"}:
        assert time.monotonic() < deadline, "the change did not reach every instance within 2 s"
        time.sleep(0.1)
    assert fleet.fire(6).count(200) == 3  # billed by count now, everywhere: 3 count credits
    assert fleet.paths[1].read_text() == config_before  # the database holds it, layered over the file
    status = first.get("/v1/config/status").json()
    (change,) = status["api_key_changes"]
    assert change["name"] == "fleet-user" and change["changes"] == {"preferences": {"billing_mode": "count"}} and change["problem"] is None
    (entry,) = [e for e in third.get("/v1/audit_log").json()["entries"] if e["action"] == "set_billing_mode"]  # audited, read on any instance
    assert '"count"' in entry["after"] and '"token"' in entry["before"]
    fleet.assert_balances_equal_ledger_sums()


def test_config_status_lists_every_live_instance_with_its_config_hash(fleet):
    first, second = fleet.start("billing_mode: token, credits: 1", count=2)

    status = first.get("/v1/config/status").json()
    assert len(status["instances"]) == 2 and status["config_hashes_differ"] is False
    assert {instance["config_hash"] for instance in status["instances"]} == {status["source_hash"]}
    assert [instance["this"] for instance in status["instances"]].count(True) == 1

    # The second instance's file changes (a host whose copy differs): the fleet's status shows it.
    path = fleet.paths[1]
    path.write_text(path.read_text().replace("credits: 1", "credits: 2"))
    deadline = time.monotonic() + 10
    while not first.get("/v1/config/status").json()["config_hashes_differ"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    # The admin's overview page lists the fleet too; a login on one instance holds on all
    # (the session signing secret is shared).
    browser = Browser(first.url)
    assert browser.login(ADMIN).status_code == 303
    page = browser.get("/admin").text
    assert page.count("(this one)") == 1 and "differs" in page
    assert all(instance["id"] in page for instance in status["instances"])
    browser.http.base_url = httpx.URL(second.url)
    assert "Instances" in browser.get("/admin").text

    second.kill()
    deadline = time.monotonic() + 15
    while len(first.get("/v1/config/status").json()["instances"]) != 1:
        assert time.monotonic() < deadline, "a stopped instance stays listed"
        time.sleep(0.5)


def test_workers_share_one_port_and_the_ledger(fleet):
    made = fleet
    try:
        (instance,) = made.start("billing_mode: count, count_credits: 20", 1, "--workers", "2")
        seen = set()
        deadline = time.monotonic() + 20
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"requests reached only {seen}"
            with httpx.Client() as fresh:  # a new connection each time: the kernel spreads them over the workers
                seen.add(fresh.get(f"{instance.url}/health").json()["ledger"]["instance"])
        assert len(instance.get("/v1/config/status").json()["instances"]) == 2
        results = made.fire(40)
        assert results.count(200) == 20 and results.count(402) == 20
        made.assert_balances_equal_ledger_sums()

        # kill -9 of the supervisor alone: its workers stop too, rather than serve unsupervised.
        workers = [int(worker.split(":")[1]) for worker in seen]
        instance.process.send_signal(signal.SIGKILL)
        instance.process.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.2)
    finally:
        made.stop()


@pytest.mark.parametrize("own_directory", [True, False], ids=["PROMETHEUS_MULTIPROC_DIR", "made-for-the-run"])
def test_a_scrape_of_any_worker_counts_the_requests_of_every_worker(fleet, tmp_path, own_directory):
    """`--workers 2`: prometheus_client's multiprocess mode, in the operator's directory or one
    made for the run. Whichever worker a scrape reaches, it counts the host's requests, not
    its own share."""
    if own_directory:
        (tmp_path / "metrics").mkdir()
        (tmp_path / "metrics" / "counter_1.db").write_bytes(b"left by an earlier run")  # emptied at the start
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    try:
        (instance,) = fleet.start("billing_mode: count, count_credits: 1000", 1, "--workers", "2")
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    workers = _worker_pids(instance)
    metrics_dir = Path(_environment(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
    assert (metrics_dir == tmp_path / "metrics") is own_directory and _environment(workers[1])["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_dir)
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}
    sent = 0
    while {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("counter_*.db")} != {str(pid) for pid in workers}:
        assert sent < 300, f"requests reached one worker only: {list(metrics_dir.iterdir())}"
        with httpx.Client() as fresh:  # a new connection each time: the kernel spreads them over the workers
            assert fresh.post(f"{instance.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
        sent += 1
    for _ in range(8):
        with httpx.Client() as fresh:
            text = fresh.get(f"{instance.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
        assert sum(s.value for s in samples if s.name == "tollgate_requests_total") == sent
        assert sum(s.value for s in samples if s.name == "tollgate_request_duration_seconds_count") == sent
        assert [s.value for s in samples if s.name == "tollgate_inflight_requests"] == [0]
        assert sum(s.value for s in samples if s.name == "tollgate_ledger_commit_seconds_count") > 0  # the PostgreSQL writer's commits


def _worker_pids(instance: Instance) -> list[int]:
    """The pids of an instance's two workers, as /health names them (`host:pid:…`)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"requests reached only {seen}"
        with httpx.Client() as fresh:
            seen.add(int(fresh.get(f"{instance.url}/health").json()["ledger"]["instance"].split(":")[1]))
    return sorted(seen)


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    return False


def alerted(receiver: WebhookReceiver, count_credits: int) -> str:
    return f"billing_mode: count, count_credits: {count_credits}, alerts: {{thresholds: [0.5], webhook_url: '{receiver.url}'}}"


def fire_in_waves(fleet: Fleet, waves: int, each: int) -> None:
    """Bursts one after another: each instance reads the key afresh at every admission, so after
    the last one every instance has seen its share of the key's use (and the crossing)."""
    for _ in range(waves):
        assert fleet.fire(each) == [200] * each
        time.sleep(0.3)


def test_an_alert_crossed_on_three_instances_fires_once_and_is_delivered_once(fleet, receiver):
    first, _, _ = fleet.start(alerted(receiver, 20))

    fire_in_waves(fleet, 4, 4)  # 16 of 20 count credits: past 50% on every instance

    (event,) = receiver.wait_for(1)
    assert (event["metric"], event["threshold"], event["limit"]) == ("count_credits", 0.5, "20")
    time.sleep(3)  # a second record or delivery would have come by now
    assert len(receiver.received) == 1, receiver.received
    assert fleet.sql("SELECT metric, threshold, status, attempts FROM alert_events") == "count_credits|0.5|sent|1"
    assert fleet.sql("SELECT COUNT(*) FROM alert_fired") == "1"

    # A top-up through one instance re-arms it (16 of 40); the next crossing fires once again.
    answer = first.post("/v1/add_count_credits", params={"paid_key": KEY, "amount": "20"})
    assert answer.status_code == 200, answer.text
    fire_in_waves(fleet, 4, 2)  # 24 of 40

    receiver.wait_for(2)
    time.sleep(3)
    assert [(e["metric"], e["limit"]) for e in receiver.received] == [("count_credits", "20"), ("count_credits", "40")]
    assert fleet.sql("SELECT COUNT(*) FROM alert_events WHERE status = 'sent' AND attempts = 1") == "2"
    fleet.assert_balances_equal_ledger_sums()
    browser = Browser(fleet.instances[2].url)  # any instance lists them (read from the database)
    browser.login(ADMIN)
    assert browser.get("/admin").text.count("count credits crossed 50%") == 2


def test_deliveries_owed_at_a_restart_are_sent_once_by_a_fleet_starting_at_once(fleet, receiver):
    instances = fleet.start(alerted(receiver, 20))
    fleet.stop()
    event = "INSERT INTO alert_events (key_id, key_name, metric, threshold, used, limit_value, ts, webhook_url, status{}) VALUES ('k1', 'fleet-user', 'credits', 0.5, '1', '2', {}, '{}', 'pending'{})"
    now = time.time()
    fleet.sql(event.format("", now - 5, receiver.url, ""))  # recorded, not yet claimed
    fleet.sql(event.format(", claimed_at", now - 300, receiver.url, f", {now - 120}"))  # claimed by an instance that died 2 minutes ago

    receiver.answer_after = 4  # every instance has read what is owed before the first delivery is done
    with ThreadPoolExecutor(len(instances)) as pool:  # every instance starts (and reads what is owed) at once
        fleet.instances = list(pool.map(lambda path: Instance(path, fleet.database), fleet.paths))
    fleet.started += fleet.instances

    deadline = time.monotonic() + 20
    while fleet.sql("SELECT status, attempts FROM alert_events ORDER BY id") != "sent|1\nsent|1":
        assert time.monotonic() < deadline, fleet.sql("SELECT * FROM alert_events")
        time.sleep(0.2)
    time.sleep(2)  # a second delivery would have come by now
    assert sorted(e["id"] for e in receiver.received) == [1, 2], receiver.received


def test_sqlite_refuses_more_than_one_worker(tmp_path):
    path = tmp_path / "api.yaml"
    path.write_text(config("billing_mode: count", "http://127.0.0.1:9"))
    done = subprocess.run(
        [sys.executable, "main.py", "--config", str(path), "--db", str(tmp_path / "t.db"), "--workers", "2", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--workers 2 needs PostgreSQL" in done.stderr and "--database postgresql://" in done.stderr


@pytest.mark.parametrize(
    ("database", "told"),
    [
        ("mysql://db/tollgate", "unknown database scheme 'mysql://'"),
        ("sqlite:///", "sqlite:/// needs a file path"),
        ("postgresql://tollgate:s3cret@127.0.0.1:9/tollgate", "cannot connect to the PostgreSQL ledger at postgresql://tollgate:***@127.0.0.1:9/tollgate"),
    ],
)
def test_a_database_that_cannot_be_used_stops_the_start_in_one_line(tmp_path, database, told):
    path = tmp_path / "api.yaml"
    path.write_text(config("billing_mode: count", "http://127.0.0.1:9"))
    done = subprocess.run(
        [sys.executable, "main.py", "--config", str(path), "--database", database, "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and told in done.stderr, done.stderr
    assert "s3cret" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def slow_words(release: threading.Event) -> Any:
    """A long generation: a word every 50 ms until `release`."""

    async def handler(body: dict[str, Any], request: Request) -> Response:
        chunks = stream_chunks(body, ["word "] * 2000)

        async def gen():  # type: ignore[no-untyped-def]
            for chunk in chunks:
                if release.is_set():
                    break
                yield chunk
                await asyncio.sleep(0.05)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return handler


def test_what_a_killed_instances_stream_had_reported_is_billed_once(fleet):
    release = threading.Event()
    fleet.upstream.script("p1", slow_words(release))
    made = fleet
    os.environ["TOLLGATE_STREAM_REPORT_SECONDS"] = "0.2"
    try:
        doomed, survivor = made.start("billing_mode: token, credits: 10", count=2)
    finally:
        del os.environ["TOLLGATE_STREAM_REPORT_SECONDS"]
    try:

        async def stream_then_kill() -> None:
            stream = await doomed.client().chat.completions.create(model="echo-1", messages=MESSAGES, stream=True)
            await stream.__anext__()  # relaying: its progress is reported every 0.2 s
            deadline = time.monotonic() + 10
            while made.sql("SELECT COUNT(*) FROM reservations WHERE reported IS NOT NULL") != "1":
                assert time.monotonic() < deadline, "no progress report"
                await asyncio.sleep(0.1)
            doomed.kill()

        asyncio.run(stream_then_kill())
        deadline = time.monotonic() + 30
        while made.sql("SELECT COUNT(*) FROM usage") != "1":
            assert time.monotonic() < deadline, "the killed instance's stream was not billed within 30 s"
            time.sleep(0.5)
        status, prompt, completion, cost = made.sql("SELECT status, prompt_tokens, completion_tokens, cost_nanos FROM usage").split("|")
        assert status == "error" and int(prompt) == 10 and int(completion) >= 1 and int(cost) > 0
        made.instances = [survivor]
        made.assert_balances_equal_ledger_sums()
        assert survivor.state()["total_cost"] == int(cost) / 10**9
    finally:
        release.set()
        made.stop()


def test_a_keys_limits_read_the_same_on_every_instance(fleet):
    clear_of_window_edge(86400)
    first, second, third = fleet.start("rate_limit: '10/day', daily_cost_limit: 1")
    fleet.instances = [first]
    assert fleet.fire(4, max_tokens=5) == [200] * 4  # all through the first instance

    for instance in (first, second, third):
        limits = {row["name"]: row for row in instance.get("/v1/usage", key=KEY).json()["limits"]}
        assert limits["rate_limit"]["used"] == 4
        assert limits["daily_cost_limit"]["used"] == float(int(fleet.sql("SELECT SUM(cost_nanos) FROM usage")) / 10**9)


def test_instances_starting_together_on_a_new_database_migrate_it_once(tmp_path, postgres, upstream):
    path = tmp_path / "api.yaml"
    path.write_text(config("billing_mode: count, count_credits: 5", upstream.base_url("p1")))
    database = postgres.new_database()
    made = Fleet(tmp_path, postgres, upstream)
    made.database = database
    ports = [_free_port() for _ in range(4)]
    processes = [
        subprocess.Popen(
            [sys.executable, "main.py", "--config", str(path), "--database", database, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for process, port in zip(processes, ports, strict=True):
            wait_until_healthy(process, f"http://127.0.0.1:{port}", timeout=30)
        assert made.sql("SELECT version FROM schema_version") == str(SCHEMA_VERSION)
        assert made.sql("SELECT COUNT(*) FROM instances") == "4"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_a_limit_changed_in_the_fleets_shared_config_is_in_force_on_every_instance_within_2_seconds(fleet):
    clear_of_window_edge(86400)
    instances = fleet.start("rate_limit: '2/day'", one_file=True)
    assert fleet.fire(6).count(200) == 2

    path = fleet.paths[0]
    path.write_text(path.read_text().replace("rate_limit: '2/day'", "rate_limit: '5/day'"))
    deadline = time.monotonic() + 2
    while {instance.get("/v1/config/status").json()["source_hash"] for instance in instances} != {hashlib.sha256(path.read_bytes()).hexdigest()}:
        assert time.monotonic() < deadline, "the change did not reach every instance within 2 s"
        time.sleep(0.1)
    assert fleet.fire(6).count(200) == 3  # 5 a day now, on every instance together
    deadline = time.monotonic() + 10  # the fleet's table learns each hash at its next heartbeat (1 s here)
    while instances[0].get("/v1/config/status").json()["config_hashes_differ"]:
        assert time.monotonic() < deadline, "the fleet still shows differing files"
        time.sleep(0.2)


ACME_ONE, ACME_TWO = "sk-fleet-acme-0003", "sk-fleet-acme-0004"
ACCOUNTS_CONFIG = f"""
providers:
  - provider: p1
    base_url: {{upstream}}
    api: k
    model: [echo-1]
accounts:
  - name: acme
    preferences: {{billing_mode: count, count_credits: 7}}
api_keys:
  - api: {ADMIN}
    role: admin
  - api: {ACME_ONE}
    name: acme-one
    account: acme
  - api: {ACME_TWO}
    name: acme-two
    account: acme
preferences:
  model_price: {{default: '1000,2000'}}
  count_billing: {{default_count_price: 0.002}}
"""


def fire_keys(
    instances: list[Instance], keys: list[str], total: int, call: Callable[[openai.AsyncOpenAI], Awaitable[Any]] | None = None, **create: Any
) -> list[int]:
    """`total` requests at once, spread round-robin over the instances and the keys: `call(client)`
    each, by default a chat completion of `create`."""

    async def all_at_once() -> list[int]:
        clients = [instance.client(key) for instance in instances for key in keys]

        async def one(i: int) -> int:
            try:
                client = clients[i % len(clients)]
                await (call(client) if call is not None else client.chat.completions.create(model="echo-1", messages=MESSAGES, **create))
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        try:
            return list(await asyncio.gather(*(one(i) for i in range(total))))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(all_at_once())


def test_two_keys_of_one_account_share_its_count_credits_exactly_across_instances(fleet):
    instances = fleet.start("", count=2, text=ACCOUNTS_CONFIG)
    statuses = fire_keys(instances, [ACME_ONE, ACME_TWO], 40)
    assert statuses.count(200) == 7 and set(statuses) == {200, 402}  # the account's 7, over 2 keys on 2 instances
    instances[0].get("/v1/api_keys_states")  # writes what the first instance has queued (its last 10 ms)
    account = instances[1].get("/v1/accounts/acme").json()
    assert account["state"]["remaining_count_credits"] == 0 and account["state"]["request_count"] == 7

    top_up = instances[0].post("/v1/accounts/acme/credits", json={"amount": "3", "kind": "count_credits"})
    assert top_up.status_code == 200, top_up.text
    assert fire_keys(instances, [ACME_TWO, ACME_ONE], 10).count(200) == 3  # a top-up on one instance is spent on both
    fleet.assert_balances_equal_ledger_sums()


def test_an_account_made_and_changed_through_one_instance_is_in_force_on_every_instance(fleet):
    first, second = fleet.start("", count=2, text=ACCOUNTS_CONFIG)
    made = first.post("/v1/accounts", json={"name": "team", "preferences": {"billing_mode": "count", "count_credits": 2}})
    assert made.status_code == 201, made.text
    key = first.post("/v1/api_keys", json={"name": "team-a", "account": "team"}).json()
    deadline = time.monotonic() + 3
    while second.get(f"/v1/api_keys/{key['id']}").status_code != 200:  # the other instance applies it within a second
        assert time.monotonic() < deadline, "the key made in the new account never reached the other instance"
        time.sleep(0.1)
    assert fire_keys([second], [key["api"]], 4).count(200) == 2

    patched = httpx.patch(
        f"{second.url}/v1/accounts/team", headers={"Authorization": f"Bearer {ADMIN}"}, json={"preferences": {"count_credits": 5}}, timeout=10
    )
    assert patched.status_code == 200, patched.text
    while first.get("/v1/accounts/team").json()["state"]["remaining_count_credits"] != 3:  # the new terms, on the other instance
        assert time.monotonic() < deadline + 3, "the account's new terms never reached the other instance"
        time.sleep(0.1)
    assert fire_keys([first], [key["api"]], 5).count(200) == 3
    fleet.assert_balances_equal_ledger_sums()


def test_keys_made_changed_rotated_and_deleted_through_one_instance_are_in_force_on_every_instance(fleet):
    first, second = fleet.start("billing_mode: token, credits: 1", count=2)

    def answers(instance: Instance, secret: str, within: float = 3.0, expect: int = 200) -> None:
        """Until `instance` answers `expect` to a chat with `secret` (polled: other instances
        pick a stored change up within a second)."""
        deadline = time.monotonic() + within
        while True:
            got = httpx.post(f"{instance.url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "echo-1", "messages": MESSAGES}, timeout=10).status_code  # fmt: skip
            if got == expect:
                return
            assert time.monotonic() < deadline, f"{instance.url} answered {got}, not {expect}, for {within} s"
            time.sleep(0.1)

    made = first.post("/v1/api_keys", json={"name": "made-on-first", "preferences": {"billing_mode": "count", "count_credits": 5}})
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["api"], made.json()["id"]
    answers(second, secret)  # made on one instance, used on the other

    patched = httpx.patch(
        f"{second.url}/v1/api_keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}, json={"preferences": {"enabled": False}}, timeout=10
    )
    assert patched.status_code == 200, patched.text
    answers(first, secret, expect=403)  # disabled through the other instance
    httpx.patch(f"{first.url}/v1/api_keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}, json={"preferences": {"enabled": None}}, timeout=10)
    answers(second, secret)

    rotated = second.post(f"/v1/api_keys/{key_id}/rotate")
    assert rotated.status_code == 200, rotated.text
    answers(first, secret, expect=401)
    answers(first, rotated.json()["api"])
    assert first.get(f"/v1/api_keys/{key_id}").json()["state"]["remaining_count_credits"] < 5  # the balance stayed with the id

    assert httpx.delete(f"{first.url}/v1/api_keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).status_code == 200
    answers(second, rotated.json()["api"], expect=401)
    assert second.get(f"/v1/api_keys/{key_id}").json()["status"] == "deleted"
    fleet.assert_balances_equal_ledger_sums()


@pytest.mark.parametrize(
    ("prefs", "refused", "window"),
    [
        ("concurrency_limit: 10", 429, 0),
        ("rate_limit: '10/day'", 429, 86400),
        ("token_rate_limit: '150/day'", 429, 86400),  # 15 tokens reserved per request
        ("daily_cost_limit: 0.2", 402, 86400),  # $0.02 reserved per request
        ("monthly_cost_limit: 0.2", 402, 0),
    ],
)
def test_an_accounts_own_limit_of_ten_admits_exactly_ten_of_fifty_requests_over_its_two_keys_and_two_instances(fleet, prefs, refused, window):
    if window:
        clear_of_window_edge(window)
    text = ACCOUNTS_CONFIG.replace("{billing_mode: count, count_credits: 7}", f"{{billing_mode: token, credits: 100, {prefs}}}")
    instances = fleet.start("", count=2, text=text)

    results = fire_keys(instances, [ACME_ONE, ACME_TWO], 50, max_tokens=5)

    assert results.count(200) == 10 and results.count(refused) == 40, results
    fleet.assert_balances_equal_ledger_sums()


def test_billing_modes_set_through_the_api_before_the_keys_api_become_its_stored_changes_on_upgrade(postgres):
    """A fleet upgraded from schema 2 keeps the billing modes its admins set (key_settings):
    they become merge patches over api.yaml's keys, in force as before."""
    import asyncpg

    from core.config import build_config, ledger_id
    from core.keys.records import SELECT_RECORDS, layered, record_from_row
    from core.ledger.postgres_schema import MIGRATIONS, migrate

    database = postgres.new_database()

    async def upgrade() -> list[Any]:
        conn = await asyncpg.connect(database)
        try:
            async with conn.transaction():  # the schema as the previous release left it, with a mode set
                for version in (1, 2):
                    await conn.execute(MIGRATIONS[version])
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (2)")
                await conn.execute("INSERT INTO key_settings (key_id, name, value, updated_at) VALUES ($1, 'billing_mode', 'count', 1.0)", ledger_id(KEY))
            assert await migrate(conn) == 2
            return list(await conn.fetch(SELECT_RECORDS))
        finally:
            await conn.close()

    (row,) = asyncio.run(upgrade())
    record = record_from_row(row)
    assert (record.id, record.defined_in, record.entry) == (ledger_id(KEY), "api.yaml", {"preferences": {"billing_mode": "count"}})
    file_config = build_config(config("billing_mode: token, count_credits: 3", "http://127.0.0.1:1"), "api.yaml")
    assert layered(file_config, {record.id: record}).keys_by_id[ledger_id(KEY)].billing.mode == "count"


OTHER = "sk-fleet-other-0003"
RESPONSES_CONFIG = (
    "providers:\n  - provider: p1\n    base_url: {upstream}\n    api: k\n    model: [gpt-5]\n"
    f"api_keys:\n  - api: {ADMIN}\n    role: admin\n  - api: {KEY}\n    name: fleet-user\n  - api: {OTHER}\n    name: other\n"
)


def test_a_response_created_through_one_instance_is_retrieved_through_another_by_its_key_only(fleet):
    fleet.upstream.script("p1", ResponsesVendor())
    first, second = fleet.start("", count=2, text=RESPONSES_CONFIG)

    async def create_then_read() -> None:
        made = await first.client().responses.create(model="gpt-5", input="hello there")
        first.get("/v1/api_keys_states")  # the first instance has written what it queued (within ~10 ms anyway)
        assert (await second.client().responses.retrieve(made.id)).output_text == "Hello from responses"
        followed = await second.client().responses.create(model="gpt-5", input="more", previous_response_id=made.id)
        assert followed.previous_response_id == made.id
        for instance in (first, second):
            with pytest.raises(openai.NotFoundError):
                await instance.client(OTHER).responses.retrieve(made.id)

    asyncio.run(create_then_read())
    second.get("/v1/api_keys_states")  # flushes the second instance's queue
    assert fleet.sql("SELECT COUNT(*), COUNT(DISTINCT key_id), MIN(provider) FROM stored_responses") == "2|1|p1"  # both creates, one key


UNITS_TEXT = (
    "providers:\n  - provider: p1\n    base_url: {upstream}\n    api: k\n    model: [echo-1]\n"
    f"api_keys:\n  - api: {ADMIN}\n    role: admin\n  - api: {KEY}\n    name: fleet-user\n    preferences: {{credits: 10}}\n"
    "preferences:\n  model_price:\n    default: '1000,2000'\n    dall-e-3: {image_price: 0.04}\n"
    "    whisper-1: {audio_minute_price: 0.006}\n    tts-1: {character_price: 15}\n"
)


def test_media_units_read_from_postgresql_as_from_sqlite(fleet):
    """The reports' reads of the media units (rollups and raw rows, pages and CSV) on the
    fleet's ledger: reported through one instance, read through another."""
    first, second = fleet.start("", count=2, text=UNITS_TEXT)
    for body in MEDIA_REPORTS:  # 3 images, 12.5 minutes of audio, 2,000 characters
        assert first.post("/v1/usage/report", json={"api_key": KEY, **body}).status_code == 200
    units = {"dall-e-3": {"images": 3}, "whisper-1": {"audio_minutes": 12.5}, "tts-1": {"characters": 2000}}
    names = ("images", "audio_minutes", "characters")

    def shown(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {row["model"]: {name: row[name] for name in names if name in row} for row in rows}

    assert shown(second.state()["cost_details"]["billing_details"]) == units  # usage_key_model
    assert shown(second.get(f"/v1/token_usage?last_n_days=1&api_key_param={KEY}").json()["stats"][0]["usage"]) == units  # raw rows
    year, month = time.gmtime()[:2]
    statement = second.get(f"/v1/billing/bill/{year}/{month:02d}", key=KEY).json()  # usage_daily
    assert shown(statement["line_items"]) == units
    assert {name: statement["totals"][name] for name in names} == {"images": 3, "audio_minutes": 12.5, "characters": 2000}
    browser = Browser(second.url)
    browser.login(ADMIN)
    summary = {row["key_name"]: row for row in csv.DictReader(io.StringIO(browser.get("/admin/export/keys.csv").text))}
    assert [summary["fleet-user"][name] for name in names] == ["3", "12.5", "2000"]
    log = list(csv.DictReader(io.StringIO(browser.get("/admin/export/requests.csv").text)))
    assert sorted((row["images"], row["audio_minutes"], row["characters"]) for row in log) == [("0", "0", "2000"), ("0", "12.5", "0"), ("3", "0", "0")]
    tab = browser.get("/admin/keys").text  # usage_key_day
    assert all(f">{part}<" in tab for part in ("3 images", "12.5 min audio", "2,000 characters"))
    fleet.assert_balances_equal_ledger_sums()


ANTHROPIC_TEXT = (
    "providers:\n  - provider: p1\n    engine: anthropic\n    base_url: {upstream}\n    api: k\n    model: [claude-sonnet]\n"
    f"api_keys:\n  - api: {ADMIN}\n    role: admin\n  - api: {KEY}\n    name: fleet-user\n    preferences: {{credits: 10}}\n"
    "preferences:\n  model_price: {default: '1000,2000'}\n"
)


def test_cache_writes_from_before_schema_9_and_after_read_from_postgresql_as_from_sqlite(fleet):
    """A fleet ledger left at schema 8 holds a charge with 70 cache writes that its rollups could
    not sum; upgraded, it is summed in from its row, and a /v1/messages call through one instance
    (Anthropic reports 100 cache writes) is added by the settlement: another instance reads both."""
    import anthropic
    import asyncpg
    from starlette.responses import JSONResponse

    from core.config import ledger_id
    from core.ledger.postgres_schema import MIGRATIONS
    from core.ledger.rollups import _PG_GROUPS, ROLLUPS
    from test.test_anthropic import MESSAGE

    async def anthropic_vendor(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(MESSAGE)

    async def schema_8() -> None:
        conn = await asyncpg.connect(fleet.database)
        try:
            async with conn.transaction():
                for version in range(1, 9):
                    await conn.execute(MIGRATIONS[version])
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (8)")
                await conn.execute(
                    "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens,"
                    " cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status, cache_write_tokens) VALUES ('r-old', $1, $2,"
                    " 'fleet-user', 'claude-sonnet', 'p1', 'claude-sonnet', 200, 5, 50, 'token', '{}', 1000, 0, 'ok', 70)",
                    time.time() - 60,
                    ledger_id(KEY),
                )
                for rollup in ROLLUPS:  # as schema 8's instances summed it: without the cache writes
                    before = dataclasses.replace(rollup, values=tuple(v for v in rollup.values if v != "cache_write_tokens"))
                    await conn.execute("WITH new AS (SELECT * FROM usage) " + before.pg_upsert("new"))
        finally:
            await conn.close()

    fleet.upstream.script("p1", anthropic_vendor)
    asyncio.run(schema_8())
    first, second = fleet.start("", count=2, text=ANTHROPIC_TEXT)
    client = anthropic.Anthropic(base_url=first.url, api_key=KEY, max_retries=0)
    client.messages.create(model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "Weather in Paris?"}])
    first.get("/v1/api_keys_states")  # flushes the first instance's charge
    (detail,) = second.state()["cost_details"]["billing_details"]
    assert (detail["cached_tokens"], detail["cache_write_tokens"]) == (1050, 170)
    (provider,) = [p for p in second.get("/v1/providers_states").json()["providers"] if p["provider"] == "p1"]
    assert [(m["cached_tokens"], m["cache_write_tokens"]) for m in provider["models"]] == [(1050, 170)]
    for rollup in ROLLUPS:
        if "cache_write_tokens" in rollup.values:
            keys, groups = ", ".join(rollup.keys), ", ".join(_PG_GROUPS[key] for key in rollup.keys)
            raw = fleet.sql(
                f"SELECT {groups}, SUM(cache_write_tokens) FROM usage {f'WHERE {rollup.only}' if rollup.only else ''} GROUP BY {groups} ORDER BY {groups}"
            )
            assert fleet.sql(f"SELECT {keys}, cache_write_tokens FROM {rollup.table} ORDER BY {keys}") == raw, rollup.table


VENDOR_TEXT = (
    "providers:\n  - provider: p1\n    base_url: {upstream}\n    api: k\n    model: [echo-1]\n"
    "    preferences: {cost_price: {default: '0.123456789,0.2'}, monthly_budget: 0.00001}\n"
    f"api_keys:\n  - api: {ADMIN}\n    role: admin\n  - api: {KEY}\n    name: fleet-user\n    preferences: {{credits: 10}}\n"
    "preferences:\n  model_price: {default: '1000,2000'}\n  alerts: {thresholds: [0.5]}\n"
)


def test_the_providers_page_and_csv_read_from_postgresql_as_from_sqlite(fleet):
    """The Providers page, its CSV and its alerts on the fleet's ledger: charged through one
    instance, read through another, equal to the ledger's rows."""
    first, second = fleet.start("", count=2, text=VENDOR_TEXT)
    assert fire_keys([first], [KEY], 3) == [200] * 3
    vendor_cost = int(fleet.sql("SELECT SUM(vendor_cost_nanos) FROM usage"))
    browser = Browser(second.url)
    browser.login(ADMIN)
    rows = list(csv.DictReader(io.StringIO(browser.get("/admin/export/providers.csv").text)))
    assert [(row["provider"], row["upstream_model"], row["requests"]) for row in rows] == [("p1", "echo-1", "3")]
    assert Decimal(rows[0]["vendor_cost_usd"]) * 10**9 == vendor_cost
    page = browser.get("/admin/providers").text
    assert f'data-usd="{Decimal(vendor_cost) / 10**9}"' in page.split('<tr data-provider="p1">')[1].split("</tr>")[0]
    deadline = time.monotonic() + 10  # 3 x ~2.8 µ$ of a 10 µ$ budget: past its half
    while '<a href="/admin/providers">provider p1</a>' not in browser.get("/admin/providers").text:
        assert time.monotonic() < deadline, "the provider's budget alert is not on its page"
        time.sleep(0.2)


def test_sixty_image_requests_over_three_instances_are_billed_per_image_without_overspending(fleet):
    """Each request reserves its n=2 images (0.08 USD) on the fleet's ledger before the vendor
    is called: with 1 USD, exactly 12 of 60 requests spread over three instances are served,
    and each charge records its images."""
    fleet.upstream.script("p1", images_like())
    text = UNITS_TEXT.replace("preferences: {credits: 10}", "preferences: {credits: 1}").replace("model: [echo-1]", "model: [dall-e-3]")
    instances = fleet.start("", count=3, text=text)
    statuses = fire_keys(instances, [KEY], 60, lambda client: client.images.generate(model="dall-e-3", prompt="x", n=2))
    assert statuses.count(200) == 12 and statuses.count(402) == 48
    fleet.assert_balances_equal_ledger_sums()
    assert fleet.sql("SELECT COUNT(*), SUM(images), SUM(cost_nanos), MIN(unit_prices) FROM usage WHERE status = 'ok'") == '12|24|960000000|{"image":"0.04"}'
    assert {instance.state()["remaining_credits"] for instance in instances} == {0.04}
