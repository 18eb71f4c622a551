"""Ledger write throughput: charges settled and committed per second through the real
writer (group commit, rollups, WAL) on a fresh database.

    python bench/ledger_bench.py [--rows 200000] [--keys 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config.billing import KeyBilling
from core.ledger import UsageRecord, hold
from core.ledger.sqlite import SqliteLedger


async def run(path: Path, rows: int, keys: int) -> None:
    ledger = await SqliteLedger.open(path)
    terms = KeyBilling(credits_nanos=10**18)
    accounts = await ledger.accounts([(f"key{k}", terms) for k in range(keys)])
    start = time.perf_counter()
    for n in range(rows):
        key = f"key{n % keys}"
        reservation = hold(accounts[key], terms, 1000, 0)
        ledger.settle(
            reservation, UsageRecord(f"r{n}", time.time(), key, key, f"model-{n % 7}", "p", "m", 100, 20, 0, "token", '{"input":"1","output":"2"}', 140_000)
        )
        if n % 1000 == 999:
            await asyncio.sleep(0)  # let the writer run, as a busy event loop would
    await ledger.flush()
    elapsed = time.perf_counter() - start
    await ledger.close()
    with sqlite3.connect(path) as db:
        written = db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    print(f"{written} charges for {keys} keys settled and committed in {elapsed:.2f} s: {written / elapsed:,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "ledger.db", args.rows, args.keys))


if __name__ == "__main__":
    main()
