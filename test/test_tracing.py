"""OpenTelemetry traces: the real `python main.py` sending OTLP/HTTP to a fake collector.

The collector is a small local HTTP server decoding what the SDK's exporter posts to
/v1/traces (the OTLP protobuf messages, as a real collector reads them); the vendor is
test/servers.py's fake.
"""

from __future__ import annotations

import gzip
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from core.telemetry.tracing import Tracing
from test.conftest import ADMIN_KEY, USER_KEY, keys_yaml
from test.servers import FakeUpstream, fail
from test.test_cli import ROOT, _free_port, wait_until_healthy

MESSAGES = [{"role": "user", "content": "hi"}]
# $1 per 1M prompt tokens, $2 per 1M completion tokens: the fake's 11 + 7 tokens cost $0.000025.
CONFIG = """
providers:
  - provider: p1
    base_url: {p1}
    api: sk-vendor-one
    model: [house-chat]
  - provider: p2
    base_url: {p2}
    api: sk-vendor-two
    model: [house-chat]
preferences:
  model_price: {{default: '1,2'}}
"""


class Collector:
    """A fake OTLP/HTTP collector: keeps every span posted to /v1/traces, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                self.spans.extend((resource, span) for scope_spans in resource_spans.scope_spans for span in scope_spans.spans)

    def of_trace(self, trace_id: bytes) -> list[Span]:
        with self.lock:
            return [span for _, span in self.spans if span.trace_id == trace_id]

    def wait_for(self, found: Callable[[], list[Span]], count: int, timeout: float = 15) -> list[Span]:
        deadline = time.monotonic() + timeout
        while len(spans := found()) < count:
            assert time.monotonic() < deadline, f"the collector got {len(spans)} of {count} spans"
            time.sleep(0.05)
        return spans


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, str(pair.value.WhichOneof("value"))) for pair in pairs if isinstance(pair, KeyValue)}


class Gateway:
    """`python main.py` with the OTEL_* variables an operator sets, its log in a file."""

    def __init__(self, tmp: Path, config: str, environ: dict[str, str]):
        (tmp / "api.yaml").write_text(config + keys_yaml().replace("name: alice", "name: alice\n    preferences: {billing_mode: token, credits: 100}"))
        port = str(_free_port())
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "main.py", "--config", str(tmp / "api.yaml"), "--db", str(tmp / "ledger.db"), "--host", "127.0.0.1", "--port", port]
        self.log = tmp / "gateway.log"
        with open(self.log, "ab") as log:  # a pipe nobody reads would block the gateway once full
            self.process = subprocess.Popen(command, cwd=ROOT, stderr=log, env={**os.environ, **environ})
        wait_until_healthy(self.process, self.url)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=USER_KEY, max_retries=0, timeout=15)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it: a graceful shutdown, which flushes the spans."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def collector() -> Iterator[Collector]:
    fake = Collector()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def traced(tmp_path: Path, collector: Collector, upstream: FakeUpstream) -> Iterator[Gateway]:
    """A gateway sending its traces to the collector, two providers serving house-chat."""
    config = CONFIG.format(p1=upstream.base_url("p1"), p2=upstream.base_url("p2"))
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    gateway = Gateway(tmp_path, config, environ)
    yield gateway
    gateway.stop()


def test_a_failed_over_request_is_one_span_continuing_the_callers_trace_with_a_span_per_attempt(traced, collector, upstream):
    upstream.script("p1", fail(503))
    trace_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{parent_id.hex()}-01"

    raw = traced.client().chat.completions.with_raw_response.create(model="house-chat", messages=MESSAGES, extra_headers={"traceparent": traceparent})
    usage = raw.parse().usage
    assert usage is not None and raw.headers["x-tollgate-provider"] == "p2"
    collector.wait_for(lambda: collector.of_trace(trace_id), 3)  # sent while the gateway runs
    traced.stop()  # and nothing more after its shutdown flush

    spans = collector.of_trace(trace_id)
    (server,) = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    assert server.parent_span_id == parent_id and server.name == "chat house-chat"
    attributes = attributes_of(server.attributes)
    assert attributes == {
        "gen_ai.system": "openai",
        "gen_ai.provider.name": "openai",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "house-chat",
        "gen_ai.response.model": "house-chat",
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "http.response.status_code": 200,
        "tollgate.request_id": raw.headers["x-request-id"],
        "tollgate.endpoint": "chat/completions",
        "tollgate.key.name": "alice",
        "tollgate.provider": "p2",
        "tollgate.cost_nanos": 25_000,
        "tollgate.cost_usd": raw.headers["x-tollgate-cost"],
        "tollgate.cost_type": "token",
        "tollgate.failovers": 1,
        "tollgate.stream": False,
    }
    assert raw.headers["x-tollgate-cost"] == "0.000025"
    assert server.status.code == Status.STATUS_CODE_UNSET

    attempts = sorted((span for span in spans if span.kind == Span.SPAN_KIND_CLIENT), key=lambda span: span.start_time_unix_nano)
    assert len(spans) == 3 and len(attempts) == 2
    assert [attributes_of(span.attributes)["tollgate.outcome"] for span in attempts] == ["failover", "ok"]
    assert [attributes_of(span.attributes)["tollgate.provider"] for span in attempts] == ["p1", "p2"]
    assert all(span.parent_span_id == server.span_id and span.name == "chat house-chat" for span in attempts)
    assert [span.status.code for span in attempts] == [Status.STATUS_CODE_ERROR, Status.STATUS_CODE_UNSET]
    first, second = attempts
    times = [server.start_time_unix_nano, first.start_time_unix_nano, first.end_time_unix_nano, second.start_time_unix_nano]
    assert times == sorted(times) and second.end_time_unix_nano <= server.end_time_unix_nano
    resource = next(resource for resource, span in collector.spans if span.span_id == server.span_id)
    assert resource["service.name"] == "tollgate"
    assert not any(USER_KEY in str(value) or ADMIN_KEY in str(value) for value in attributes.values())


def test_a_request_without_traceparent_starts_a_new_trace(traced, collector):
    chunks = list(traced.client().chat.completions.create(model="house-chat", messages=MESSAGES, stream=True))
    assert chunks

    (server,) = collector.wait_for(lambda: [span for _, span in collector.spans if span.kind == Span.SPAN_KIND_SERVER], 1)
    assert server.parent_span_id == b"" and len(server.trace_id) == 16
    attributes = attributes_of(server.attributes)
    assert attributes["tollgate.stream"] is True and attributes["tollgate.failovers"] == 0
    assert 0 < attributes["tollgate.time_to_first_byte_s"] < (server.end_time_unix_nano - server.start_time_unix_nano) / 1e9
    spans = collector.wait_for(lambda: collector.of_trace(server.trace_id), 2)
    (attempt,) = [span for span in spans if span.kind == Span.SPAN_KIND_CLIENT]
    assert attempt.parent_span_id == server.span_id and attributes_of(attempt.attributes)["tollgate.outcome"] == "ok"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces", "OTEL_TRACES_EXPORTER": "none"},
    ],
    ids=["no endpoint", "sdk disabled", "traces exporter none"],
)
def test_tracing_is_off_unless_an_otlp_endpoint_is_set_and_not_disabled(monkeypatch, environ):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert Tracing.from_environment() is None


def test_the_gateway_serves_traceparent_requests_with_tracing_off(monkeypatch, start_gateway, upstream):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    gateway = start_gateway(CONFIG.format(p1="{fake:p1}", p2="{fake:p2}") + keys_yaml(), upstream)
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    answer = gateway.client().chat.completions.create(model="house-chat", messages=MESSAGES, extra_headers={"traceparent": traceparent})
    assert answer.choices[0].message.content
    assert gateway.server.app.state.telemetry.tracing is None


def test_without_the_opentelemetry_packages_the_gateway_imports_and_warns_once():
    """The default install lacks them: main.py imports, and an OTLP endpoint set only warns."""
    script = (
        "import importlib.abc, logging, sys\n"
        "class NotInstalled(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
        "import main\n"
        "from core.telemetry.tracing import Tracing\n"
        "assert Tracing.from_environment() is None\n"
        "assert not [name for name in sys.modules if name.startswith('opentelemetry')]\n"
    )
    environ = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("WARNING tollgate.telemetry:") and "pip install -r requirements-otel.txt" in warning


def test_the_operators_service_name_wins_and_grpc_is_sent_as_http(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-edge")
    with caplog.at_level(logging.WARNING, logger="tollgate.telemetry"):
        tracing = Tracing.from_environment()
    assert tracing is not None
    tracing.shutdown()
    assert tracing.provider.resource.attributes["service.name"] == "billing-edge"
    assert [record.getMessage() for record in caplog.records] == ["OTLP protocol 'grpc' is not supported: traces are sent as http/protobuf"]

    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,deployment.environment=prod")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    tracing = Tracing.from_environment()
    assert tracing is not None
    tracing.shutdown()
    assert tracing.provider.resource.attributes["service.name"] == "from-attributes"


def test_a_request_no_provider_could_serve_is_an_error_span_naming_the_error(traced, collector, upstream):
    upstream.script("p1", fail(503))
    upstream.script("p2", fail(500))
    with pytest.raises(openai.APIStatusError) as failed:
        traced.client().chat.completions.create(model="house-chat", messages=MESSAGES)
    code = failed.value.body["code"] if isinstance(failed.value.body, dict) else None
    assert failed.value.status_code >= 500 and code

    (server,) = collector.wait_for(lambda: [span for _, span in collector.spans if span.kind == Span.SPAN_KIND_SERVER], 1)
    assert server.status.code == Status.STATUS_CODE_ERROR and server.status.message == code
    attributes = attributes_of(server.attributes)
    assert attributes["http.response.status_code"] == failed.value.status_code and attributes["error.type"] == code
    assert "gen_ai.usage.input_tokens" not in attributes and "tollgate.cost_usd" not in attributes  # nothing was charged
    spans = collector.wait_for(lambda: collector.of_trace(server.trace_id), 3)
    attempts = sorted((span for span in spans if span.kind == Span.SPAN_KIND_CLIENT), key=lambda span: span.start_time_unix_nano)
    assert [attributes_of(span.attributes)["tollgate.outcome"] for span in attempts] == ["failover", "error"]
    assert all(span.status.code == Status.STATUS_CODE_ERROR for span in attempts)
