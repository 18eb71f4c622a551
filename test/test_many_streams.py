"""Many long streams at once (issue #21): no hidden ceiling on upstream connections, an
open-file limit raised at start and a warning when it is too low, a listen queue sized for
bursts. `python main.py` runs as a real process here: limits are per process."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.process_limits import RESERVED_FILES, SOCKETS_PER_STREAM
from test.conftest import FREE
from test.test_cli import ECHO_CONFIG, ROOT, _free_port, run_main, wait_until_healthy

HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
STREAM_KEY = "sk-test-streams-0000000001"


def soft_limit(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A child's open-file limits before it starts (as a shell's `ulimit -n` would leave them)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard if hard is not None else HARD))

    return apply


@contextlib.contextmanager
def started(tmp_path: Path, config: str, *args: str, limits: Callable[[], None] | None = None) -> Iterator[tuple[subprocess.Popen[str], int]]:
    path, port = tmp_path / "api.yaml", _free_port()
    path.write_text(config)
    command = [sys.executable, "main.py", "--config", str(path), "--db", str(tmp_path / "ledger.db"), "--host", "127.0.0.1", "--port", str(port), *args]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=limits)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
        yield process, port
    finally:
        if process.poll() is None:  # a failed test's: never left running
            process.kill()
            process.communicate()


def stop_and_read_log(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=30)
    return log


def open_files_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


@pytest.mark.skipif(HARD <= 1024 or HARD == resource.RLIM_INFINITY, reason="needs a hard open-file limit above 1024")
def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start(tmp_path):
    with started(tmp_path, ECHO_CONFIG, limits=soft_limit(1024)) as (process, _):
        assert open_files_of(process.pid) == (HARD, HARD)
        log = stop_and_read_log(process)
        streams = (HARD - RESERVED_FILES) // SOCKETS_PER_STREAM
        assert f"room for about {streams:,} concurrent streams (open-file limit {HARD:,}, raised from 1,024)" in log, log
        if streams >= 1000:
            assert "open-file limit" not in "\n".join(line for line in log.splitlines() if "WARNING" in line), log


def test_an_open_file_limit_too_low_for_the_providers_is_warned_about(tmp_path):
    with started(tmp_path, ECHO_CONFIG, limits=soft_limit(1500, 1500)) as (process, _):
        log = stop_and_read_log(process)
        warnings = [line for line in log.splitlines() if "WARNING" in line and "open-file limit" in line]
        assert len(warnings) == 1, log
        assert "holds about 718 concurrent streams" in warnings[0] and "fewer than 1,000" in warnings[0] and "LimitNOFILE" in warnings[0]


def listen_queue_of(port: int) -> int:
    """The backlog of the socket listening on `port` (ss's Send-Q for a listener)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    return int(out[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_queue_is_long_by_default_and_set_by_backlog(tmp_path):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with started(tmp_path, ECHO_CONFIG) as (process, port):
        assert listen_queue_of(port) == min(65535, somaxconn)  # uvicorn's default was 2,048
        log = stop_and_read_log(process)
    assert f"listen queue {min(65535, somaxconn):,}" in log
    with started(tmp_path, ECHO_CONFIG, "--backlog", "300") as (process, port):
        assert listen_queue_of(port) == min(300, somaxconn)


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_a_bad_backlog_exits_2_with_one_line(tmp_path, value):
    config = tmp_path / "api.yaml"
    config.write_text(ECHO_CONFIG)
    result = run_main("--config", str(config), "--db", str(tmp_path / "l.db"), "--backlog", value)
    assert result.returncode == 2
    assert result.stderr.strip() == f"tollgate: --backlog (or TOLLGATE_BACKLOG) must be a whole number from 1 to 2147483647, got '{value}'"


def vendor_stats(port: int) -> dict[str, int]:
    stats: dict[str, int] = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10).read())
    return stats


@pytest.mark.skipif(shutil.which("wrk") is None and not __import__("os").environ.get("CI"), reason="needs wrk (CI installs it)")
def test_more_than_a_thousand_streams_are_relayed_at_once(tmp_path):
    """The upstream pool had a fixed limit of 1,000 connections: stream 1,001 waited, unseen,
    for one to end. 1,100 clients hold streams open; the vendor must see all 1,100 at once."""
    streams = 1100
    vendor_port = _free_port()
    vendor = subprocess.Popen([sys.executable, "bench/stream_vendor.py", "--port", str(vendor_port), "--events", "2", "--spacing-ms", "60000"], cwd=ROOT)
    try:
        _wait_for(lambda: _answers(vendor_port))
        config = (
            f"providers:\n  - provider: vendor\n    base_url: http://127.0.0.1:{vendor_port}/v1\n    api: k\n    model: [m]\n"
            f"{FREE}api_keys:\n  - api: {STREAM_KEY}\n    name: streams\n"
        )
        with started(tmp_path, config) as (process, port):
            script = tmp_path / "post.lua"
            script.write_text(
                'wrk.method = "POST"\nwrk.body = \'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}\'\n'
                f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {STREAM_KEY}"\n'
            )
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk = subprocess.Popen(
                ["wrk", "-t1", f"-c{streams}", "-d60s", "--timeout", "120s", "-s", str(script), url], stdout=subprocess.DEVNULL, preexec_fn=soft_limit(HARD)
            )
            try:
                _wait_for(lambda: vendor_stats(vendor_port)["open_streams"] >= streams, timeout=50)
                assert vendor_stats(vendor_port)["open_streams"] == streams
            finally:
                wrk.kill()
                wrk.wait()
            assert process.poll() is None
            log = stop_and_read_log(process)
            assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        vendor.terminate()
        vendor.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        vendor_stats(port)
    except OSError:
        return False
    return True


def _wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize(("max_connections", "warned"), [(5000, True), (300, False)])
def test_the_warning_weighs_the_providers_max_connections(tmp_path, max_connections, warned):
    """All providers limited: what they add up to is what the limit must hold (718 here)."""
    limited = ECHO_CONFIG.replace("    model: [echo-1]\n", f"    model: [echo-1]\n    preferences: {{max_connections: {max_connections}}}\n")
    with started(tmp_path, limited, limits=soft_limit(1500, 1500)) as (process, _):
        log = stop_and_read_log(process)
    warnings = [line for line in log.splitlines() if "WARNING" in line and "open-file limit" in line]
    assert len(warnings) == warned, log
    if warned:
        assert f"holds about 718 concurrent streams (2 sockets each), the providers' max_connections add up to {max_connections:,}" in warnings[0]
