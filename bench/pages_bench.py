"""Web page and admin API timings on a big ledger: 10,000 keys, 1,000,000 logged requests.

    python bench/pages_bench.py [--keys 10000] [--rows 1000000]

Builds the config and the database in a temporary directory (rows spread over 60 days),
starts the gateway under uvicorn, logs in as admin and times each page: the first load
(balances rebuilt from the ledger) and the median of the next five.
"""

from __future__ import annotations

import argparse
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.config import ledger_id  # noqa: E402
from core.ledger.sqlite_schema import MIGRATIONS  # noqa: E402

ADMIN = "sk-bench-admin-000000"
MODELS = [f"model-{i}" for i in range(20)]


def write_config(path: Path, keys: int) -> list[str]:
    secrets = [f"sk-bench-{i:08d}-0123456789" for i in range(keys)]
    lines = [
        "providers:",
        "  - provider: echo",
        "    engine: echo",
        "    model: [" + ", ".join(MODELS) + "]",
        "api_keys:",
        f"  - api: {ADMIN}",
        "    role: admin",
    ]
    for i, secret in enumerate(secrets):
        mode = ("token", "count", "hybrid")[i % 3]
        lines += [f"  - api: {secret}", f"    name: user-{i:05d}", f"    preferences: {{billing_mode: {mode}, credits: 100, count_credits: 1000}}"]
    lines += ["preferences:", "  model_price: {default: '1,2'}", "  count_billing: {default_count_price: 0.001}"]
    path.write_text("\n".join(lines) + "\n")
    return secrets


def build_ledger(path: Path, secrets: list[str], rows: int) -> None:
    rng = random.Random(7)
    ids = [ledger_id(s) for s in secrets]
    now = time.time()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(MIGRATIONS[1])  # rows go in at version 1; the gateway's migrations build the rollups
    db.execute("PRAGMA user_version = 1")
    batch = []
    for n in range(rows):
        k = rng.randrange(len(ids))
        ts = now - rng.random() * 60 * 86400
        prompt, completion = rng.randrange(10, 2000), rng.randrange(1, 800)
        counted = k % 3 == 1
        cost = 1_000_000 if counted else prompt * 1000 + completion * 2000
        batch.append(
            (
                f"req_{n}",
                ts,
                ids[k],
                f"user-{k:05d}",
                rng.choice(MODELS),
                "echo",
                "m",
                prompt,
                completion,
                0,
                "count" if counted else "token",
                "{}",
                cost,
                int(counted),
                "ok",
            )
        )
        if len(batch) == 50_000:
            db.executemany(
                "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens, cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                batch,
            )
            batch.clear()
    if batch:
        db.executemany(
            "INSERT INTO usage (request_id, ts, key_id, key_name, model, provider, upstream_model, prompt_tokens, completion_tokens, cached_tokens, cost_type, unit_prices, cost_nanos, count_charged, status) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            batch,
        )
    db.commit()
    db.close()


def timed(client: httpx.Client, path: str, repeat: int = 5) -> tuple[float, float]:
    start = time.perf_counter()
    assert client.get(path).status_code == 200, path
    first = time.perf_counter() - start
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert client.get(path).status_code == 200, path
        samples.append(time.perf_counter() - start)
    return first, statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, db = Path(tmp) / "api.yaml", Path(tmp) / "ledger.db"
        started = time.perf_counter()
        secrets = write_config(config, args.keys)
        build_ledger(db, secrets, args.rows)
        print(f"built {args.keys} keys and {args.rows} rows in {time.perf_counter() - started:.0f} s")
        server = subprocess.Popen(
            [sys.executable, "main.py", "--config", str(config), "--db", str(db), "--host", "127.0.0.1", "--port", str(args.port), "--log-level", "warning"],
            cwd=ROOT,
        )
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120)
            started = time.perf_counter()
            for _ in range(1000):
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            print(f"start-up, migrating the ledger to the current schema: {time.perf_counter() - started:.1f} s")
            login = client.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
            client.post("/login", data={"csrf_token": csrf, "api_key": ADMIN})
            busiest = ledger_id(secrets[1])
            pages = [
                ("billing tab (10,000 keys, page 1)", "/admin/keys"),
                ("billing tab sorted by spend", "/admin/keys?sort=spend&dir=desc"),
                ("overview", "/admin"),
                ("key detail", f"/admin/keys/{busiest}"),
                ("key detail, older log page", f"/admin/keys/{busiest}?before={time.time() - 30 * 86400}"),
            ]
            print(f"{'page':40} {'first load':>11} {'median':>9}")
            for label, path in pages:
                first, median = timed(client, path)
                print(f"{label:40} {first * 1000:9.0f} ms {median * 1000:6.0f} ms")
            start = time.perf_counter()
            assert client.get("/v1/api_keys_states", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
            print(f"{'GET /v1/api_keys_states (10,000 keys)':40} {'':>11} {(time.perf_counter() - start) * 1000:6.0f} ms")
            rss = Path(f"/proc/{server.pid}/status").read_text()
            print("gateway resident memory:", re.search(r"VmRSS:\s+(\d+) kB", rss).group(1), "kB")  # type: ignore[union-attr]
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
