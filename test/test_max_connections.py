"""`providers[].preferences.max_connections`: a provider's calls in flight at once, at most
(core/upstream_gate.py; issue #21, "no hidden ceiling").

The gateway is the real app on uvicorn, driven by the openai and anthropic SDKs (and a raw
socket, for a client that hangs up); the vendor is test/servers.py's fake, whose streams are
held open until the test releases them, so "at once" is a state the test waits for, never a
timing. The gate's own counts are read off the running app (`gateway.gate`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import anthropic
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.config import Provider, build_config
from core.config.yamlsource import ConfigError
from core.upstream_gate import REPORT_EVERY, ClientLeft, Lane, UpstreamBusy, UpstreamGate
from test.conftest import ADMIN_KEY, USER_KEY, RunningGateway
from test.servers import ResponsesVendor, completion_body, stream_chunks, streamed_text
from test.test_metrics_scrape import scrape_when_idle
from test.test_web import Browser

T = TypeVar("T")
MESSAGES: Any = [{"role": "user", "content": "hi"}]
WORDS = ["Hello", " from", " upstream"]
# A stream reports 11 prompt and 3 completion tokens (stream_chunks); at $1 and $2 per million:
STREAM_COST = Decimal(11 * 1 + 3 * 2) / 1_000_000


def config(p1: str, p2: str | None = None, extra_models: str = "") -> str:
    """p1 serves `chat` with preferences `p1`; with `p2`, so does p2 (after it, fixed_priority)."""
    second = (
        f"""
  - provider: p2
    base_url: {{fake:p2}}
    api: sk-vendor-two
    model: [chat]
    preferences: {p2}"""
        if p2 is not None
        else ""
    )
    return f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: sk-vendor-one
    model: [chat{extra_models}]
    preferences: {p1}{second}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice
    preferences: {{credits: 10}}
preferences:
  model_price: {{default: '1,2'}}
"""


class HeldVendor:
    """OpenAI's chat, faked: a stream sends its first chunk, then is held until `release` is
    set; a plain completion answers at once. Counts the calls open at once, and the most."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.open = 0
        self.most_open = 0
        self.calls = 0

    async def __call__(self, body: dict[str, Any], request: Request) -> Response:
        self.calls += 1
        if not body.get("stream"):
            return JSONResponse(completion_body(body))
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        chunks = stream_chunks(body, WORDS)

        async def gen():  # type: ignore[no-untyped-def]
            try:
                yield chunks[0]
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
                for chunk in chunks[1:]:
                    yield chunk
            finally:
                self.open -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture
def vendor(upstream: Any) -> HeldVendor:
    held = HeldVendor()
    upstream.script("p1", held)
    upstream.script("p2", held)
    return held


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state of the running gateway (not a timing: the state holds once reached)."""
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def counts(gateway: RunningGateway, provider: str) -> tuple[int, int]:
    """(calls in flight, requests waiting) of a provider, as the gateway's gate holds them."""
    lane = gateway.server.app.state.gateway.gate.get(provider)
    return (lane.in_flight, lane.waiting) if lane is not None else (0, 0)


def in_background(work: Callable[[], Coroutine[Any, Any, T]]) -> Future[T]:
    """Run `work` on an event loop of its own, in a thread, while the test watches the gateway."""
    pool = ThreadPoolExecutor(1)
    done: Future[T] = pool.submit(lambda: asyncio.run(work()))
    pool.shutdown(wait=False)
    return done


async def stream_text(gateway: RunningGateway) -> str:
    client = gateway.async_client()
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    return streamed_text([chunk async for chunk in stream])


def streams_at_once(gateway: RunningGateway, count: int) -> Future[list[str]]:
    async def all_of_them() -> list[str]:
        return list(await asyncio.gather(*(stream_text(gateway) for _ in range(count))))

    return in_background(all_of_them)


def key_state(gateway: RunningGateway) -> dict[str, Any]:
    return gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]  # type: ignore[no-any-return]


def refused(call: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


# --- the limit holds, and what waits is served -----------------------------------------------


def test_sixty_streams_reach_a_provider_five_at_a_time_and_all_are_served_and_billed(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 5, max_connections_wait: 60}"), upstream)
    streams = streams_at_once(gateway, 60)
    until(lambda: counts(gateway, "p1") == (5, 55) and vendor.open == 5, "5 streams open upstream and 55 waiting")
    vendor.release.set()
    assert streams.result(timeout=60) == ["".join(WORDS)] * 60
    assert (vendor.most_open, vendor.calls) == (5, 60)
    state = key_state(gateway)
    assert state["request_count"] == 60
    assert Decimal(str(state["total_cost"])) == 60 * STREAM_COST
    assert counts(gateway, "p1") == (0, 0)


def test_a_provider_without_a_limit_takes_every_call_at_once(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{}"), upstream)
    streams = streams_at_once(gateway, 20)
    until(lambda: vendor.open == 20, "20 streams open upstream")
    assert counts(gateway, "p1") == (20, 0)
    vendor.release.set()
    assert streams.result(timeout=60) == ["".join(WORDS)] * 20


# --- past the wait: 503 upstream_busy ---------------------------------------------------------


def test_past_the_wait_the_client_gets_503_upstream_busy_and_pays_nothing(start_gateway, upstream, vendor, caplog):
    caplog.set_level(logging.WARNING, logger="tollgate.upstream")
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 0.2}"), upstream)
    alice = gateway.client()
    held = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    until(lambda: counts(gateway, "p1") == (1, 0), "the held stream holds the one slot")

    busy = refused(lambda: alice.chat.completions.create(model="chat", messages=MESSAGES))
    assert (busy.status_code, busy.body["code"], busy.body["type"]) == (503, "upstream_busy", "api_error")  # type: ignore[index]
    assert busy.body["message"] == (  # type: ignore[index]
        "Provider 'p1' is at its max_connections of 1 and no call to it ended within the 0.2s wait (max_connections_wait)."
    )
    with pytest.raises(anthropic.APIStatusError) as on_messages:
        anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0).messages.create(model="chat", max_tokens=16, messages=MESSAGES)
    assert on_messages.value.status_code == 503
    assert on_messages.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": busy.body["message"]}}  # type: ignore[index]
    assert vendor.calls == 1  # the refused requests never reached it

    vendor.release.set()
    assert streamed_text(held) == "".join(WORDS)
    until(lambda: counts(gateway, "p1") == (0, 0), "the slot is free again")
    state = key_state(gateway)  # the two refused are recorded at $0, as any failed request
    assert (state["request_count"], Decimal(str(state["total_cost"]))) == (3, STREAM_COST)
    assert Decimal(str(state["remaining_credits"])) == 10 - STREAM_COST
    reached = [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()]
    assert reached == ["provider 'p1' reached max_connections 1: requests wait for a slot up to 0.2s (max_connections_wait), then 503 upstream_busy"]


def test_a_zero_wait_refuses_at_once_when_the_provider_is_full(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 0}"), upstream)
    alice = gateway.client()
    held = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    busy = refused(lambda: alice.chat.completions.create(model="chat", messages=MESSAGES))
    assert (busy.status_code, busy.body["code"]) == (503, "upstream_busy")  # type: ignore[index]
    vendor.release.set()
    held.close()


# --- failover ---------------------------------------------------------------------------------


def test_a_busy_provider_passes_the_request_to_the_next_without_cooling_down(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 0.1}", p2="{}"), upstream)
    alice = gateway.client()
    held = alice.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, stream=True)
    assert held.headers["x-tollgate-provider"] == "p1"  # fixed_priority: p1 first

    moved = alice.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert moved.headers["x-tollgate-provider"] == "p2"
    assert moved.parse().choices[0].message.content == "Hello from upstream"

    vendor.release.set()
    assert streamed_text(held.parse()) == "".join(WORDS)
    until(lambda: counts(gateway, "p1") == (0, 0), "p1's slot is free again")
    providers = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY).json()["providers"]
    assert [(p["provider"], p["status"], p["cooling_down_models"]) for p in providers] == [("p1", "ok", []), ("p2", "ok", [])]
    # A cooled-down p1 would come last in the order: the next request goes to p1 again.
    again = alice.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert again.headers["x-tollgate-provider"] == "p1"


def test_when_every_provider_is_busy_the_client_gets_503_upstream_busy(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 0}", p2="{max_connections: 1, max_connections_wait: 0}"), upstream)
    alice = gateway.client()
    held = [alice.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, stream=True) for _ in range(2)]
    assert [h.headers["x-tollgate-provider"] for h in held] == ["p1", "p2"]
    busy = refused(lambda: alice.chat.completions.create(model="chat", messages=MESSAGES))
    assert (busy.status_code, busy.body["code"]) == (503, "upstream_busy")  # type: ignore[index]
    assert "Provider 'p2'" in busy.body["message"]  # type: ignore[index]  # the last one tried
    vendor.release.set()
    for stream in held:
        assert streamed_text(stream.parse()) == "".join(WORDS)


# --- clients that leave -----------------------------------------------------------------------


def raw_request(gateway: RunningGateway, body: dict[str, Any]) -> socket.socket:
    """A chat request sent over a socket the test can close at any moment (a client hanging up)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {USER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", gateway.server.port))
    sock.sendall(head.encode() + payload)
    return sock


def test_clients_that_leave_mid_stream_or_while_waiting_free_their_places(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 2, max_connections_wait: 60}"), upstream)
    alice = gateway.client()
    first = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    second = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    waiter = raw_request(gateway, {"model": "chat", "messages": MESSAGES, "stream": True})
    until(lambda: counts(gateway, "p1") == (2, 1), "two streams open, one request waiting")

    waiter.close()  # hangs up while queued: it leaves the queue
    until(lambda: counts(gateway, "p1") == (2, 0), "the waiter left the queue")
    second.close()  # hangs up mid-stream: its slot is freed
    until(lambda: counts(gateway, "p1") == (1, 0), "the cut stream freed its slot")
    assert vendor.calls == 2  # the waiter never reached the vendor

    # Still max_connections (2) at once, and no more: one new stream gets in, the next waits.
    third = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert counts(gateway, "p1") == (2, 0)
    fourth = streams_at_once(gateway, 1)
    until(lambda: counts(gateway, "p1") == (2, 1), "the fourth waits for a slot")
    vendor.release.set()
    assert fourth.result(timeout=30) == ["".join(WORDS)]
    assert streamed_text(first) == streamed_text(third) == "".join(WORDS)
    until(lambda: counts(gateway, "p1") == (0, 0), "every slot free")

    metrics = scrape_when_idle(gateway)
    assert metrics.series("tollgate_upstream_waits_total", "provider", "result") == {("p1", "left"): 1, ("p1", "served"): 1}
    assert metrics.series("tollgate_requests_total", "endpoint", "model", "provider", "status_code")[("chat/completions", "chat", "", "499")] == 1


# --- reloads ------------------------------------------------------------------------------------


def test_a_reload_that_raises_or_removes_the_limit_lets_the_waiting_in(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 60}"), upstream)
    alice = gateway.client()
    held = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    waiting = streams_at_once(gateway, 2)
    until(lambda: counts(gateway, "p1") == (1, 2), "one stream open, two waiting")

    text = gateway.config_path.read_text()
    gateway.rewrite_config(text.replace("max_connections: 1,", "max_connections: 4,"))
    until(lambda: counts(gateway, "p1") == (3, 0) and vendor.open == 3, "the reload alone let the two waiting in")
    raised = streams_at_once(gateway, 1)
    until(lambda: counts(gateway, "p1") == (4, 0) and vendor.open == 4, "four streams open: the limit raised to 4")

    more = streams_at_once(gateway, 1)
    until(lambda: counts(gateway, "p1") == (4, 1), "a fifth waits at the raised limit")
    gateway.rewrite_config(text.replace("max_connections: 1, max_connections_wait: 60", ""))
    until(lambda: counts(gateway, "p1") == (5, 0) and vendor.open == 5, "the reload alone let the fifth in: no limit")
    unlimited = streams_at_once(gateway, 1)
    until(lambda: counts(gateway, "p1") == (6, 0) and vendor.open == 6, "no limit: six streams open")

    vendor.release.set()
    for streams in (waiting, raised, more, unlimited):
        assert set(streams.result(timeout=30)) == {"".join(WORDS)}
    assert streamed_text(held) == "".join(WORDS)
    until(lambda: counts(gateway, "p1") == (0, 0), "every slot free")


def test_a_reload_that_lowers_the_limit_applies_to_new_requests_as_the_calls_in_flight_end(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 3, max_connections_wait: 60}"), upstream)
    streams = streams_at_once(gateway, 3)
    until(lambda: counts(gateway, "p1") == (3, 0), "three streams open")
    text = gateway.config_path.read_text()
    gateway.rewrite_config(text.replace("max_connections: 3,", "max_connections: 1,"))
    later = streams_at_once(gateway, 1)
    until(lambda: counts(gateway, "p1") == (3, 1), "the calls in flight count against the lowered limit")
    vendor.release.set()
    assert streams.result(timeout=30) == ["".join(WORDS)] * 3
    assert later.result(timeout=30) == ["".join(WORDS)]


# --- metrics ------------------------------------------------------------------------------------


def test_waits_and_busy_attempts_are_counted_in_metrics(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 60}", p2="{max_connections: 1, max_connections_wait: 0}"), upstream)
    alice = gateway.client()
    held = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)  # p1's slot
    waiting = in_background(lambda: gateway.async_client().chat.completions.create(model="p1/chat", messages=MESSAGES))
    until(lambda: counts(gateway, "p1") == (1, 1), "one request waiting for p1")
    held_too = alice.chat.completions.create(model="p2/chat", messages=MESSAGES, stream=True)  # p2's slot
    assert refused(lambda: alice.chat.completions.create(model="p2/chat", messages=MESSAGES)).status_code == 503
    vendor.release.set()
    assert waiting.result(timeout=30).choices[0].message.content == "Hello from upstream"
    assert streamed_text(held) == streamed_text(held_too) == "".join(WORDS)

    metrics = scrape_when_idle(gateway)
    assert metrics.series("tollgate_upstream_waits_total", "provider", "result") == {("p1", "served"): 1, ("p2", "busy"): 1}
    assert metrics.series("tollgate_upstream_requests_total", "provider", "model", "outcome") == {
        ("p1", "chat", "ok"): 2,
        ("p2", "chat", "ok"): 1,
        ("p2", "chat", "busy"): 1,
    }
    assert metrics.series("tollgate_requests_total", "endpoint", "model", "provider", "status_code")[("chat/completions", "chat", "", "503")] == 1


def test_the_providers_api_and_page_show_a_full_provider_its_connections_and_busy_calls(start_gateway, upstream, vendor):
    gateway = start_gateway(config("{max_connections: 2, max_connections_wait: 60}", p2="{max_connections: 1, max_connections_wait: 0}"), upstream)
    alice = gateway.client()
    held = [alice.chat.completions.create(model="p1/chat", messages=MESSAGES, stream=True) for _ in range(2)]
    waiting = in_background(lambda: gateway.async_client().chat.completions.create(model="p1/chat", messages=MESSAGES))
    until(lambda: counts(gateway, "p1") == (2, 1), "p1 full, one request waiting")
    held.append(alice.chat.completions.create(model="p2/chat", messages=MESSAGES, stream=True))
    assert refused(lambda: alice.chat.completions.create(model="p2/chat", messages=MESSAGES)).status_code == 503  # busy

    providers = {p["provider"]: p for p in gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY).json()["providers"]}
    assert providers["p1"]["status"] == providers["p2"]["status"] == "at_max_connections"
    assert providers["p1"]["connections"] == {"in_flight": 2, "max_connections": 2, "waiting": 1}
    assert providers["p2"]["connections"] == {"in_flight": 1, "max_connections": 1, "waiting": 0}
    past = gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY, params={"month": "2020-01"}).json()["providers"]
    assert {p["status"] for p in past} == {"ok"}  # a past month's status is not today's
    browser = Browser(gateway.url)
    browser.login(ADMIN_KEY)
    page = browser.get("/admin/providers").text
    p1, p2 = (page.split(f'<tr data-provider="{name}">')[1].split("</tr>")[0] for name in ("p1", "p2"))
    assert "status at_max_connections" in p1 and "2 of 2 connections, 1 waiting" in p1
    assert '<span class="busy">1</span>' in p2 and "1 of 1 connections<" in p2

    vendor.release.set()
    assert waiting.result(timeout=30).choices[0].message.content == "Hello from upstream"
    assert all(streamed_text(stream) == "".join(WORDS) for stream in held)
    until(lambda: counts(gateway, "p1") == (0, 0), "p1's calls ended")
    providers = {p["provider"]: p for p in gateway.http("GET", "/v1/providers_states", key=ADMIN_KEY).json()["providers"]}
    assert providers["p1"]["status"] == "ok" and providers["p1"]["connections"] == {"in_flight": 0, "max_connections": 2, "waiting": 0}


# --- count_tokens -------------------------------------------------------------------------------


def test_count_tokens_calls_hold_a_slot_and_a_busy_provider_is_counted_by_estimate(start_gateway, upstream):
    release = threading.Event()
    counted: list[int] = []

    async def anthropic_counts(body: dict[str, Any], request: Request) -> Response:
        counted.append(1)
        while not release.is_set():
            await asyncio.sleep(0.01)
        return JSONResponse({"input_tokens": 4242})

    upstream.script("p1", anthropic_counts)
    text = config("{max_connections: 1, max_connections_wait: 0}").replace("api: sk-vendor-one", "api: sk-vendor-one\n    engine: anthropic")
    gateway = start_gateway(text, upstream)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    first = in_background(
        lambda: anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0).messages.count_tokens(model="chat", messages=MESSAGES)
    )
    until(lambda: counts(gateway, "p1") == (1, 0) and len(counted) == 1, "the first count holds p1's slot")
    estimate = client.messages.count_tokens(model="chat", messages=MESSAGES).input_tokens
    assert 0 < estimate != 4242 and len(counted) == 1  # p1 was full: the gateway's estimate, no second call
    release.set()
    assert first.result(timeout=30).input_tokens == 4242
    until(lambda: counts(gateway, "p1") == (0, 0), "the slot is free again")


def test_stored_response_calls_hold_a_slot_too(start_gateway, upstream, vendor):
    stored = ResponsesVendor()

    async def chat_or_responses(body: dict[str, Any], request: Request) -> Response:
        return await (vendor if request.url.path.endswith("/chat/completions") else stored)(body, request)

    upstream.script("p1", chat_or_responses)
    gateway = start_gateway(config("{max_connections: 1, max_connections_wait: 0}"), upstream)
    alice = gateway.client()
    made = alice.responses.create(model="chat", input="hi")
    held = alice.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    busy = refused(lambda: alice.responses.retrieve(made.id))
    assert (busy.status_code, busy.body["code"]) == (503, "upstream_busy")  # type: ignore[index]
    vendor.release.set()
    assert streamed_text(held) == "".join(WORDS)
    until(lambda: counts(gateway, "p1") == (0, 0), "the slot is free again")
    assert alice.responses.retrieve(made.id).id == made.id


# --- the gate on its own: FIFO, cancellation, the log line ------------------------------------


def provider(limit: int | None, wait: float = 10.0) -> Provider:
    return Provider("p1", "openai", "http://vendor", ("k",), {}, 1, max_connections=limit, max_connections_wait=wait)


def test_a_freed_slot_goes_to_the_oldest_waiter():
    async def scenario() -> list[int]:
        gate = UpstreamGate(asyncio.get_running_loop())
        lane, limited = gate["p1"], provider(1)
        assert lane.take(1)
        served: list[int] = []

        async def request(number: int) -> None:
            await lane.wait(limited, None)
            served.append(number)

        waiters = [asyncio.create_task(request(n)) for n in range(3)]
        await asyncio.sleep(0)
        assert not lane.take(1)  # a newcomer may not pass those queued
        for _ in range(3):
            lane.leave()
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert (lane.in_flight, lane.waiting) == (1, 0)
        return served

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_the_slot_on():
    async def scenario() -> tuple[int, int]:
        lane = UpstreamGate(asyncio.get_running_loop())["p1"]
        limited = provider(1)
        assert lane.take(1)
        first = asyncio.create_task(lane.wait(limited, None))
        second = asyncio.create_task(lane.wait(limited, None))
        await asyncio.sleep(0)
        lane.leave()  # the slot is handed to `first`...
        first.cancel()  # ...which is cancelled before it runs again: `second` gets the slot
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        return lane.in_flight, lane.waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_a_waiter_whose_client_hangs_up_leaves_the_queue():
    async def scenario() -> tuple[int, int]:
        lane = UpstreamGate(asyncio.get_running_loop())["p1"]
        assert lane.take(1)
        hung_up = asyncio.Event()

        async def client() -> dict[str, Any]:
            await hung_up.wait()
            return {"type": "http.disconnect"}

        waiting = asyncio.create_task(lane.wait(provider(1), client))
        await asyncio.sleep(0)
        assert lane.waiting == 1
        hung_up.set()
        with pytest.raises(ClientLeft):
            await waiting
        return lane.in_flight, lane.waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_the_minutes_log_line_gives_exact_numbers_and_a_quiet_minute_ends_them(caplog):
    caplog.set_level(logging.WARNING, logger="tollgate.upstream")

    async def scenario() -> Lane:
        lane = UpstreamGate(asyncio.get_running_loop())["p1"]
        assert lane.take(2) and lane.take(2)
        with pytest.raises(UpstreamBusy):
            await lane.wait(provider(2, wait=0), None)
        waiting = [asyncio.create_task(lane.wait(provider(2), None)) for _ in range(3)]
        await asyncio.sleep(0)
        lane.leave()
        lane.leave()
        await asyncio.gather(*waiting[:2])
        lane.report()  # what the timer calls after REPORT_EVERY seconds
        lane.leave()
        lane.leave()
        await waiting[2]
        lane.report()
        lane.leave()
        lane.report()  # a quiet minute: no line, and the reports stop
        return lane

    lane = asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "provider 'p1' reached max_connections 2: requests wait for a slot up to 0s (max_connections_wait), then 503 upstream_busy",
        "provider 'p1' is at max_connections 2; in the last minute: 2 waited and got a slot, 1 refused with 503 upstream_busy; 1 waiting now",
        "provider 'p1' is at max_connections 2; in the last minute: 1 waited and got a slot, 0 refused with 503 upstream_busy; 0 waiting now",
    ]
    assert REPORT_EVERY == 60 and lane.in_flight == 0


# --- config -------------------------------------------------------------------------------------

PROVIDER_YAML = """\
providers:
  - provider: p1
    engine: echo
    model: [m]
    preferences:
      {line}
preferences:
  model_price: {{default: 0}}
"""


def test_the_limit_is_absent_by_default_and_read_when_set():
    default = build_config(PROVIDER_YAML.format(line="weight: 1"), "api.yaml").providers[0]
    assert (default.max_connections, default.max_connections_wait) == (None, 10.0)
    limited = build_config(PROVIDER_YAML.format(line="{max_connections: 8, max_connections_wait: 2.5}"), "api.yaml").providers[0]
    assert (limited.max_connections, limited.max_connections_wait) == (8, 2.5)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("max_connections: 0", "providers[0].preferences.max_connections must be >= 1, got 0"),
        ("max_connections: -1", "providers[0].preferences.max_connections must be >= 1, got -1"),
        ("max_connections: x", "providers[0].preferences.max_connections must be a number, got 'x'"),
        ("max_connections: 2.5", "providers[0].preferences.max_connections must be a whole number, got 2.5"),
        ("max_connections: true", "providers[0].preferences.max_connections must be a number, got a boolean"),
        ("max_connections_wait: -1", "providers[0].preferences.max_connections_wait must be >= 0, got -1"),
        ("max_connections_wait: soon", "providers[0].preferences.max_connections_wait must be a number, got 'soon'"),
    ],
)
def test_a_bad_limit_or_wait_is_refused_at_its_line_and_column(line, reason):
    with pytest.raises(ConfigError) as caught:
        build_config(PROVIDER_YAML.format(line=line), "api.yaml")
    assert (caught.value.line, caught.value.column, caught.value.reason) == (6, 7, reason), str(caught.value)


def test_a_wait_without_a_limit_loads_with_a_warning():
    loaded = build_config(PROVIDER_YAML.format(line="max_connections_wait: 5"), "api.yaml")
    assert [str(w) for w in loaded.warnings] == [
        "api.yaml:6:7: providers[0].preferences.max_connections_wait has no effect without max_connections (no limit, nobody waits)"
    ]
