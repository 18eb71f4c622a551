"""The request log: one line per proxied request at `info`, as text or JSON (`--log-format`),
from the real `python main.py` process, read from its stderr as an operator's shipper would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from test.test_cli import ROOT, _free_port, wait_until_healthy

ADMIN, USER, BROKE = "sk-log-admin-0001", "sk-log-user-secret-0002", "sk-log-broke-secret-0003"
CONFIG = (
    "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
    f"api_keys:\n  - api: {ADMIN}\n    role: admin\n    name: ops\n"
    f"  - api: {USER}\n    name: alice\n    preferences: {{credits: 10}}\n"
    f"  - api: {BROKE}\n    name: broke\n    preferences: {{credits: 0}}\n"
    "preferences:\n  model_price: {default: '1,2'}\n"
)
MESSAGES = [{"role": "user", "content": "hello there"}]


class LoggedGateway:
    """`python main.py` with its stderr in a file."""

    def __init__(self, tmp: Path, *args: str):
        config, self.log = tmp / "api.yaml", tmp / "gateway.log"
        config.write_text(CONFIG)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "main.py", "--config", str(config), "--db", str(tmp / "t.db"), "--host", "127.0.0.1", "--port", str(port), *args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stderr=log)
        wait_until_healthy(self.process, self.url)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def lines(self, until: str | None = None) -> list[str]:
        """The log so far; with `until`, waits (a few seconds at most) for a line containing it:
        the line is written once the answer is sent, so it may trail the client's response."""
        deadline = time.monotonic() + 5
        while True:
            text = self.log.read_text()
            if until is None or until in text or time.monotonic() > deadline:
                return text.splitlines()
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Any]:
    started: list[LoggedGateway] = []

    def start(*args: str) -> LoggedGateway:
        gateway = LoggedGateway(tmp_path, *args)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def test_json_log_has_one_object_per_request_with_what_it_was_charged(gateways):
    gateway = gateways("--log-format", "json")
    raw = gateway.client(USER).chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES)
    completion = raw.parse()
    request_id, cost = raw.headers["x-request-id"], raw.headers["x-tollgate-cost"]
    streamed = gateway.client(USER).chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, stream=True)
    stream_id = streamed.headers["x-request-id"]
    list(streamed.parse())
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.client(BROKE).chat.completions.create(model="echo-1", messages=MESSAGES)
    assert refused.value.status_code == 402

    lines = gateway.lines(until='"key":"broke"')
    entries = [json.loads(line) for line in lines]  # every line is JSON, uvicorn's own included
    requests = [entry for entry in entries if entry["logger"] == "tollgate.requests"]
    assert len(requests) == 3
    by_id = {entry["request_id"]: entry for entry in requests}
    plain = by_id[request_id]
    assert plain["message"] == "request" and plain["level"] == "info" and plain["time"].endswith("+00:00")
    assert {name: plain[name] for name in ("endpoint", "key", "model", "provider", "status", "stream", "failovers")} == {
        "endpoint": "chat/completions",
        "key": "alice",
        "model": "echo-1",
        "provider": "echo",
        "status": 200,
        "stream": False,
        "failovers": 0,
    }
    assert completion.usage is not None
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert plain["cost_usd"] == cost and "e-" not in cost  # exact, as charged, never in exponent notation
    assert plain["duration_ms"] > 0 and "first_byte_ms" not in plain

    stream = by_id[stream_id]
    assert stream["stream"] is True and stream["status"] == 200 and stream["completion_tokens"] > 0
    assert 0 < stream["first_byte_ms"] <= stream["duration_ms"]

    (refusal,) = [entry for entry in requests if entry["key"] == "broke"]
    assert refusal["status"] == 402 and refusal["error"] == "credit_balance_exhausted" and refusal["cost_usd"] == "0"
    text = "\n".join(lines)
    assert USER not in text and BROKE not in text and ADMIN not in text


def test_text_log_has_one_key_value_line_per_request(gateways):
    gateway = gateways()
    raw = gateway.client(USER).chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    (line,) = [line for line in gateway.lines(until=request_id) if "tollgate.requests" in line]
    assert f"INFO tollgate.requests: request_id={request_id} endpoint=chat/completions key=alice model=echo-1 provider=echo status=200" in line
    assert f"cost_usd={raw.headers['x-tollgate-cost']}" in line and USER not in line


def test_no_request_lines_below_info(gateways):
    gateway = gateways("--log-level", "warning")
    gateway.client(USER).chat.completions.create(model="echo-1", messages=MESSAGES)
    time.sleep(0.3)
    gateway.stop()
    assert not [line for line in gateway.lines() if "tollgate.requests" in line]
