"""Per-key limits end to end: the real gateway, the openai SDK, an injected clock."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest
from starlette.requests import Request
from starlette.responses import Response

from test.conftest import ADMIN_KEY
from test.servers import held_stream, openai_like

KEY = "sk-limited-0001"
MESSAGES = [{"role": "user", "content": "hello there"}]  # echo: 10 prompt + 5 completion tokens


class FakeClock:
    """The gateway's clock, moved by the test instead of sleeping."""

    def __init__(self, start: float):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


# A Wednesday, 10:30:20 UTC.
T0 = datetime(2026, 3, 4, 10, 30, 20, tzinfo=ZoneInfo("UTC")).timestamp()


def config(prefs: str, extra: str = "", provider: str = "  - provider: echo\n    engine: echo\n    model: [echo-1]\n") -> str:
    return (
        f"providers:\n{provider}"
        f"api_keys:\n  - api: {ADMIN_KEY}\n    role: admin\n"
        f"  - api: {KEY}\n    name: limited\n    preferences: {{{prefs}}}\n"
        f"preferences:\n  model_price: {{default: '1000,2000'}}\n{extra}"
    )


def start(start_gateway, prefs: str, extra: str = "", clock_at: float = T0, **kwargs: Any):
    clock = FakeClock(clock_at)
    gateway = start_gateway(config(prefs, extra, **kwargs), clock=clock)
    return gateway, clock


def call(gateway, **kwargs):
    return gateway.client(KEY).chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, **kwargs)


def error_of(gateway, **kwargs) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call(gateway, **kwargs)
    return caught.value


def test_request_rate_limit_refuses_then_recovers_when_the_window_passes(start_gateway):
    gateway, clock = start(start_gateway, "rate_limit: '3/min,100/day'")
    first = call(gateway)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"] == "40s"
    call(gateway)
    call(gateway)
    error = error_of(gateway)
    assert error.status_code == 429 and error.body["code"] == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "40"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(40)  # the next minute
    assert call(gateway).headers["x-ratelimit-remaining-requests"] == "2"


def test_a_monthly_rate_limit_refuses_the_third_call_until_its_30_day_window_ends(start_gateway):
    gateway, clock = start(start_gateway, "rate_limit: '2/month'")
    call(gateway)
    call(gateway)
    error = error_of(gateway)
    month = 30 * 86400  # uni-api's month; windows are fixed, aligned to the epoch like the others
    left = month - T0 % month
    assert error.status_code == 429 and error.body["code"] == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == str(int(left))
    assert "2/month" in error.body["message"]
    clock.advance(left)
    assert call(gateway).headers["x-ratelimit-remaining-requests"] == "1"


def test_token_rate_limit_counts_actual_tokens(start_gateway):
    gateway, clock = start(start_gateway, "token_rate_limit: '40/min'")
    call(gateway, max_tokens=5)  # reserves 10 + 5, uses 15
    call(gateway, max_tokens=5)
    response = call(gateway, max_tokens=5)
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"  # 45 of 40 used
    assert error_of(gateway, max_tokens=5).body["code"] == "rate_limit_exceeded"
    clock.advance(60)
    assert call(gateway, max_tokens=5).headers["x-ratelimit-limit-tokens"] == "40"


def test_concurrency_limit_counts_requests_in_flight(start_gateway, upstream):
    release = threading.Event()
    upstream.script("p1", held_stream(release, ["a", "b"]))
    provider = "  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [echo-1]\n"
    clock = FakeClock(T0)
    gateway = start_gateway(config("concurrency_limit: 2", provider=provider), upstream, clock=clock)
    client = gateway.client(KEY)
    streams = [client.chat.completions.create(model="echo-1", messages=MESSAGES, stream=True) for _ in range(2)]
    for stream in streams:
        next(iter(stream))
    error = error_of(gateway)
    assert error.status_code == 429 and error.body["code"] == "concurrency_limit_exceeded"
    streams[0].close()  # a client disconnect frees its slot
    release.set()
    list(streams[1])  # a finished stream frees its slot
    upstream.script("p1", openai_like)
    assert call(gateway).status_code == 200
    assert call(gateway).status_code == 200


def test_a_charge_that_fails_midway_still_frees_the_requests_holds(start_gateway):
    # Fault injection into the running app: the ledger's write queue is full, so settling
    # raises after the charge began. The request fails (500), but its concurrency slot and
    # rate-limit reservations must not stay held for ever.
    gateway, _ = start(start_gateway, "concurrency_limit: 1, token_rate_limit: '100/min'")
    ledger = gateway.server.app.state.ledger

    async def jam() -> asyncio.Queue[Any]:
        full: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        full.put_nowait(None)
        queue, ledger._queue = ledger._queue, full
        return queue

    async def unjam(queue: asyncio.Queue[Any]) -> None:
        ledger._queue = queue

    queue = gateway.server.call(jam())
    try:
        assert error_of(gateway, max_tokens=5).status_code == 500
    finally:
        gateway.server.call(unjam(queue))
    response = call(gateway, max_tokens=5)  # the slot is free again
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == "85", "nothing of the failed request still reserved"


def test_fifty_concurrent_requests_against_a_limit_of_ten_admit_exactly_ten(start_gateway):
    gateway, _ = start(start_gateway, "rate_limit: '10/day'")

    results = gateway.fire(KEY, 50, model="echo-1", messages=MESSAGES)
    assert results.count(200) == 10 and results.count(429) == 40


def test_concurrent_requests_never_exceed_a_concurrency_limit(start_gateway, upstream):
    async def slow(body: dict[str, Any], request: Request) -> Response:
        await asyncio.sleep(0.3)
        return await openai_like(body, request)

    upstream.script("p1", slow)
    provider = "  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [echo-1]\n"
    gateway = start_gateway(config("concurrency_limit: 5", provider=provider), upstream, clock=FakeClock(T0))

    results = gateway.fire(KEY, 30, model="echo-1", messages=MESSAGES)
    assert results.count(200) == 5 and results.count(429) == 25


def test_token_quota_stops_the_key_and_reports_use(start_gateway):
    gateway, _ = start(start_gateway, "quota: 30, quota_type: tokens")
    first = call(gateway)
    assert (first.headers["x-quota-used"], first.headers["x-quota-limit"]) == ("15", "30")
    call(gateway)
    error = error_of(gateway)
    assert error.status_code == 402
    assert error.body["type"] == "insufficient_quota" and error.body["code"] == "API_KEY_QUOTA_EXHAUSTED"
    assert error.response.headers["x-quota-used"] == "30"
    assert error.body["message"] == "This API key has used its quota (30 of 30 tokens)."


def test_raising_the_quota_on_reload_unblocks_the_key_and_lowering_blocks_it(start_gateway):
    gateway, _ = start(start_gateway, "quota: 15")
    call(gateway)
    assert error_of(gateway).body["code"] == "API_KEY_QUOTA_EXHAUSTED"
    gateway.rewrite_config(config("quota: 100"))
    assert call(gateway).headers["x-quota-limit"] == "100"
    gateway.rewrite_config(config("quota: 20"))  # used 30 > 20: blocked again
    assert error_of(gateway).body["code"] == "API_KEY_QUOTA_EXHAUSTED"


def test_usd_quota(start_gateway):
    # Each echo request costs 10*1000/1M + 5*2000/1M = 0.02 USD.
    gateway, _ = start(start_gateway, "quota: 0.03, quota_type: usd")
    assert call(gateway).headers["x-quota-used"] == "0.02"
    call(gateway)
    error = error_of(gateway)
    assert error.body["code"] == "API_KEY_QUOTA_EXHAUSTED"
    assert error.body["message"] == "This API key has used its quota ($0.04 of $0.03)."  # the pages' money format


def test_concurrent_requests_against_a_quota_are_bounded(start_gateway):
    gateway, _ = start(start_gateway, "quota: 150")  # 15 tokens per request, reserved 15 each with max_tokens=5

    results = gateway.fire(KEY, 50, model="echo-1", messages=MESSAGES, max_tokens=5)
    assert results.count(200) == 10 and results.count(402) == 40


def test_daily_cost_limit_resets_at_local_midnight(start_gateway):
    # 23:50 on Tuesday in Shanghai (UTC+8) is 15:50 UTC.
    tuesday_night = datetime(2026, 3, 3, 23, 50, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    gateway, clock = start(start_gateway, "daily_cost_limit: 0.03, timezone: Asia/Shanghai", clock_at=tuesday_night)
    call(gateway)
    call(gateway)  # 0.04 spent >= 0.03
    error = error_of(gateway)
    assert error.status_code == 402 and error.body["code"] == "daily_cost_limit_exceeded"
    assert error.body["message"] == "This API key reached its daily limit of $0.03; it resets at 2026-03-04T00:00:00+08:00."
    clock.advance(11 * 60)  # 00:01 local: a new day, though still the same UTC day
    assert call(gateway).status_code == 200


def test_limit_messages_show_money_as_the_pages_do(start_gateway):
    gateway, _ = start(start_gateway, "budget: 0.1, budget_period: monthly, quota: 0.05, quota_type: usd")
    for _ in range(3):
        call(gateway)
    assert error_of(gateway).body["message"] == "This API key has used its quota ($0.06 of $0.05)."
    gateway.rewrite_config(config("budget: 0.1, budget_period: monthly"))
    call(gateway)
    call(gateway)
    assert error_of(gateway).body["message"].startswith("This API key reached its monthly limit of $0.10; it resets at ")


def test_monthly_budget_and_weekly_limit(start_gateway):
    gateway, clock = start(start_gateway, "budget: 0.02, budget_period: monthly, weekly_cost_limit: 1")
    call(gateway)
    assert error_of(gateway).body["code"] == "budget_exceeded"
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    assert call(gateway).status_code == 200


def test_budget_period_spend_survives_a_restart(start_gateway):
    gateway, clock = start(start_gateway, "daily_cost_limit: 0.05")
    call(gateway)
    call(gateway)
    gateway.server.stop()
    again = start_gateway(gateway.config_path.read_text(), clock=clock)
    again.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES)  # 0.06 now
    with pytest.raises(openai.APIStatusError) as caught:
        again.client(KEY).chat.completions.create(model="echo-1", messages=MESSAGES)
    assert caught.value.body["code"] == "daily_cost_limit_exceeded"


@pytest.mark.parametrize(
    ("prefs", "code"),
    [
        ("enabled: false", "key_disabled"),
        ("expires_at: '2026-03-04T10:00:00Z'", "key_expired"),
        ("allowed_ips: ['10.0.0.0/8', '2001:db8::/32']", "ip_not_allowed"),
        ("allowed_clients: ['my-app/*']", "client_not_allowed"),
    ],
)
def test_access_rules_refuse_with_403(start_gateway, prefs, code):
    gateway, _ = start(start_gateway, prefs)
    error = error_of(gateway)
    assert error.status_code == 403 and error.body["code"] == code
    assert gateway.http("GET", "/v1/models", key=KEY).status_code == 403


def test_expiry_follows_the_clock(start_gateway):
    gateway, clock = start(start_gateway, "expires_at: '2026-03-04T10:31:00Z'")
    assert call(gateway).status_code == 200
    clock.advance(60)
    assert error_of(gateway).body["code"] == "key_expired"


def test_allowed_ips_and_trusted_proxies(start_gateway):
    gateway, _ = start(start_gateway, "allowed_ips: ['127.0.0.1', '203.0.113.0/24']")
    assert call(gateway).status_code == 200  # the loopback peer itself
    spoofed = gateway.http("POST", "/v1/chat/completions", key=KEY, json={"model": "echo-1", "messages": MESSAGES}, headers={"X-Forwarded-For": "198.51.100.7"})
    assert spoofed.status_code == 200, "X-Forwarded-For is ignored when the peer is not a trusted proxy"
    gateway2, _ = start(start_gateway, "allowed_ips: ['203.0.113.0/24']", extra="  trusted_proxies: ['127.0.0.1']\n")
    body = {"model": "echo-1", "messages": MESSAGES}
    assert gateway2.http("POST", "/v1/chat/completions", key=KEY, json=body, headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    refused = gateway2.http("POST", "/v1/chat/completions", key=KEY, json=body, headers={"X-Forwarded-For": "198.51.100.7"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ip_not_allowed"


def test_allowed_clients_match_user_agent_patterns(start_gateway):
    gateway, _ = start(start_gateway, "allowed_clients: ['my-app/*', 'OpenAI/Python*']")
    assert call(gateway).status_code == 200  # the openai SDK's user agent
    other = gateway.http("GET", "/v1/models", key=KEY, headers={"User-Agent": "curl/8.0"})
    assert other.status_code == 403


@pytest.mark.parametrize(
    ("prefs", "reason"),
    [
        ("quota: -5", "quota must be >= 0"),
        ("rate_limit: '10/fortnight'", "must look like '60/min,1000/day'"),
        ("concurrency_limit: 0", "concurrency_limit must be >= 1"),
        ("timezone: Mars/Olympus", "not a known time zone"),
        ("allowed_ips: ['10.0.0.300']", "not an IP address or CIDR range"),
        ("budget: 5, budget_period: yearly", "must be one of daily, weekly, monthly"),
    ],
)
def test_limit_settings_are_validated(prefs, reason):
    from core.config import build_config
    from core.config.yamlsource import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config(config(prefs), "api.yaml")
    assert reason in caught.value.reason and caught.value.line == 10, str(caught.value)


def test_usage_reported_from_elsewhere_counts_toward_the_daily_budget(start_gateway):
    gateway, _ = start(start_gateway, "daily_cost_limit: 0.05")
    call(gateway)  # loads today's spend; a few cents below the limit
    report = {"api_key": KEY, "model": "echo-1", "prompt_tokens": 50_000}  # 50,000 x $1000/1M = $50
    assert gateway.http("POST", "/v1/usage/report", key=ADMIN_KEY, json=report).status_code == 200
    error = error_of(gateway)
    assert error.status_code == 402 and error.body["code"] == "daily_cost_limit_exceeded"


def test_a_budget_period_started_by_another_request_is_not_guessed(tmp_path):
    """Request A prepared today's spend; before it acquires, request B (a moment later, past
    midnight) starts loading the next period. A must not admit against an unknown spend."""
    from core.config import build_config
    from core.errors import GatewayError
    from core.ledger.sqlite import SqliteLedger
    from core.limits import Limiter, PeriodSpend

    key = next(k for k in build_config(config("daily_cost_limit: 0.05"), "api.yaml").keys if k.secret == KEY)

    async def scenario() -> GatewayError:
        ledger = await SqliteLedger.open(tmp_path / "l.db")
        try:
            limiter = Limiter(ledger, lambda: T0)
            account = await ledger.account(key.id, key.billing)
            await limiter.prepare(key, T0)
            today = limiter.state(key).periods["daily_cost_limit"]
            loading = asyncio.get_running_loop().create_future()
            limiter.state(key).periods["daily_cost_limit"] = PeriodSpend(today.end, today.end + 86400, ready=loading)
            with pytest.raises(GatewayError) as caught:
                limiter.acquire(key, account, 1000, 10, T0)
            loading.cancel()
            return caught.value
        finally:
            await ledger.close()

    error = asyncio.run(scenario())
    assert error.status == 503 and error.code == "budget_period_loading" and error.headers["Retry-After"] == "1"
