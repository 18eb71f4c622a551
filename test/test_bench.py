"""A short smoke run of the benchmark, so that it cannot rot: zero errors and a table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installed(tool: str) -> bool:
    return shutil.which(tool) is not None or Path(f"/usr/sbin/{tool}").exists()


@pytest.mark.skipif(not os.environ.get("CI") and not (_installed("nginx") and _installed("wrk")), reason="needs nginx and wrk (CI installs them)")
def test_benchmark_smoke_run_has_no_errors_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--duration", "1", "--warmup", "1", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("json", "stream"))]
    assert len(rows) == 8, result.stdout  # (json, stream) x (32 connections, 1) x (bare, gateway)
    assert all(row[6] == "0" for row in rows), "errors column"
    assert {row[2] for row in rows} == {"bare", "gateway"}


@pytest.mark.skipif(not os.environ.get("CI") and not (_installed("nginx") and _installed("wrk")), reason="needs nginx and wrk (CI installs them)")
def test_fleet_benchmark_smoke_run_has_no_errors_and_a_row_per_case():
    result = subprocess.run(
        [sys.executable, "bench/fleet_bench.py", "--duration", "1", "--warmup", "1", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = ["sqlite (1 process)", "postgresql --workers 1", "postgresql --workers 2", "postgresql --workers 4"]
    rows = {line[:24].strip(): line[24:].split() for line in result.stdout.splitlines() if line[:24].strip() in cases and len(line[24:].split()) == 8}
    assert list(rows) == cases, result.stdout
    assert all(float(row[0]) > 0 and row[3] == "0" for row in rows.values()), result.stdout  # requests/s and errors


def test_the_running_gateway_collects_garbage_in_larger_steps(start_gateway, upstream):
    """Python's default GC thresholds cost the gateway ~11% of its throughput (see main.py)."""
    import gc

    from main import GC_THRESHOLDS
    from test.conftest import keys_yaml

    gc.set_threshold(700, 10, 10)
    gateway = start_gateway(f"providers:\n  - provider: p1\n    base_url: {{fake:p1}}\n    api: k\n    model: [gpt-4o]\n{keys_yaml()}", upstream)
    assert gateway.http("GET", "/v1/models").status_code == 200
    assert gc.get_threshold() == GC_THRESHOLDS


@pytest.mark.skipif(not os.environ.get("CI") and not _installed("wrk"), reason="needs wrk (CI installs it)")
def test_streams_benchmark_smoke_run_has_no_errors_and_a_row_per_server():
    command = [sys.executable, "bench/streams_bench.py", "--connections", "60", "--duration", "2", "--events", "4", "--spacing-ms", "20", "--hold", "60"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["60"]]
    assert [row[1] for row in rows] == ["bare", "gateway"], result.stdout
    assert all(float(row[2]) > 0 and row[6] == "0" and row[7] == "0/0/0" for row in rows), result.stdout  # requests/s, errors
    held = [line for line in result.stdout.splitlines() if line.startswith("held open:")]
    assert len(held) == 2 and all(" 60 streams" in line for line in held), result.stdout


@pytest.mark.skipif(not os.environ.get("CI") and not _installed("wrk"), reason="needs wrk (CI installs it)")
def test_streams_benchmark_runs_a_fleet_over_several_keys_without_errors():
    command = [sys.executable, "bench/streams_bench.py", "--connections", "60", "--duration", "2", "--events", "4", "--spacing-ms", "20", "--hold", "0",
               "--servers", "fleet-2", "--keys", "3"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 key(s)" in result.stdout and "keys billed: fleet-2 x60 3 of 3" in result.stdout, result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["60"]]
    assert [row[1] for row in rows] == ["fleet-2"] and float(rows[0][2]) > 0 and rows[0][6] == "0", result.stdout  # 401s would be errors
