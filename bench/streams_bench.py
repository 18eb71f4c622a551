"""Many long streams at once: the gateway (billing on) against the bare pass-through, both in
front of one fake vendor that holds every stream open for `--events` SSE events `--spacing-ms`
apart (bench/stream_vendor.py), under wrk holding C connections, for each C in one run.

    python bench/streams_bench.py [--connections 1000,3000,10000] [--duration 30] [--events 20] [--spacing-ms 50]
                                  [--servers bare,gateway,fleet-2] [--keys 1]

Needs wrk (apt-get install wrk). Run as root for C above ~5,000: it raises its open-file limit
(soft and hard, inherited by every process it starts) and `net.core.somaxconn` when that is
lower than the largest C, and says so when it cannot. Every server is started fresh for each
C (Python keeps the memory it once used, so a server reused from a larger C would show its
peak), warmed up, and measured while wrk runs. Exits non-zero if anything failed.

For each C and server it prints: requests/s; p50 and p99 of the whole stream (request sent to
last byte) and p50 against the stream's natural duration (events x spacing); errors of every
kind (wrk's connect/read/write/timeout and non-2xx; the kernel's listen-queue overflows and
drops during the run; for the gateway, upstream attempts that failed and answers other than
200 and 499, read from its /metrics); the server's CPU per relayed event (µs) and the cores it
kept busy (CPU-seconds per second of load: a server near 1.00 per process is CPU-bound); its idle
and peak resident memory, and the peak above idle per open stream.

`--servers fleet-N` runs the gateway in fleet mode, N workers on a PostgreSQL the benchmark
starts; `--keys N` spreads the requests over N keys (default one: one busy tenant, whose
admissions take turns in the fleet).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import ROOT, cpu_seconds, free_port, parse_wrk, wait_http
from core.process_limits import RESERVED_FILES, SOCKETS_PER_STREAM
from test.postgres import PostgresServer

ADMIN = "sk-bench-admin-0123456789abcdef"
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def bench_keys(count: int) -> list[str]:
    """The keys the load is spread over (round-robin): one by default, as one busy tenant."""
    return [f"sk-bench-streams-{number:06d}" for number in range(1, count + 1)]


def gateway_config(work: Path, vendor: str, keys: int = 1) -> Path:
    path = work / "api.yaml"
    entries = "".join(f"  - api: {key}\n    name: streams-{number}\n    preferences: {{billing_mode: token, credits: 100000000}}\n"
                      for number, key in enumerate(bench_keys(keys), 1))  # fmt: skip
    path.write_text(f"""
providers:
  - provider: vendor
    base_url: {vendor}/v1
    api: k
    model: [bench-stream]
api_keys:
{entries}  - api: {ADMIN}
    name: ops
    role: admin
preferences:
  model_price: {{default: '1,2'}}
""")
    return path


def wrk_script(work: Path, keys: int = 1) -> Path:
    body = '{"model":"bench-stream","messages":[{"role":"user","content":"Tell me a story."}],"max_tokens":64,"stream":true}'
    path = work / "streams.lua"
    bearers = ", ".join(f'"Bearer {key}"' for key in bench_keys(keys))
    rotate = f"""
local bearers = {{{bearers}}}
local sent = 0
request = function()
  sent = sent + 1
  wrk.headers["Authorization"] = bearers[sent % #bearers + 1]
  return wrk.format()
end
"""
    path.write_text(f"""
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {bench_keys(1)[0]}"
{rotate if keys > 1 else ""}""")  # (one key: no Lua per request, as measured before --keys existed)
    return path


def raise_limits(connections: int, sysctl: bool) -> tuple[int, list[str]]:
    """Open files for 2 sockets per stream in the server (client and vendor) plus slack, and a
    listen queue as long as the largest burst of new connections. Returns the most streams one
    server can then hold (below `connections` when the open-file limit cannot be raised: that
    takes root with CAP_SYS_RESOURCE) and what could not be raised."""
    problems = []
    wanted = SOCKETS_PER_STREAM * connections + 2 * RESERVED_FILES
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, hard), max(wanted, hard)))
        hard = max(wanted, hard)
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    most = (hard - 2 * RESERVED_FILES) // SOCKETS_PER_STREAM // 100 * 100
    if most < connections:
        problems.append(
            f"C={connections:,} needs {wanted:,} open files in the server; the hard limit is {hard:,} and cannot be raised here: one process gets C={most:,} at most"
        )
    if sysctl:
        try:
            if int(SOMAXCONN.read_text()) < connections:
                SOMAXCONN.write_text(str(connections))
        except OSError:
            problems.append(f"net.core.somaxconn {SOMAXCONN.read_text().strip()} < {connections} (run as root to raise it)")
    return most, problems


def listen_drops() -> int:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table["ListenOverflows"]) + int(table["ListenDrops"])
    return 0


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def process_tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *(int(child) for child in children)]


@contextlib.contextmanager
def peak_rss(pids: list[int]) -> Iterator[list[int]]:
    """Samples the processes' resident memory every 100 ms; the peak is in the list yielded."""
    peak = [rss_kb(pids)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss_kb(pids))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def gateway_failures(port: int) -> int:
    """Failed upstream attempts and answers other than 200 (and 499, wrk leaving at the end)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    failed = 0
    for line in text.splitlines():
        if line.startswith("tollgate_upstream_requests_total{") and 'outcome="ok"' not in line:
            failed += int(float(line.rsplit(" ", 1)[1]))
        if line.startswith("tollgate_requests_total{") and not re.search(r'status_code="(200|499)"', line):
            failed += int(float(line.rsplit(" ", 1)[1]))
    return failed


@dataclass
class Result:
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    wrk_errors: int
    listen_drops: int
    server_errors: int
    cpu_ms_per_1k_events: float
    cores: float  # the server's CPU-seconds per second of load: how much of the machine it had
    idle_rss_mb: float
    peak_rss_mb: float
    kb_per_stream: float
    peak_open: int
    keys_used: int  # of the bench's keys, those the gateway billed requests to (0: the bare one)
    text: str

    @property
    def errors(self) -> int:
        return self.wrk_errors + self.listen_drops + self.server_errors


def keys_used(port: int) -> int:
    """How many of the bench's keys the gateway billed requests to: `--keys N` must reach all N."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/api_keys_states", headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        states = json.load(reply)["api_keys_states"]
    return sum(1 for key, state in states.items() if key.startswith("sk-bench-streams-") and state["request_count"] > 0)


def workers_of(kind: str) -> int:
    """`fleet-N`: the gateway in fleet mode, N worker processes on PostgreSQL; else one process."""
    return int(kind.split("-", 1)[1]) if kind.startswith("fleet-") else 1


def start(kind: str, work: Path, vendor: str, port: int, postgres: PostgresServer | None) -> subprocess.Popen[bytes]:
    if kind == "bare":
        command = [sys.executable, "-m", "uvicorn", "bench.bare_passthrough:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--no-access-log", "--backlog", "65535"]  # fmt: skip
    else:
        if kind.startswith("fleet-"):
            assert postgres is not None
            ledger = ["--database", postgres.new_database(), "--workers", str(workers_of(kind))]
        else:
            ledger = ["--db", str(work / f"ledger-{port}.db")]
        command = [sys.executable, "main.py", "--config", str(work / "api.yaml"), *ledger, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "UPSTREAM": vendor})
    wait_http(f"http://127.0.0.1:{port}/v1/chat/completions")
    if workers_of(kind) > 1:
        time.sleep(3)  # every worker up (wait_http got an answer from the first)
    return process


def measure(kind: str, work: Path, vendor: str, connections: int, args: argparse.Namespace) -> Result:
    port = free_port()
    server = start(kind, work, vendor, port, args.postgres)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    script = wrk_script(work, args.keys)
    try:
        pids = process_tree(server.pid)
        subprocess.run(["wrk", "-t1", "-c50", "-d2s", "-s", str(script), url], capture_output=True, check=True)  # warm-up
        time.sleep(1)
        idle = rss_kb(pids)
        cpu_before, drops_before = sum(cpu_seconds(pid) for pid in pids), listen_drops()
        failures_before = gateway_failures(port) if kind != "bare" else 0
        vendor_stats(f"{vendor}/stats?reset")
        wrk = ["wrk", f"-t{args.wrk_threads}", f"-c{connections}", f"-d{args.duration}s", "--timeout", "300s", "--latency", "-s", str(script), url]
        started = time.monotonic()
        with peak_rss(pids) as peak:
            out = subprocess.run(wrk, capture_output=True, text=True, check=True).stdout
        cpu, elapsed = sum(cpu_seconds(pid) for pid in pids) - cpu_before, time.monotonic() - started
        drops = listen_drops() - drops_before
        peak_open = vendor_stats(f"{vendor}/stats")["peak_open_streams"]
        time.sleep(1)  # the streams wrk left behind end (499) before the gateway's count is read
        failures = gateway_failures(port) - failures_before if kind != "bare" else 0
        used = keys_used(port) if kind != "bare" else 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    parsed = parse_wrk(out)
    events = parsed.requests * args.events
    return Result(
        connections,
        parsed.rps,
        parsed.p50_ms,
        parsed.p99_ms,
        parsed.errors,
        drops,
        failures,
        cpu * 1000 / events * 1000 if events else float("nan"),
        cpu / elapsed,
        idle / 1024,
        peak[0] / 1024,
        (peak[0] - idle) / connections,
        peak_open,
        used,
        out,
    )


def hold(kind: str, work: Path, streams: int, args: argparse.Namespace) -> tuple[int, float]:
    """Resident memory per open stream, from the server holding `streams` streams at once: a
    vendor whose streams last minutes, wrk with `streams` connections, RSS read once the vendor
    has them all open (and the server is idle again). Returns (streams held, KB per stream)."""
    vendor_port = free_port()
    vendor = subprocess.Popen([sys.executable, "bench/stream_vendor.py", "--port", str(vendor_port), "--events", "2", "--spacing-ms", "600000"], cwd=ROOT)
    vendor_url, port = f"http://127.0.0.1:{vendor_port}", free_port()
    held, kb = 0, float("nan")
    try:
        wait_http(f"{vendor_url}/stats")
        gateway_config(work, vendor_url, args.keys)
        server = start(kind, work, vendor_url, port, args.postgres)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            pids = process_tree(server.pid)
            subprocess.run(["wrk", "-t1", "-c50", "-d2s", "--timeout", "1s", "-s", str(wrk_script(work, args.keys)), url], capture_output=True)  # warm-up
            while vendor_stats(vendor_url)["open_streams"]:  # the warm-up's streams, cut when wrk left
                time.sleep(0.2)
            time.sleep(1)
            idle = rss_kb(pids)
            wrk = subprocess.Popen(
                ["wrk", "-t1", f"-c{streams}", "-d120s", "--timeout", "300s", "-s", str(wrk_script(work, args.keys)), url], stdout=subprocess.DEVNULL
            )
            try:
                deadline = time.monotonic() + 100
                while time.monotonic() < deadline and held < streams:
                    time.sleep(1)
                    held = vendor_stats(vendor_url)["open_streams"]
                time.sleep(2)  # settled
                kb = (rss_kb(pids) - idle) / max(held, 1)
            finally:
                wrk.kill()
                wrk.wait()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    finally:
        vendor.terminate()
        vendor.wait(timeout=30)
    return held, kb


def vendor_stats(url: str) -> dict[str, int]:
    """The vendor's counts (`url` may name /stats?reset)."""
    target = url if "/stats" in url else f"{url}/stats"
    data: dict[str, int] = json.loads(urllib.request.urlopen(target, timeout=10).read())
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", default="1000,3000,10000", help="comma-separated values of C")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per C and server")
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--spacing-ms", type=float, default=50)
    parser.add_argument("--servers", default="bare,gateway", help="bare, gateway, and fleet-N: the gateway with N workers on PostgreSQL")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--keep-somaxconn", action="store_true", help="leave net.core.somaxconn as it is (see how the kernel's default does)")
    parser.add_argument("--hold", type=int, default=None, help="streams held open to measure memory per stream (default: the largest C; 0: skip)")
    parser.add_argument("--keys", type=int, default=1, help="API keys the requests are spread over, round-robin (many tenants; default one busy key)")
    parser.add_argument("--show-wrk", action="store_true", help="print wrk's own output of every run")
    args = parser.parse_args()
    counts = [int(c) for c in args.connections.split(",")]
    most, problems = raise_limits(max(counts), not args.keep_somaxconn)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    natural_ms = args.events * args.spacing_ms
    kinds = args.servers.split(",")
    results: dict[tuple[int, str], Result] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        args.postgres = None
        if any(kind.startswith("fleet-") for kind in kinds):
            args.postgres = PostgresServer()
            running.callback(args.postgres.stop)
            args.postgres.init().start()
        vendor_port = free_port()
        vendor_command = [sys.executable, "bench/stream_vendor.py", "--port", str(vendor_port), "--events", str(args.events),
                          "--spacing-ms", str(args.spacing_ms)]  # fmt: skip
        vendor = subprocess.Popen(vendor_command, cwd=ROOT)
        vendor_url = f"http://127.0.0.1:{vendor_port}"
        gateway_config(work, vendor_url, args.keys)
        try:
            wait_http(f"{vendor_url}/stats")
            for index, connections in enumerate(counts):
                for kind in kinds if index % 2 == 0 else kinds[::-1]:  # who goes first alternates: this VM drifts
                    # One process holds `most` streams at most here (its open-file limit); N workers N times that.
                    result = results[(connections, kind)] = measure(kind, work, vendor_url, min(connections, most * workers_of(kind)), args)
                    if args.show_wrk or result.errors:
                        print(f"--- {kind} x{connections}\n{result.text}", file=sys.stderr)
            stats = vendor_stats(vendor_url)
        finally:
            vendor.terminate()
            vendor.wait(timeout=30)
        held = {kind: hold(kind, work, min(args.hold or max(counts), most * workers_of(kind)), args) for kind in kinds} if args.hold != 0 else {}
    print(f"\n{args.events} events {args.spacing_ms:g} ms apart (natural stream {natural_ms / 1000:g} s), {args.duration} s per run, {args.keys} key(s), {os.cpu_count()} cores;"
          f" vendor: {stats['started']} streams")  # fmt: skip
    print(f"{'C':>6} {'server':8} {'req/s':>7} {'p50 s':>6} {'p99 s':>6} {'p50/nat':>7} {'errors':>6} {'wrk/listen/gw':>13} "
          f"{'us/event':>8} {'cores':>5} {'idle MB':>7} {'peak MB':>7} {'KB/conn':>7} {'open':>6}")  # fmt: skip
    for (_, kind), r in sorted(results.items()):
        print(f"{r.connections:6d} {kind:8} {r.rps:7.0f} {r.p50_ms / 1000:6.2f} {r.p99_ms / 1000:6.2f} {r.p50_ms / natural_ms:7.2f} {r.errors:6d} "
              f"{f'{r.wrk_errors}/{r.listen_drops}/{r.server_errors}':>13} {r.cpu_ms_per_1k_events:8.1f} {r.cores:5.2f} {r.idle_rss_mb:7.0f} {r.peak_rss_mb:7.0f} "
              f"{r.kb_per_stream:7.1f} {r.peak_open:6d}")  # fmt: skip
    for (_, kind), r in sorted(results.items()):
        if kind != "bare" and r.keys_used < args.keys:
            print(f"error: {kind} x{r.connections}: requests reached {r.keys_used} of the {args.keys} keys", file=sys.stderr)
    if args.keys > 1:
        print(
            "keys billed: " + ", ".join(f"{kind} x{r.connections} {r.keys_used} of {args.keys}" for (_, kind), r in sorted(results.items()) if kind != "bare")
        )
    for kind, (streams, kb) in held.items():
        print(f"held open: {kind:8} {streams:6d} streams, {kb:5.1f} KB resident per stream above idle")
    for kind in kinds:
        errors = sum(r.errors for (_, k), r in results.items() if k == kind)
        if errors and kind == "bare":
            print(f"note: the bare pass-through had {errors} errors (not the gateway's)")
    errors = sum(r.errors + (r.keys_used < args.keys) for (_, k), r in results.items() if k != "bare")
    if errors:
        sys.exit(f"the gateway had {errors} errors")


if __name__ == "__main__":
    main()
