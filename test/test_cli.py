"""`python main.py`: arguments, environment defaults, and clear start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from test.conftest import FREE

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def wait_until_healthy(process: subprocess.Popen[Any], url: str, timeout: float = 20) -> None:
    """Until the gateway at `url` answers /health; fails at once if the process has exited."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, f"gateway did not start (exit code {process.poll()})"
        time.sleep(0.05)


def test_missing_config_exits_2_with_a_hint(tmp_path):
    missing = tmp_path / "api.yaml"
    result = run_main("--config", str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(missing) in lines[0] and "cp api.yaml.example" in lines[0]


def test_config_path_from_environment(tmp_path):
    import os

    missing = tmp_path / "from-env.yaml"
    result = run_main(env={**os.environ, "TOLLGATE_CONFIG": str(missing)})
    assert result.returncode == 2 and str(missing) in result.stderr


def test_invalid_config_exits_2_naming_file_line_and_column(tmp_path):
    config = tmp_path / "api.yaml"
    config.write_text("providers:\n  - provider: x\n    engine: echo\n    model: [m]\nbogus: 1\n")
    result = run_main("--config", str(config))
    assert result.returncode == 2
    assert f"{config}:5:1: unknown key 'bogus'" in result.stderr


def test_example_config_is_valid():
    from core.config import load_config

    config = load_config(ROOT / "api.yaml.example")
    assert "echo-1" in config.routes
    assert any(key.is_admin for key in config.keys)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_flushes_every_ledger_row(tmp_path):
    import signal
    import sqlite3

    import httpx

    config = tmp_path / "api.yaml"
    config.write_text(
        "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
        "api_keys:\n  - api: sk-count-cli-0001\n    preferences: {billing_mode: count, count_credits: 100}\n"
        "preferences:\n  model_price: {echo-1: {token_price: '0,0'}}\n  count_billing: {default_count_price: 0.002}\n"
    )
    db, port = tmp_path / "ledger.db", _free_port()
    process = subprocess.Popen([sys.executable, "main.py", "--config", str(config), "--db", str(db), "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": "Bearer sk-count-cli-0001"}
        for _ in range(25):
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers, timeout=5)
            assert response.status_code == 200
            assert "server" not in response.headers  # no advertised server software
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    finally:
        if process.poll() is None:
            process.kill()
    with sqlite3.connect(db) as ledger:
        assert ledger.execute("SELECT COUNT(*), SUM(count_charged), SUM(cost_nanos) FROM usage").fetchone() == (25, 25, 25 * 2_000_000)


ECHO_CONFIG = (
    "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
    + FREE
    + "api_keys:\n  - api: sk-admin-change-me\n    role: admin\n    name: ops\n"
)


def test_a_port_in_use_exits_2_with_one_line_before_the_ledger_is_made(tmp_path):
    import socket

    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(ECHO_CONFIG)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main("--config", str(config), "--db", str(db), "--host", "127.0.0.1", "--port", str(port))
    line = one_line_refusal(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    assert not db.exists()  # refused before the ledger was created (or, an old one, migrated)


def start_and_stop(tmp_path: Path, host: str) -> tuple[str, int]:
    """Start `python main.py` on ECHO_CONFIG and a new ledger, wait until it answers, stop it; its log and port."""
    import signal

    config, port = tmp_path / "api.yaml", _free_port()
    config.write_text(ECHO_CONFIG)
    command = [sys.executable, "main.py", "--config", str(config), "--db", str(tmp_path / f"{host}.db"), "--host", host, "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, log = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()  # never left running past the test
            raise
    return log, port


def test_start_up_logs_the_pages_url_and_one_line_for_a_new_ledger(tmp_path):
    log, port = start_and_stop(tmp_path, "127.0.0.1")
    assert f"Tollgate pages: http://127.0.0.1:{port}/" in log
    assert "migrating" not in log and log.count("creating a new ledger") == 1, log
    assert "sk-admin-change-me" not in log  # the example admin key, on loopback only: no warning


def test_the_example_admin_key_on_a_public_address_is_warned_about(tmp_path):
    log, port = start_and_stop(tmp_path, "0.0.0.0")
    warnings = [line for line in log.splitlines() if "WARNING" in line and "sk-admin-change-me" in line]
    assert len(warnings) == 1, log
    assert "'ops'" in warnings[0] and "0.0.0.0" in warnings[0]
    assert f"Tollgate pages: http://localhost:{port}/" in log


def one_line_refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("args", "port_env", "shown"), [((), "abc", "abc"), (("--port", "70000"), None, "70000"), (("--port", "-1"), None, "-1")])
def test_a_bad_port_exits_2_with_one_line(tmp_path, args, port_env, shown):
    import os

    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(ECHO_CONFIG)
    env = {key: value for key, value in os.environ.items() if key != "PORT"} | ({"PORT": port_env} if port_env else {})
    line = one_line_refusal(run_main("--config", str(config), "--db", str(db), *args, env=env))
    assert line == f"tollgate: --port (or PORT) must be a whole number from 0 to 65535, got '{shown}'"
    assert not db.exists()


# main.py on a machine without IPv6: the kernel refuses AF_INET6 sockets.
WITHOUT_IPV6 = """
import errno, os, runpy, socket, sys
class NoIPv6(socket.socket):
    def __init__(self, family=-1, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        super().__init__(family, *args, **kwargs)
socket.socket = NoIPv6
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_an_ipv6_host_without_ipv6_exits_2_with_one_line(tmp_path):
    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(ECHO_CONFIG)
    command = [sys.executable, "-c", WITHOUT_IPV6, "--config", str(config), "--db", str(db), "--host", "::1", "--port", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    line = one_line_refusal(result)
    assert line.startswith("tollgate: cannot listen on [::1]:0: Address family not supported") and "--host 0.0.0.0" in line


def test_check_config_prints_warnings_and_a_summary_without_starting(tmp_path):
    config = tmp_path / "api.yaml"
    config.write_text("providers:\n  - provider: x\n    engine: echo\n    model: [m]\n    notes: docs\n" + FREE + "api_keys:\n  - api: sk-a\n    role: admin\n")
    result = run_main("--check-config", str(config), "--port", "1")  # no port is opened, no ledger made
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {config}:5:5: uni-api option 'notes' is not supported and is ignored"]
    assert result.stdout.strip() == f"{config}: OK (1 providers, 1 models, 1 keys, 1 warnings)"
    assert list(tmp_path.iterdir()) == [config]


def test_check_config_prints_the_error_with_its_line_and_fails(tmp_path):
    config = tmp_path / "api.yaml"
    config.write_text("providers:\n  - provider: x\n    engine: echo\n    notes: docs\n    model: [m]\napi_keys:\n  - api: sk-a\n    rol: admin\n")
    result = run_main("--check-config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"warning: {config}:4:5: uni-api option 'notes' is not supported and is ignored",
        f"error: {config}:8:5: unknown key 'rol' in api_keys[0] (did you mean 'role'?)",
    ]
    assert result.stdout == ""


def test_check_config_loads_uni_apis_readme_example(tmp_path):
    result = run_main("--check-config", str(ROOT / "test" / "fixtures" / "uniapi" / "codex.yaml"))
    assert result.returncode == 0 and "uni-api engine 'codex' is not supported" in result.stderr


@pytest.mark.parametrize("value", ["0", "257", "two"])
def test_a_bad_worker_count_exits_2_with_one_line(tmp_path, value):
    config, db = tmp_path / "api.yaml", tmp_path / "ledger.db"
    config.write_text(ECHO_CONFIG)
    line = one_line_refusal(run_main("--config", str(config), "--db", str(db), "--workers", value))
    assert line == f"tollgate: --workers (or TOLLGATE_WORKERS) must be a whole number from 1 to 256, got '{value}'"
    assert not db.exists()
