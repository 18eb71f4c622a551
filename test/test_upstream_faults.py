"""Upstream faults: whatever the vendor does, the client gets an OpenAI-shaped error, every
reservation and concurrency slot is released, and the ledger charges exactly what it should
(nothing for a failed call, the streamed part for a cut stream)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from test.conftest import ADMIN_KEY, USER_KEY
from test.servers import completion_body, fail, hang, sse, stream_chunks

MESSAGES = [{"role": "user", "content": "hello there"}]
CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o]
  - provider: reset
    base_url: RESET_URL
    api: k
    model: [reset-model]
  - provider: g
    base_url: {{fake:p2}}
    engine: gemini
    api: k
    model: [gemini-model]
  - provider: a
    base_url: {{fake:p3}}
    engine: anthropic
    api: k
    model: [claude-model]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 10, concurrency_limit: 1}}
preferences:
  AUTO_RETRY: false
  model_timeout: {{default: 0.5}}
  max_response_body_bytes: 4096
  model_price: {{gpt-4o: '1000,2000', default: '1000,2000'}}  # gpt-4o: not the catalog's price
"""


@pytest.fixture
def resetting_server() -> Iterator[str]:
    """A TCP server that reads the request and resets the connection (RST, not a clean close)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    listener.close()


def _streaming(chunks: list[bytes], pause: float = 0.0, media_type: str = "text/event-stream") -> Response:
    async def gen():  # type: ignore[no-untyped-def]
        for chunk in chunks:
            yield chunk
            if pause:
                await asyncio.sleep(pause)

    return StreamingResponse(gen(), media_type=media_type)


async def html_page(body: dict[str, Any], request: Request) -> Response:
    return Response("<html><body>502 Bad Gateway</body></html>", media_type="text/html")


async def trickled_json(body: dict[str, Any], request: Request) -> Response:
    text = JSONResponse(completion_body(body)).body
    return _streaming([text[i : i + 8] for i in range(0, len(text), 8)], pause=0.2, media_type="application/json")


async def huge_json(body: dict[str, Any], request: Request) -> Response:
    return JSONResponse(completion_body(body, "x" * 10_000))


async def malformed_sse(body: dict[str, Any], request: Request) -> Response:
    return _streaming([b"data: {not json at all\n\n", b"event: ???\ndata: [\n\n"])


async def cut_stream(body: dict[str, Any], request: Request) -> Response:
    return _streaming(stream_chunks(body, ["abcd", "efgh", "ijkl"])[:3])  # three words; then the connection ends, no [DONE]


async def stalled_stream(body: dict[str, Any], request: Request) -> Response:
    chunks = stream_chunks(body, ["abcd", "efgh"])
    return _streaming([chunks[0], chunks[1]], pause=2.0)  # then silence for longer than the timeout


async def endless_stream(body: dict[str, Any], request: Request) -> Response:
    chunk = stream_chunks(body, ["abcdefgh" * 16])[0]
    return _streaming([chunk] * 200)


def odd_json(payload: Any) -> Any:
    """A 200 whose JSON is not an answer of the shape the endpoint promises."""

    async def handler(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(payload)

    return handler


# (name, upstream handler, model, stream, expected status, expected code, charged?)
FAULTS = [
    ("hang", hang(5), "gpt-4o", False, 504, "upstream_timeout", False),
    ("reset", None, "reset-model", False, 502, "upstream_unreachable", False),
    ("5xx", fail(503), "gpt-4o", False, 502, None, False),
    ("html", html_page, "gpt-4o", False, 502, "upstream_error", False),
    ("trickle", trickled_json, "gpt-4o", False, 504, "upstream_timeout", False),
    ("too large", huge_json, "gpt-4o", False, 502, "upstream_response_too_large", False),
    ("hang before stream", hang(5), "gpt-4o", True, 504, "upstream_timeout", False),
    ("malformed sse", malformed_sse, "gpt-4o", True, 200, "upstream_stream_broken", False),
    ("cut stream", cut_stream, "gpt-4o", True, 200, "upstream_stream_broken", True),
    ("stalled stream", stalled_stream, "gpt-4o", True, 200, "upstream_timeout", True),
    ("endless stream", endless_stream, "gpt-4o", True, 200, "upstream_response_too_large", True),
    ("json without choices", odd_json({"id": "x", "usage": None}), "gpt-4o", False, 502, "upstream_invalid_response", False),
    ("json list", odd_json([{"choices": []}]), "gpt-4o", False, 502, "upstream_invalid_response", False),
    ("json error at 200", odd_json({"error": {"message": "busy"}}), "gpt-4o", False, 502, "upstream_invalid_response", False),
    ("choices not a list", odd_json({"choices": "hello"}), "gpt-4o", False, 502, "upstream_invalid_response", False),
    ("gemini odd shape", odd_json({"candidates": [{"content": "hello"}]}), "gemini-model", False, 502, "upstream_invalid_response", False),
]


def _ledger(gateway: Any) -> list[tuple[str, int]]:
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT status, cost_nanos FROM usage ORDER BY id").fetchall()


def _remaining(gateway: Any) -> float:
    states = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]
    return float(states[USER_KEY]["remaining_credits"])


@pytest.mark.parametrize(("name", "handler", "model", "stream", "status", "code", "charged"), FAULTS, ids=[f[0] for f in FAULTS])
def test_upstream_fault_is_an_openai_error_releases_everything_and_bills_exactly(
    start_gateway, upstream, resetting_server, name, handler, model, stream, status, code, charged
):
    if handler is not None:
        upstream.script("p2" if model.startswith("gemini") else "p1", handler)
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    response = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body, timeout=30)

    assert response.status_code == status, response.text
    if status == 200:  # the stream had started: the error is its last event
        error = json.loads(response.text.strip().split("data: ")[-1])["error"]
    else:
        error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in response.text

    remaining = _remaining(gateway)  # (reading the states also commits every queued ledger row)
    rows = _ledger(gateway)
    assert [status_ for status_, _ in rows] == ["error"], rows  # one row per request, failed or not
    charges = rows[0][1]
    assert (charges > 0) is charged, rows
    # Reservation released: the balance is the credits minus exactly what the ledger charged.
    assert remaining == pytest.approx(10 - charges / 1e9, abs=1e-9)
    # Concurrency slot released (the key may run one request at a time): the next call works.
    upstream.script("p1", lambda body, request: _ok(body))
    again = gateway.client(USER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert again.choices[0].message.content == "Hello from upstream"


async def _ok(body: dict[str, Any]) -> Response:
    return JSONResponse(completion_body(body))


def test_cut_stream_bills_the_streamed_words_as_an_estimate(start_gateway, upstream, resetting_server):
    upstream.script("p1", cut_stream)
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    response = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body, timeout=30)
    assert "abcd" in response.text and "efgh" in response.text
    _remaining(gateway)  # commits the queued row
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        rows = db.execute("SELECT status, prompt_tokens, completion_tokens, cost_nanos FROM usage").fetchall()
    # 12 streamed bytes = 3 completion tokens; the prompt is estimated from the messages.
    prompt = rows[0][1]
    assert rows == [("error", prompt, 3, (prompt * 1000 + 3 * 2000) * 1000)]


def test_an_oversized_stream_on_v1_messages_ends_with_anthropics_error_event(start_gateway, upstream, resetting_server):
    upstream.script("p1", endless_stream)
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": MESSAGES, "stream": True}
    response = gateway.http("POST", "/v1/messages", key=USER_KEY, json=body, timeout=30)
    assert response.status_code == 200
    last = response.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    error = json.loads(last.split("data: ", 1)[1])
    assert error["type"] == "error" and "limit of 4096 bytes" in error["error"]["message"]
    rows = _balance_equals_ledger_and_slot_is_free(gateway, upstream)
    assert rows[0][0] == "error" and rows[0][1] > 0, "billed as a cut stream: the error the gateway set survives the translation"


def _balance_equals_ledger_and_slot_is_free(gateway: Any, upstream: Any) -> list[tuple[str, int]]:
    """What every odd answer must leave behind: one ledger row, the balance equal to the
    credits minus that row, and the key's single concurrency slot free again."""
    remaining = _remaining(gateway)  # (also commits every queued ledger row)
    rows = _ledger(gateway)
    assert len(rows) == 1, rows
    assert remaining == pytest.approx(10 - rows[0][1] / 1e9, abs=1e-9)
    upstream.script("p1", lambda body, request: _ok(body))
    again = gateway.client(USER_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert again.choices[0].message.content == "Hello from upstream"
    return rows


def test_an_answer_of_odd_shape_is_relayed_and_billed_by_estimate(start_gateway, upstream, resetting_server):
    answer = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": "hello"}, 7, {"message": {"content": 5}}]}
    upstream.script("p1", odd_json(answer))
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    response = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 200 and response.json() == answer
    rows = _balance_equals_ledger_and_slot_is_free(gateway, upstream)
    # 10 prompt tokens estimated from the messages, 2 for "hello": (10 x 1000 + 2 x 2000) per 1M USD.
    assert rows == [("estimated", 14_000_000)]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_stream_with_odd_deltas_is_billed_by_estimate(start_gateway, upstream, resetting_server, path):
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "abcd"}}]},
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": 5}}]},
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": 5}}, "x"], "content": ["y"]}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "efgh"}, "finish_reason": "stop"}]},
    ]
    chunks = [sse(e) for e in events] + [sse(b"[DONE]")]
    upstream.script("p1", lambda body, request: _async(_streaming(chunks)))
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    response = gateway.http("POST", path, key=USER_KEY, json={"model": "gpt-4o", "max_tokens": 10, "messages": MESSAGES, "stream": True})
    assert response.status_code == 200
    if path == "/v1/messages":  # translated: the odd fields are skipped, the text goes through
        deltas = [json.loads(e.split("data: ", 1)[1]).get("delta") for e in response.text.strip().split("\n\n")]
        assert [d["text"] for d in deltas if d and d.get("type") == "text_delta"] == ["abcd", "efgh"]
        assert response.text.strip().endswith('data: {"type": "message_stop"}')
    else:
        assert response.text == b"".join(chunks).decode()
    rows = _balance_equals_ledger_and_slot_is_free(gateway, upstream)
    # 10 prompt tokens estimated, 8 streamed bytes = 2 completion tokens.
    assert rows == [("estimated", 14_000_000)]


def _anthropic_events(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


# Text, then an event its adapter cannot read, all in ONE read: the text must still reach the client.
UNREADABLE_AFTER_TEXT = {
    "gemini-model": ("p2", b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in (
        {"candidates": [{"content": {"parts": [{"text": "abcdefgh"}], "role": "model"}}]},
        {"candidates": [{"content": "hello"}]},
    ))),
    "claude-model": ("p3", _anthropic_events(
        {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcdefgh"}},
        {"type": "content_block_start", "index": "a", "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
    )),
}  # fmt: skip


@pytest.mark.parametrize("model", UNREADABLE_AFTER_TEXT)
def test_a_stream_that_cannot_be_read_ends_with_an_error_event_and_is_billed(start_gateway, upstream, resetting_server, model):
    """What the events before the unreadable one said reaches the client (it is billed), also
    when they arrived in the same read as it."""
    vendor, body = UNREADABLE_AFTER_TEXT[model]
    upstream.script(vendor, lambda _body, request: _async(_streaming([body])))
    gateway = start_gateway(CONFIG.replace("RESET_URL", resetting_server), upstream)
    response = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json={"model": model, "messages": MESSAGES, "stream": True})
    assert response.status_code == 200 and "abcdefgh" in response.text
    error = json.loads(response.text.strip().split("data: ")[-1])["error"]
    assert error["code"] == "upstream_invalid_response" and error["type"] == "api_error"
    rows = _balance_equals_ledger_and_slot_is_free(gateway, upstream)
    assert rows == [("error", 14_000_000)]  # 10 prompt tokens (estimated, or the vendor's), 8 streamed bytes = 2 completion tokens


async def _async(value: Any) -> Any:
    return value
