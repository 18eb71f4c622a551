"""What coding agents need of the gateway beyond plain requests, driven by the official SDKs
against strict fake vendors (test/agent_vendors.py): Anthropic betas passed on, count_tokens
at the vendor and free, Codex's Responses requests untouched, its WebSocket attempt refused
the way that makes it use HTTPS. (test_coding_agents.py runs the agents themselves.)"""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from typing import Any

import anthropic
import pytest
import websockets.exceptions
import websockets.sync.client
from starlette.responses import JSONResponse

from test.agent_vendors import CODEX_USAGE
from test.conftest import ADMIN_KEY, USER_KEY, clear_of_window_edge

CONFIG = """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: anthropic
    api: vendor-anthropic-key
    model: [claude-sonnet-5-5]
    preferences:
      headers: {Anthropic-Beta: 'prompt-caching-2024-07-31,context-management-2025-06-27'}
  - provider: p2
    base_url: {fake:p2}
    api: vendor-openai-key
    model: [gpt-5-codex]
  - provider: p3
    base_url: {fake:p3}
    api: vendor-openai-key
    model: [gpt-4o]
api_keys:
  - api: sk-admin-test-0001
    role: admin
  - api: sk-user-test-0002
    name: agent
    preferences: {credits: 10, rate_limit: 3/min}
preferences:
  model_price:
    claude-sonnet-5-5: {token_price: '3,15', cache_read_price: 0.3, cache_write_price: 3.75}
    gpt-5-codex: {token_price: '1.25,10', cache_read_price: 0.125}
    gpt-4o: {token_price: '2.5,10'}
"""
CLIENT_BETAS = "claude-code-20250219,context-management-2025-06-27,interleaved-thinking-2025-05-14"
CONTEXT_MANAGEMENT = {"edits": [{"type": "clear_tool_uses_20250919"}]}
HELLO = [{"role": "user", "content": "ping"}]


def sdk(gateway, betas: str | None = CLIENT_BETAS) -> anthropic.Anthropic:
    headers = {"anthropic-beta": betas} if betas else {}
    return anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0, default_headers=headers)


def ledger_costs(gateway) -> list[tuple[str, int]]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # the ledger has written what settled
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT model, cost_nanos FROM usage ORDER BY ts").fetchall()


def nanos(tokens: int, usd_per_million: str) -> int:
    return int(Decimal(tokens) * Decimal(usd_per_million) * 1000)


# Claude Code's call as the vendor bills it: 1,200 uncached input, 3,000 cache writes, 20,000
# cache reads, 90 output tokens, at $3 / $3.75 / $0.30 / $15 per million.
CLAUDE_CALL_NANOS = nanos(1200, "3") + nanos(3000, "3.75") + nanos(20000, "0.3") + nanos(90, "15")


@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_betas_reach_anthropic_merged_with_the_providers_and_beta_fields_pass(start_gateway, upstream, agent_vendors, stream):
    messages_vendor, _ = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    client = sdk(gateway)
    create = {"model": "claude-sonnet-5-5", "max_tokens": 8000, "messages": HELLO, "extra_body": {"context_management": CONTEXT_MANAGEMENT}}
    create["extra_query"] = {"beta": "true"}  # as Claude Code sends it: harmless
    if stream:
        with client.messages.stream(**create) as events:  # type: ignore[arg-type]
            text = events.get_final_text()
    else:
        text = client.messages.create(**create).content[0].text  # type: ignore[call-overload,union-attr]
    assert text == messages_vendor.reply and messages_vendor.refused == []
    seen = upstream.seen[-1]
    assert seen.headers["anthropic-beta"] == "prompt-caching-2024-07-31,context-management-2025-06-27,claude-code-20250219,interleaved-thinking-2025-05-14"
    assert seen.body["context_management"] == CONTEXT_MANAGEMENT
    assert ledger_costs(gateway) == [("claude-sonnet-5-5", CLAUDE_CALL_NANOS)]


def test_without_the_beta_header_the_vendors_refusal_comes_back_in_anthropics_shape(start_gateway, upstream, agent_vendors):
    messages_vendor, _ = agent_vendors
    config = CONFIG.replace("      headers: {Anthropic-Beta: 'prompt-caching-2024-07-31,context-management-2025-06-27'}\n", "      default_max_tokens: 100\n")
    gateway = start_gateway(config, upstream)
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(gateway, betas=None).messages.create(
            model="claude-sonnet-5-5", max_tokens=100, messages=HELLO, extra_body={"context_management": CONTEXT_MANAGEMENT}
        )
    assert refused.value.body["error"] == {"type": "invalid_request_error", "message": "context_management: Extra inputs are not permitted"}
    assert "anthropic-beta" not in upstream.seen[-1].headers
    assert messages_vendor.refused == ["context_management: Extra inputs are not permitted"]


def test_anthropic_betas_go_to_anthropic_providers_only(start_gateway, upstream, agent_vendors):
    gateway = start_gateway(CONFIG, upstream)
    reply = gateway.client(default_headers={"anthropic-beta": CLIENT_BETAS}).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert reply.choices[0].message.content
    assert "anthropic-beta" not in upstream.seen[-1].headers
    sdk(gateway).messages.create(model="gpt-4o", max_tokens=100, messages=HELLO)  # translated for an OpenAI-format vendor
    assert "anthropic-beta" not in upstream.seen[-1].headers


def test_count_tokens_is_anthropics_own_count_free_and_limited_like_any_request(start_gateway, upstream, agent_vendors):
    messages_vendor, _ = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    client = sdk(gateway)
    clear_of_window_edge(60)  # the four requests below must fall in one minute of the 3/min window
    body: dict[str, Any] = {"model": "claude-sonnet-5-5", "messages": HELLO, "system": "Be brief.", "extra_body": {"context_management": CONTEXT_MANAGEMENT}}
    assert client.messages.count_tokens(**body).input_tokens == messages_vendor.counted  # type: ignore[arg-type]
    seen = upstream.seen[-1]
    assert seen.path == "/p1/v1/messages/count_tokens" and seen.headers["x-api-key"] == "vendor-anthropic-key"
    assert "claude-code-20250219" in seen.headers["anthropic-beta"] and seen.body["context_management"] == CONTEXT_MANAGEMENT
    assert client.messages.count_tokens(model="gpt-4o", messages=HELLO).input_tokens > 0  # an OpenAI vendor: the estimate
    assert len(upstream.seen) == 1, "the estimate asks no vendor"
    raw = client.messages.with_raw_response.create(model="claude-sonnet-5-5", max_tokens=100, messages=HELLO)  # the third request of 3/min
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model="claude-sonnet-5-5", messages=HELLO)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert ledger_costs(gateway) == [("claude-sonnet-5-5", CLAUDE_CALL_NANOS)], "counting leaves no ledger row"
    assert Decimal(raw.headers["x-tollgate-credits-remaining"]) == Decimal(10) - Decimal(CLAUDE_CALL_NANOS) / 10**9, "the counts cost nothing"
    assert gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]["request_count"] == 1


def test_count_tokens_passes_on_the_vendors_refusal_and_falls_back_to_the_estimate_when_it_fails(start_gateway, upstream, agent_vendors):
    config = CONFIG.replace("      headers: {Anthropic-Beta: 'prompt-caching-2024-07-31,context-management-2025-06-27'}\n", "      default_max_tokens: 100\n")
    gateway = start_gateway(config, upstream)
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(gateway, betas=None).messages.count_tokens(model="claude-sonnet-5-5", messages=HELLO, extra_body={"context_management": CONTEXT_MANAGEMENT})
    assert refused.value.body["error"]["message"] == "context_management: Extra inputs are not permitted"

    async def overloaded(_body: dict[str, Any], _request: Any) -> Any:
        return JSONResponse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529)

    upstream.script("p1", overloaded)
    assert sdk(gateway).messages.count_tokens(model="claude-sonnet-5-5", messages=HELLO).input_tokens > 0


def test_codex_requests_pass_through_untouched_and_bill_cached_and_reasoning_tokens(start_gateway, upstream, agent_vendors):
    _, responses_vendor = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "additional_tools", "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}], "id": "at_1"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ping"}]},
    ]
    headers = {"x-openai-internal-codex-responses-lite": "true", "originator": "codex_exec", "session-id": "s1"}
    events = list(
        gateway.client(default_headers=headers).responses.create(
            model="gpt-5-codex",
            input=items,
            store=False,
            stream=True,
            extra_body={"prompt_cache_key": "s1"},  # type: ignore[arg-type]
        )
    )
    assert events[-1].type == "response.completed" and events[-1].response.output_text == responses_vendor.reply  # type: ignore[union-attr]
    seen = upstream.seen[-1]
    assert seen.body["input"] == items and seen.body["store"] is False and seen.body["prompt_cache_key"] == "s1"
    assert seen.headers["x-openai-internal-codex-responses-lite"] == "true" and seen.headers["authorization"] == "Bearer vendor-openai-key"
    assert "originator" not in seen.headers, "only OpenAI's own headers are passed on"
    cached = CODEX_USAGE["input_tokens_details"]["cached_tokens"]  # type: ignore[index]
    expected = nanos(CODEX_USAGE["input_tokens"] - cached, "1.25") + nanos(cached, "0.125") + nanos(CODEX_USAGE["output_tokens"], "10")  # type: ignore[operator]
    assert ledger_costs(gateway) == [("gpt-5-codex", expected)]


def test_a_websocket_on_responses_is_refused_with_426_so_codex_uses_https_at_once(start_gateway, upstream, agent_vendors):
    gateway = start_gateway(CONFIG, upstream)
    for path in ("/v1/responses", "/responses"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(f"ws://127.0.0.1:{gateway.server.port}{path}", additional_headers={"Authorization": f"Bearer {USER_KEY}"})
        assert refused.value.response.status_code == 426
        assert b'"code":"websocket_not_supported"' in refused.value.response.body


def test_count_tokens_is_refused_to_a_key_whose_balance_is_exhausted(start_gateway, upstream, agent_vendors):
    gateway = start_gateway(CONFIG.replace("credits: 10,", "credits: 0,"), upstream)
    with pytest.raises(anthropic.APIStatusError) as refused:
        sdk(gateway).messages.count_tokens(model="claude-sonnet-5-5", messages=HELLO)
    assert refused.value.status_code == 402
    assert refused.value.body["error"] == {
        "type": "billing_error",
        "message": "This API key's credit balance is exhausted ($0.00). Ask the operator to add credits.",
    }
    assert upstream.seen == []
