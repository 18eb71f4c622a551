"""Reload benchmark: time to reload a large api.yaml and the longest event-loop stall meanwhile.

python bench/reload_bench.py [--keys 10000] [--models 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_config
from core.reload import ConfigStore


def big_config(keys: int, models: int, providers: int = 10) -> str:
    lines = ["providers:"]
    per_provider = max(1, models // providers)
    for p in range(providers):
        lines += [f"  - provider: p{p}", "    engine: echo", "    model:"]
        lines += [f"      - model-{p}-{m}" for m in range(per_provider)]
    lines.append("api_keys:")
    for k in range(keys):
        lines += [f"  - api: sk-bench-{k:08d}-0123456789abcdef", f"    name: user{k}", "    model: ['*']"]
    return "\n".join(lines) + "\n"


async def _watch_loop(gaps: list[float], stop: asyncio.Event) -> None:
    """Record how long each 1 ms sleep really took: the event loop's stalls."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def measure(path: Path, rounds: int) -> None:
    store = ConfigStore(path, load_config(path))
    durations, stalls = [], []
    for round_ in range(rounds):
        path.write_text(path.read_text() + f"# edit {round_}\n")
        gaps: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.create_task(_watch_loop(gaps, stop))
        start = time.perf_counter()
        assert await store.reload(), store.last_error
        durations.append(time.perf_counter() - start)
        stop.set()
        await ticker
        stalls.append(max(gaps))
    print(f"keys={len(store.current.keys)} models={len(store.current.public_models)} rounds={rounds}")
    print(f"reload time: median {statistics.median(durations) * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms")
    print(f"longest event-loop stall during a reload: median {statistics.median(stalls) * 1000:.1f} ms, max {max(stalls) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "api.yaml"
        path.write_text(big_config(args.keys, args.models))
        asyncio.run(measure(path, args.rounds))


if __name__ == "__main__":
    main()
