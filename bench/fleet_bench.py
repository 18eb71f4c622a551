"""Fleet mode against the single-process default: the gateway on its SQLite ledger, then on
PostgreSQL with 1, 2 and 4 worker processes, in front of the same nginx fake upstream and
under the same load, in one run.

    python bench/fleet_bench.py [--duration 15] [--warmup 3] [--repeats 3] [--connections 32]

Needs nginx and wrk (apt-get install nginx-light wrk) and Debian's PostgreSQL server binaries
(apt-get install postgresql): it starts its own throwaway cluster (test/postgres.py) and a fresh
database for every gateway it starts, and stops them all at the end, also on Ctrl-C or failure.
Exits non-zero if any request failed.

The load is bench/run.py's `json x32`: chat completions answered by a canned JSON completion,
the keys billed by tokens and by count taken in turn (`--rate-limited-key` adds run.py's third
key, with a rate and a concurrency limit that are never hit). For each case it prints requests/s,
p50, p99, errors, the CPU-seconds of the gateway (every process: the supervisor and its workers)
and of PostgreSQL (the postmaster and every backend and helper of the cluster) over the measured
interval, requests per CPU-second of gateway + database, and PostgreSQL's CPU microseconds per
request; the median of each over the repeats. On a 2-core machine fleet mode does not beat the
embedded ledger in absolute terms: the figures to look at are whether each added worker adds
throughput until the cores run out, and the SQLite row against bench/run.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import KEYS, free_port, gateway_config, parse_wrk, require_tools, start_nginx, start_server, wrk_command, wrk_script
from test.postgres import PostgresServer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ESTABLISHED = "01"  # the state column of /proc/net/tcp


@dataclass(frozen=True)
class Case:
    name: str
    workers: int | None  # None: the SQLite ledger, in the one process


CASES = (Case("sqlite (1 process)", None), Case("postgresql --workers 1", 1), Case("postgresql --workers 2", 2), Case("postgresql --workers 4", 4))


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    gateway_cpu: float
    database_cpu: float  # PostgreSQL's; for the SQLite case, what the idle cluster used meanwhile
    nginx_cpu_pct: float
    workers: list[tuple[int, float]]  # per gateway process serving: (connections from wrk, CPU-seconds)

    def per_cpu_second(self, case: Case) -> float:
        """Requests per CPU-second of gateway + database (SQLite's is inside the gateway's)."""
        cpu = self.gateway_cpu + (self.database_cpu if case.workers is not None else 0.0)
        return self.requests / cpu if cpu else float("nan")

    def database_us_per_request(self) -> float:
        return self.database_cpu / self.requests * 1e6 if self.requests else float("nan")


# --- processes and their CPU ----------------------------------------------------------------

ProcessId = tuple[int, int]  # (pid, start time): a pid reused within the interval is another process


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (field 3 onwards), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from every process's parent in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def cpu_times(pids: Iterable[int]) -> dict[ProcessId, float]:
    """utime + stime of each process (all its threads), in seconds."""
    times = {}
    for pid in pids:
        if (fields := _stat(pid)) is not None:
            times[(pid, int(fields[19]))] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return times


def cpu_used(before: dict[ProcessId, float], after: dict[ProcessId, float]) -> dict[ProcessId, float]:
    """CPU-seconds each process used between the two readings: one that started in between
    counts from zero; one that ended in between is lost (none should, in a steady run)."""
    return {process: seconds - before.get(process, 0.0) for process, seconds in after.items()}


def established_connections(pids: list[int], port: int) -> dict[int, int]:
    """How many connections to `port` each process holds open: its socket fds matched with the
    kernel's table of established TCP sockets."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                columns = line.split()
                if int(columns[1].rsplit(":", 1)[1], 16) == port and columns[3] == ESTABLISHED:
                    inodes.add(f"socket:[{columns[9]}]")
    counts = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            counts[pid] = sum(1 for fd in os.scandir(f"/proc/{pid}/fd") if _readlink(fd.path) in inodes)
    return counts


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


# --- one gateway --------------------------------------------------------------------------


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def serving_pids(self) -> list[int]:
        """The processes that accept requests: the workers under uvicorn's supervisor, or the
        one process. (The supervisor's own CPU still counts in the gateway's total.)"""
        workers = [pid for pid in process_tree(self.process.pid) if pid != self.process.pid and _is_worker(pid)]
        return workers or [self.process.pid]


def _is_worker(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


@contextlib.contextmanager
def gateway(case: Case, work: Path, upstream: str, postgres: PostgresServer, number: int) -> Iterator[Gateway]:
    """The case's gateway on a fresh ledger, ready (every worker in the fleet), then stopped."""
    port = free_port()
    if case.workers is None:
        ledger = ["--db", str(work / "data" / f"ledger-{number}.db")]  # not beside api.yaml: the config watcher would wake on its writes
    else:
        url = postgres.new_database()
        ledger = ["--database", url, "--workers", str(case.workers)]
    process = start_server("gateway", work, upstream, port, ledger)
    try:
        if case.workers is not None:
            _wait_for_fleet(postgres, url.rsplit("/", 1)[1], case.workers)
        yield Gateway(process, port)
    finally:
        _stop(process)


def _wait_for_fleet(postgres: PostgresServer, database: str, workers: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while int(postgres.psql("SELECT COUNT(*) FROM instances", database)) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers did not all join the fleet within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn's supervisor stops its workers), then SIGKILL for any of the tree left."""
    tree = cpu_times(process_tree(process.pid))
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for (pid, started), _ in tree.items():
        if pid != process.pid and (fields := _stat(pid)) is not None and int(fields[19]) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the measurement ----------------------------------------------------------------------


def measure(target: Gateway, script: Path, connections: int, seconds: int, postmaster: int, nginx_worker: int) -> Result:
    gateway_before = cpu_times(process_tree(target.process.pid))
    database_before = cpu_times(process_tree(postmaster))
    nginx_before = cpu_times([nginx_worker])
    started = time.monotonic()
    wrk = subprocess.Popen(wrk_command(target.url, script, connections, seconds), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(seconds / 2)  # wrk's connections are open and busy by now
        serving = target.serving_pids()
        connections_held = established_connections(serving, target.port)
        out, _ = wrk.communicate(timeout=seconds + 60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {out}")
    elapsed = time.monotonic() - started
    gateway_used = cpu_used(gateway_before, cpu_times(process_tree(target.process.pid)))
    database_used = cpu_used(database_before, cpu_times(process_tree(postmaster)))
    nginx_used = cpu_used(nginx_before, cpu_times([nginx_worker]))
    by_pid = {pid: seconds for (pid, _), seconds in gateway_used.items()}
    result = parse_wrk(out)
    return Result(
        result.rps,
        result.p50_ms,
        result.p99_ms,
        result.errors,
        result.requests,
        sum(gateway_used.values()),
        sum(database_used.values()),
        sum(nginx_used.values()) / elapsed * 100,
        [(connections_held.get(pid, 0), by_pid.get(pid, 0.0)) for pid in serving],
    )


def run_case(case: Case, number: int, args: argparse.Namespace, work: Path, upstream: str, script: Path, postgres: PostgresServer, nginx_worker: int) -> Result:
    with gateway(case, work, upstream, postgres, number) as target:
        warmup = subprocess.run(wrk_command(target.url, script, args.connections, args.warmup), capture_output=True, text=True, check=True)
        if parse_wrk(warmup.stdout).errors:
            print(f"{case.name}: errors in the warm-up:\n{warmup.stdout}", file=sys.stderr)
        result = measure(target, script, args.connections, args.duration, postmaster_pid(postgres), nginx_worker)
        if target.process.poll() is not None:
            raise RuntimeError(f"{case.name}: the gateway exited during the run ({target.process.returncode})")
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=15, help="seconds measured per case (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before each measurement (default 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate-limited-key", action="store_true", help="also take bench/run.py's key with a rate and concurrency limit in turn")
    args = parser.parse_args()
    require_tools()
    results: dict[Case, list[Result]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        work = Path(tmp)
        postgres = PostgresServer()
        running.callback(postgres.destroy)  # also removes its directory
        postgres.init().start()
        nginx, upstream, nginx_worker = start_nginx(work)
        running.callback(_stop_nginx, nginx)
        gateway_config(work, upstream)
        script = wrk_script(work, False, KEYS if args.rate_limited_key else KEYS[:2])
        for repeat in range(args.repeats):
            # One case at a time (PostgreSQL's CPU is the whole cluster's), in turn, the order
            # reversed every other repeat: this VM's speed drifts over minutes.
            for case in CASES if repeat % 2 == 0 else reversed(CASES):
                results[case].append(run_case(case, repeat, args, work, upstream, script, postgres, nginx_worker))
    report(results, args)
    errors = sum(r.errors for runs in results.values() for r in runs)
    if errors:
        sys.exit(f"{errors} requests failed")


def _stop_nginx(nginx: subprocess.Popen[bytes]) -> None:
    nginx.terminate()
    nginx.wait(timeout=10)


def report(results: dict[Case, list[Result]], args: argparse.Namespace) -> None:
    keys = "tokens, by count and by tokens with a rate limit" if args.rate_limited_key else "tokens and by count"
    print(
        f"\nload: POST /v1/chat/completions, canned JSON completion from nginx, {args.connections} connections (wrk -t1),"
        f" keys billed by {keys} in turn\nmedian of {args.repeats} runs, {args.duration} s each after {args.warmup} s warm-up,"
        f" {os.cpu_count()} cores; CPU-s over the measured {args.duration} s"
    )
    print(f"{'case':24} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'gw CPU-s':>8} {'pg CPU-s':>8} {'req/CPU-s':>9} {'pg µs/req':>9}")
    for case, runs in results.items():
        median = statistics.median
        fleet = case.workers is not None
        database = f"{median(r.database_cpu for r in runs):8.2f}" if fleet else f"{'-':>8}"
        per_request = f"{median(r.database_us_per_request() for r in runs):9.0f}" if fleet else f"{'-':>9}"
        print(f"{case.name:24} {median(r.rps for r in runs):7.0f} {median(r.p50_ms for r in runs):7.2f} {median(r.p99_ms for r in runs):7.2f} "
              f"{sum(r.errors for r in runs):6d} {median(r.gateway_cpu for r in runs):8.2f} {database} "
              f"{median(r.per_cpu_second(case) for r in runs):9.0f} {per_request}")  # fmt: skip
    print()
    base = results[CASES[1]]
    for case in CASES[2:]:
        ratios = [r.rps / b.rps for r, b in zip(results[case], base, strict=True)]
        print(f"{case.name} / --workers 1 throughput: {statistics.median(ratios):.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in ratios)})")
    for case in CASES:
        for number, r in enumerate(results[case]):
            spread = ", ".join(f"{connections} conn {seconds:.2f} CPU-s" for connections, seconds in r.workers)
            print(f"{case.name}, run {number + 1}: per serving process: {spread}; nginx {r.nginx_cpu_pct:.0f}% of a core", end="")
            print(f"; PostgreSQL idle meanwhile: {r.database_cpu:.2f} CPU-s" if case.workers is None else "")


if __name__ == "__main__":
    main()
