"""Crash and restart: the real `python main.py` process killed, stopped and restarted on the
same ledger; damaged, locked and full databases."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.ledger.sqlite import GROUP_COMMIT_SECONDS
from test.servers import FakeUpstream, ServerThread, hang
from test.test_cli import ROOT, _free_port, one_line_refusal, run_main, wait_until_healthy
from test.test_web import Browser

TOKEN_KEY, COUNT_KEY, ADMIN = "sk-crash-token-0001", "sk-crash-count-0002", "sk-crash-admin-0003"
CREDITS, COUNT_CREDITS = 1000, 100_000
BODY = {"model": "echo-1", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16}


def config_text(upstream: str | None = None) -> str:
    slow = f"  - provider: slow\n    base_url: {upstream}\n    api: k\n    model: [slow-1]\n" if upstream else ""
    return (
        f"providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n{slow}"
        f"api_keys:\n  - api: {ADMIN}\n    role: admin\n"
        f"  - api: {TOKEN_KEY}\n    preferences: {{billing_mode: token, credits: {CREDITS}}}\n"
        f"  - api: {COUNT_KEY}\n    preferences: {{billing_mode: count, count_credits: {COUNT_CREDITS}}}\n"
        "preferences:\n  model_price: {default: '1,2'}\n  count_billing: {default_count_price: 0.002}\n"
    )


class Gateway:
    """`python main.py` in a child process, as an operator runs it."""

    def __init__(self, tmp: Path, config: str):
        self.config, self.db, self.port = tmp / "api.yaml", tmp / "ledger.db", _free_port()
        self.config.write_text(config)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Gateway:
        command = [sys.executable, "main.py", "--config", str(self.config), "--db", str(self.db), "--host", "127.0.0.1", "--port", str(self.port)]
        # Its log to a file: a pipe nobody reads would block the gateway once full (a line per request).
        with open(self.config.parent / "gateway.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stderr=log)
        wait_until_healthy(self.process, self.url)
        return self

    def states(self) -> dict[str, dict[str, float]]:
        response = httpx.get(f"{self.url}/v1/api_keys_states", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        return response.json()["api_keys_states"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.stop()


def load(url: str, stop: threading.Event, done: list[float], key: str, body: dict[str, object] = BODY, workers: int = 8) -> list[threading.Thread]:
    """Clients sending requests back to back until `stop`; each success's time goes in `done`."""

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            while not stop.is_set():
                try:
                    if http.post("/v1/chat/completions", json=body).status_code == 200:
                        done.append(time.monotonic())
                except httpx.TransportError:
                    return  # the gateway went away

    threads = [threading.Thread(target=client) for _ in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def ledger_sums(db: Path) -> dict[str, tuple[int, int, int]]:
    with sqlite3.connect(db) as ledger:
        rows = ledger.execute(
            "SELECT key_id, COUNT(*), SUM(CASE WHEN cost_type = 'token' THEN cost_nanos ELSE 0 END), SUM(count_charged) FROM usage GROUP BY key_id"
        )
        return {key_id: (count, spent, counted) for key_id, count, spent, counted in rows}


def test_kill_9_under_load_loses_at_most_the_last_commit_window_and_leaves_a_consistent_ledger(tmp_path, gateways):
    gateway = Gateway(tmp_path, config_text()).start()
    gateways.append(gateway)
    stop, done_token, done_count = threading.Event(), [], []
    threads = load(gateway.url, stop, done_token, TOKEN_KEY) + load(gateway.url, stop, done_count, COUNT_KEY)
    time.sleep(1.5)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    gateway.process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    answered = len(done_token) + len(done_count)
    assert answered > 100

    restarted = Gateway(tmp_path, config_text())
    restarted.port, restarted.url = gateway.port, gateway.url
    gateways.append(restarted.start())
    states = restarted.states()
    with sqlite3.connect(gateway.db) as ledger:
        written = ledger.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        token_spent = ledger.execute("SELECT COALESCE(SUM(cost_nanos), 0) FROM usage WHERE cost_type = 'token'").fetchone()[0]
        counted = ledger.execute("SELECT COALESCE(SUM(count_charged), 0) FROM usage").fetchone()[0]
    # Consistent: every balance is its ledger sum, and no reservation from before the kill
    # holds anything back (reservations live in memory and die with the process).
    assert states[TOKEN_KEY]["remaining_credits"] == pytest.approx(CREDITS - token_spent / 1e9, abs=1e-9)
    assert states[COUNT_KEY]["remaining_count_credits"] == COUNT_CREDITS - counted
    # Lost: only answers from the last group-commit window (plus the commit in flight).
    lost = answered - written
    print(f"kill -9 under load: {answered} answered, {written} written, {lost} lost")
    recent = sum(1 for t in done_token + done_count if t > killed_at - (GROUP_COMMIT_SECONDS + 0.2))
    assert 0 <= lost <= recent, (lost, recent, answered)
    with httpx.Client(base_url=restarted.url, headers={"Authorization": f"Bearer {COUNT_KEY}"}) as http:
        assert http.post("/v1/chat/completions", json=BODY).status_code == 200


def test_sigterm_under_load_lets_requests_in_flight_finish_and_writes_every_charge(tmp_path, gateways):
    upstream = FakeUpstream()
    upstream.script("p1", hang(2.0))  # every upstream call takes two seconds: they are in flight at SIGTERM
    upstream.server = ServerThread(upstream.app()).start()
    try:
        gateway = Gateway(tmp_path, config_text(upstream.base_url("p1"))).start()
        gateways.append(gateway)
        statuses: list[int] = []

        def call() -> None:
            body = {**BODY, "model": "slow-1"}
            response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {COUNT_KEY}"}, timeout=30)
            statuses.append(response.status_code)

        threads = [threading.Thread(target=call) for _ in range(10)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(upstream.seen) < 10:  # all ten are in flight: the upstream holds each for a second
            assert time.monotonic() < deadline, len(upstream.seen)
            time.sleep(0.01)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        upstream.server.stop()
    assert statuses == [200] * 10
    sums = ledger_sums(gateway.db)
    assert sum(count for count, _, _ in sums.values()) == 10 and sum(c for _, _, c in sums.values()) == 10


def test_a_corrupt_ledger_file_stops_the_start_with_a_clear_error(tmp_path):
    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(config_text())
    db.write_bytes(b"this is not a database, it is a text file that happens to be here\n" * 100)
    result = run_main("--config", str(config), "--db", str(db))
    assert result.returncode == 2
    assert "ledger database" in result.stderr and "not a database" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_damaged_ledger_file_stops_the_start(tmp_path, gateways):
    gateway = Gateway(tmp_path, config_text()).start()
    gateways.append(gateway)
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {COUNT_KEY}"}) as http:
        for _ in range(20):
            http.post("/v1/chat/completions", json=BODY)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    gateway.process.wait(timeout=30)
    data = bytearray(gateway.db.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # the schema page, after the header
    gateway.db.write_bytes(bytes(data))
    result = run_main("--config", str(gateway.config), "--db", str(gateway.db))
    assert result.returncode == 2 and "ledger database" in result.stderr and "Traceback" not in result.stderr


def test_a_locked_ledger_file_stops_the_start_with_a_clear_error(tmp_path):
    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(config_text())
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, and not letting go
    try:
        result = run_main("--config", str(config), "--db", str(db))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 2
    assert "locked by another process" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("spelling", ["same path", "symlink"])
def test_a_second_gateway_on_the_same_ledger_exits_2_naming_the_file_and_the_process_holding_it(tmp_path, gateways, spelling):
    """Balances live in each process's memory: two processes on one ledger would each spend a
    key's whole balance, and neither would see the other's top-ups. A symlink to the file is
    the same ledger. (A second process that does start serves until the timeout: a failure
    shows as TimeoutExpired.)"""
    first = Gateway(tmp_path, config_text()).start()
    gateways.append(first)
    assert first.process is not None
    db = first.db
    if spelling == "symlink":
        db = tmp_path / "other-name.db"
        db.symlink_to(first.db)
    result = run_main("--config", str(first.config), "--db", str(db), "--host", "127.0.0.1", "--port", str(_free_port()), timeout=15)
    assert f"ledger {db} is in use by another Tollgate process (pid {first.process.pid})" in one_line_refusal(result)
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {COUNT_KEY}"}) as http:
        assert http.post("/v1/chat/completions", json=BODY).status_code == 200  # the first one serves on


def test_a_gateway_starts_again_on_its_ledger_after_a_clean_stop(tmp_path, gateways):
    first = Gateway(tmp_path, config_text()).start()
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    gateways.append(Gateway(tmp_path, config_text()).start())  # (after kill -9 too: see the crash test above)


def test_a_ledger_from_a_newer_tollgate_stops_the_start(tmp_path):
    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(config_text())
    with sqlite3.connect(db) as ledger:
        ledger.execute("PRAGMA user_version = 999")
    result = run_main("--config", str(config), "--db", str(db))
    assert result.returncode == 2 and "newer than this Tollgate" in result.stderr


def test_disk_full_keeps_answering_retries_and_shows_the_error(start_gateway):
    """The database stops accepting writes (SQLite's max_page_count behaves like a full disk):
    answers still go out, /health and the overview say so, and once space is back every
    held charge is written."""
    from test.conftest import ADMIN_KEY, USER_KEY

    config = (
        "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
        f"api_keys:\n  - api: {ADMIN_KEY}\n    role: admin\n  - api: {USER_KEY}\n    preferences: {{billing_mode: count, count_credits: 100}}\n"
        "preferences:\n  model_price: {echo-1: {token_price: '0,0'}}\n  count_billing: {default_count_price: 0.01}\n"
    )
    gateway = start_gateway(config)
    ledger = gateway.server.app.state.ledger
    api = gateway.client(USER_KEY)
    api.chat.completions.create(model="echo-1", messages=BODY["messages"])
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # committed

    async def fill_disk() -> None:
        async with ledger.db.execute("PRAGMA page_count") as cursor:
            (pages,) = await cursor.fetchone()
        await ledger.db.execute(f"PRAGMA max_page_count = {pages}")

    gateway.server.call(fill_disk())
    for _ in range(30):  # ~1 KB each: more than the last page can hold
        reply = api.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "x" * 200}])
        assert reply.choices[0].message.content
    deadline = time.monotonic() + 10
    while (health := gateway.http("GET", "/health", key=None).json())["status"] != "degraded":
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert "full" in health["ledger"]["last_write_error"] and health["ledger"]["unwritten_rows"] >= 1
    # Exact figures cannot be read meanwhile: a clear 503 (API and pages), not a hang.
    usage = gateway.http("GET", "/v1/usage", key=USER_KEY)
    assert usage.status_code == 503 and usage.json()["error"]["code"] == "ledger_not_writing" and "full" in usage.json()["error"]["message"]
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin")
    assert page.status_code == 503 and "The ledger cannot write" in page.text
    browser.http.close()
    top_up = gateway.http("POST", "/v1/add_credits", key=ADMIN_KEY, params={"paid_key": USER_KEY, "amount": "1"}, headers={"Idempotency-Key": "t-1"})
    assert top_up.status_code == 503 and "queued" in top_up.json()["error"]["message"]
    # Admission keeps working from the in-memory balance, which counts the held charges.
    assert api.chat.completions.create(model="echo-1", messages=BODY["messages"]).choices

    gateway.server.call(ledger.db.execute("PRAGMA max_page_count = 1073741823"))  # space again
    deadline = time.monotonic() + 15
    while (health := gateway.http("GET", "/health", key=None).json())["status"] != "ok":
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    states = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]
    assert states[USER_KEY]["remaining_count_credits"] == 100 - 32
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        assert db.execute("SELECT COUNT(*), SUM(count_charged) FROM usage").fetchone() == (32, 32)
        assert db.execute("SELECT COUNT(*) FROM grants WHERE idempotency_key = 't-1'").fetchone() == (1,)  # the queued top-up applied
