"""Reload benchmark: time to reload a large api.yaml and the longest event-loop stall meanwhile.

    python bench/reload_bench.py [--keys 10000] [--models 500]
    python bench/reload_bench.py --under-load [--duration 15] [--every 1]

`--under-load` runs the real gateway on that config (plus the bench/run.py providers and
keys, nginx upstream) under wrk at 32 connections: p99 latency steady, then p99 while the
file is rewritten every `--every` seconds (each rewrite a real change, so each is a full
reload), and how many reloads happened. Needs nginx and wrk, like bench/run.py.
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
from core.config.reload import ConfigStore

# The echo models are billed nothing, as they were before a model nothing prices stopped
# loading (fail-closed pricing): said explicitly, so that reload figures stay comparable.
# Only the stand-alone run appends it; --under-load takes run.py's prices.
FREE = "preferences:\n  model_price: {default: 0}\n"


def big_config(keys: int, models: int, providers: int = 10) -> str:
    lines = ["providers:"]
    per_provider = max(1, models // providers)
    for p in range(providers):
        lines += [f"  - provider: p{p}", "    engine: echo", "    model:"]
        lines += [f"      - model-{p}-{m}" for m in range(per_provider)]
    lines += ["api_keys:", "  - api: sk-bench-admin-0123456789abcdef", "    name: ops", "    role: admin"]
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
        await asyncio.sleep(0.5)  # the replaced config is freed meanwhile: its stalls count too
        stop.set()
        await ticker
        stalls.append(max(gaps))
    print(f"keys={len(store.current.keys)} models={len(store.current.public_models)} rounds={rounds}")
    print(f"reload time: median {statistics.median(durations) * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms")
    print(f"longest event-loop stall during a reload: median {statistics.median(stalls) * 1000:.1f} ms, max {max(stalls) * 1000:.1f} ms")


def under_load(keys: int, models: int, duration: int, every: float) -> None:
    """Steady p99 against p99 while the config reloads every second, on the live gateway."""
    import json
    import shutil
    import signal
    import subprocess
    import threading
    import urllib.request

    from bench import run

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nginx_port = run.free_port()
        upstream = f"http://127.0.0.1:{nginx_port}"
        nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(run.nginx_config(work, nginx_port))])
        time.sleep(0.5)
        nginx_worker = int(subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()[0])
        config = work / "api.yaml"
        base = run.gateway_config(work, upstream).read_text()
        admin = "sk-bench-admin-000000000"
        big = big_config(keys, models).split("api_keys:\n", 1)
        providers = big[0].removeprefix("providers:\n")
        text = base.replace("providers:\n", "providers:\n" + providers, 1).replace(
            "api_keys:\n", f"api_keys:\n  - api: {admin}\n    name: admin\n    role: admin\n" + big[1], 1
        )
        config.write_text(text)
        port = run.free_port()
        server = run.start_server("gateway", work, upstream, port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        script = run.wrk_script(work, False)

        def reload_count() -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/config/status", headers={"Authorization": f"Bearer {admin}"})
            return int(json.load(urllib.request.urlopen(request, timeout=10))["reload_count"])

        try:
            run.run_wrk(url, script, 32, 3, server.pid, nginx_worker)
            steady = run.run_wrk(url, script, 32, duration, server.pid, nginx_worker)
            before = reload_count()
            stop = threading.Event()

            def rewrite() -> None:
                edit = 0
                while not stop.wait(every):
                    edit += 1
                    config.write_text(text.replace("name: user0\n", f"name: user0-edit{edit}\n", 1))

            editor = threading.Thread(target=rewrite)
            editor.start()
            try:
                reloading = run.run_wrk(url, script, 32, duration, server.pid, nginx_worker)
            finally:
                stop.set()
                editor.join()
            time.sleep(1.5)
            reloads = reload_count() - before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            nginx.terminate()
            nginx.wait(timeout=10)
    print(f"keys={keys} models={models} 32 connections, {duration} s each, JSON chat completions")
    print(f"steady:          {steady.rps:7.0f} req/s  p50 {steady.p50_ms:6.2f} ms  p99 {steady.p99_ms:6.2f} ms  errors {steady.errors}")
    print(f"reloading every {every:g} s: {reloading.rps:7.0f} req/s  p50 {reloading.p50_ms:6.2f} ms  p99 {reloading.p99_ms:6.2f} ms  errors {reloading.errors}")
    print(f"reloads during the run: {reloads}; p99 during reloads / steady p99: {reloading.p99_ms / steady.p99_ms:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--under-load", action="store_true", help="measure p99 latency of the live gateway while it reloads")
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between config rewrites with --under-load")
    args = parser.parse_args()
    if args.under_load:
        under_load(args.keys, args.models, args.duration, args.every)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "api.yaml"
        path.write_text(big_config(args.keys, args.models) + FREE)
        asyncio.run(measure(path, args.rounds))


if __name__ == "__main__":
    main()
