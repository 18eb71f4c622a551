"""Anthropic behind the OpenAI endpoint: request and response translation, streams, billing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.config import build_config
from core.providers.anthropic import from_anthropic, to_anthropic
from core.providers.base import UpstreamCall
from core.request_checks import reasoning_budget
from core.usage import estimate_prompt_tokens
from test.conftest import ADMIN_KEY, FREE, USER_KEY, keys_yaml
from test.servers import streamed_text

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MESSAGE = json.loads((FIXTURES / "anthropic_message.json").read_text())
STREAM = (FIXTURES / "anthropic_stream.txt").read_bytes()
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}},
    }
]

CONFIG = (
    """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: anthropic
    api: anthropic-secret
    model:
      - claude-3-5-sonnet-20241022: claude-sonnet
    preferences: {default_max_tokens: 1000}
"""
    + keys_yaml().replace("name: alice", "name: alice\n    preferences: {credits: 10}")
    + """
preferences:
  model_price:
    claude-sonnet: {token_price: '3,15', cache_read_price: 0.3, cache_write_price: 3.75}
"""
)
# 25 uncached x 3 + 1000 cache reads x 0.3 + 100 cache writes x 3.75 + 15 output x 15, per 1M tokens.
EXPECTED_COST_NANOS = 25 * 3 * 1000 + 300 * 1000 + 375 * 1000 + 225 * 1000


def route_call(body: dict[str, Any], stream: bool = False) -> UpstreamCall:
    config = build_config(
        "providers:\n  - provider: a\n    engine: anthropic\n    base_url: https://api.anthropic.com/v1\n    api: k\n    model: [claude-x]\n" + FREE, "api.yaml"
    )
    return UpstreamCall("chat/completions", body, stream, config.routes["claude-x"][0], "k")


def test_request_translation_covers_system_images_tools_and_results():
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0.2,
        "stop": "END",
    }  # fmt: skip
    out = to_anthropic(route_call(body))
    assert out["system"] == "Be brief."
    assert out["max_tokens"] == 4096 and out["temperature"] == 0.2 and out["stop_sequences"] == ["END"]
    assert out["tools"] == [{"name": "get_weather", "description": "Weather now", "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert out["tool_choice"] == {"type": "any"}
    user, assistant, results = out["messages"]
    assert user["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}}
    assert user["content"][2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    assert assistant["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
    ]
    assert results == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"}, {"type": "text", "text": "Thanks"}],
    }


def test_response_translation_maps_tools_stop_reason_and_cache_usage():
    message, finish_reason, usage = from_anthropic(MESSAGE)
    assert message["content"] == "Let me check the weather."
    assert message["tool_calls"] == [{"id": "toolu_01A", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]
    assert finish_reason == "tool_calls"
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.completion_tokens) == (1125, 1000, 100, 15)
    assert from_anthropic({"content": [], "stop_reason": "max_tokens", "unknown": 1})[1] == "length"


def ledger_rows(gateway) -> list[tuple]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT status, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cost_nanos FROM usage").fetchall()


def wait_for_ledger_rows(gateway) -> list[tuple]:
    """`ledger_rows` once there are any: an abandoned stream settles when the gateway notices."""
    deadline = time.monotonic() + 10
    while not (rows := ledger_rows(gateway)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def test_non_stream_end_to_end_is_translated_and_billed_with_cache_prices(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(MESSAGE)

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS
    )
    reply = raw.parse()
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.usage.prompt_tokens == 1125 and reply.usage.prompt_tokens_details.cached_tokens == 1000
    seen = upstream.seen[-1]
    assert seen.path == "/p1/v1/messages"
    assert seen.headers["x-api-key"] == "anthropic-secret" and seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body["model"] == "claude-3-5-sonnet-20241022" and seen.body["max_tokens"] == 1000
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]
    assert raw.headers["x-tollgate-cost"] == "0.000975"


def test_stream_end_to_end_is_translated_and_billed(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        assert body["stream"] is True

        async def gen():  # type: ignore[no-untyped-def]
            for part in STREAM.split(b"\n\n"):
                yield part + b"\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(
        gateway.client().chat.completions.create(
            model="claude-sonnet", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
    )
    text = streamed_text(chunks)
    arguments = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [])
    assert text == "Let me check the weather."
    assert json.loads(arguments) == {"location": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.prompt_tokens == 1125 and chunks[-1].usage.completion_tokens == 15
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


def test_truncated_stream_gives_a_clean_error_and_bills_the_partial_usage(start_gateway, upstream):
    cut = STREAM.split(b"event: content_block_stop")[0]  # message_start and some text, then the connection ends

    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield cut

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in gateway.client().chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Weather?"}], stream=True):
            received.append(chunk.choices[0].delta.content)
    assert "before message_stop" in str(caught.value.message)
    assert "".join(r or "" for r in received) == "Let me check the weather."
    ((status, prompt, completion, cached, written, cost),) = ledger_rows(gateway)
    assert (status, prompt, cached, written) == ("error", 1125, 1000, 100)
    assert completion >= 6 and cost > 0  # 25 bytes of text streamed: estimated


def test_body_overrides_reach_the_anthropic_body_and_billing_still_reads_its_usage(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(MESSAGE)

    upstream.script("p1", anthropic)
    overrides = """    preferences:
      default_max_tokens: 1000
      post_body_parameter_overrides:
        metadata: {user_id: tenant-1}
        __remove__: top_p
        claude-sonnet:
          __remove__: [temperature]
          thinking: {type: enabled, budget_tokens: 2000}
"""
    gateway = start_gateway(CONFIG.replace("    preferences: {default_max_tokens: 1000}\n", overrides), upstream)
    gateway.client().chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Hi"}], temperature=0.5, top_p=0.9)
    seen = upstream.seen[-1].body
    assert seen["metadata"] == {"user_id": "tenant-1"} and seen["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert "temperature" not in seen and "top_p" not in seen
    assert seen["model"] == "claude-3-5-sonnet-20241022" and seen["max_tokens"] == 1000 and seen["messages"][0]["role"] == "user"
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


def test_anthropic_errors_come_back_openai_shaped(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: text content blocks must be non-empty"}}, status_code=400
        )

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["message"] == "messages: text content blocks must be non-empty"
    assert caught.value.body["type"] == "invalid_request_error"
    assert ledger_rows(gateway) == [("error", 0, 0, 0, 0, 0)]


def test_embeddings_are_not_sent_to_anthropic(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/v1/embeddings", key=USER_KEY, json={"model": "claude-sonnet", "input": "x"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "endpoint_not_supported"
    assert upstream.seen == []


def test_an_answer_without_usage_is_estimated_from_its_text(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse({**MESSAGE, "content": [{"type": "text", "text": "word " * 80}], "usage": None})  # 400 bytes: 100 tokens

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    request = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Talk."}]}
    reply = gateway.client().chat.completions.create(**request)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (estimate_prompt_tokens(request), 100)
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 100)


def test_the_larger_of_both_output_limits_is_sent_as_billing_reserves_it():
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "max_completion_tokens": 200}
    assert to_anthropic(route_call(body))["max_tokens"] == 300
    assert to_anthropic(route_call({**body, "max_tokens": None}))["max_tokens"] == 200


# --- reasoning_effort: extended thinking ---------------------------------------------------------


async def _json(body: Any) -> Response:
    return JSONResponse(body)


THINKING_MESSAGE = {
    **MESSAGE,
    "content": [
        {"type": "thinking", "thinking": "Paris is in France.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Sunny."},
    ],
    "stop_reason": "end_turn",
}


def thinking_stream() -> bytes:
    def event(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    start = STREAM.split(b"\n\n")[0] + b"\n\n"  # message_start: 1,125 prompt tokens
    return b"".join(
        [
            start,
            event("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Paris is"}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": " in France."}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
            event("content_block_stop", {"index": 0}),
            event("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
            event("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "Sunny."}}),
            event("content_block_stop", {"index": 1}),
            event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}),
            event("message_stop", {}),
        ]
    )


def test_reasoning_effort_is_a_thinking_budget_below_the_client_limit():
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "Think."}], "reasoning_effort": "low", "max_tokens": 3000}
    out = to_anthropic(route_call(body))
    assert (out["max_tokens"], out["thinking"]) == (3000, {"type": "enabled", "budget_tokens": 1024})
    out = to_anthropic(route_call({**body, "reasoning_effort": "high"}))  # 24,576 capped below the limit the client set
    assert (out["max_tokens"], out["thinking"]) == (3000, {"type": "enabled", "budget_tokens": 2999})
    assert "thinking" not in to_anthropic(route_call({**body, "reasoning_effort": "none"}))


def test_reasoning_effort_without_a_limit_raises_max_tokens_by_the_budget_as_admission_reserves_it():
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "Think."}], "reasoning_effort": "medium"}
    out = to_anthropic(route_call(body))
    assert (out["max_tokens"], out["thinking"]) == (4096 + 8192, {"type": "enabled", "budget_tokens": 8192})
    assert reasoning_budget("chat/completions", body) == 8192 and reasoning_budget("responses", {"reasoning": {"effort": "medium"}}) == 8192
    assert reasoning_budget("chat/completions", {"reasoning_effort": ["odd"]}) == 0


def test_a_request_continuing_a_tool_call_is_sent_without_thinking():
    call = {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    body = {"model": "claude-x", "messages": [*messages, {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}], "reasoning_effort": "low"}
    out = to_anthropic(route_call(body))
    assert "thinking" not in out and out["max_tokens"] == 4096
    later = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "18C."}, {"role": "user", "content": "And tomorrow?"}]}
    assert to_anthropic(route_call(later))["thinking"]["budget_tokens"] == 1024


def test_reasoning_effort_reaches_anthropic_and_its_thinking_comes_back_as_reasoning_content(start_gateway, upstream):
    upstream.script("p1", lambda body, request: _json(THINKING_MESSAGE))
    gateway = start_gateway(CONFIG, upstream)
    reply = gateway.client().chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Weather?"}], reasoning_effort="low")
    message = reply.choices[0].message
    assert message.content == "Sunny." and message.model_extra["reasoning_content"] == "Paris is in France."
    sent = upstream.seen[-1].body
    assert (sent["max_tokens"], sent["thinking"]) == (1000 + 1024, {"type": "enabled", "budget_tokens": 1024})
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]  # thinking is in Anthropic's output count


def test_a_stream_relays_thinking_deltas_as_reasoning_content(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return Response(thinking_stream(), media_type="text/event-stream")

    upstream.script("p1", anthropic)
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(
        gateway.client().chat.completions.create(
            model="claude-sonnet", messages=[{"role": "user", "content": "Weather?"}], reasoning_effort="high", max_tokens=2000, stream=True
        )
    )
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert reasoning == "Paris is in France." and streamed_text(chunks) == "Sunny."
    assert upstream.seen[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 1999}
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"temperature": 0.2}, "unsupported_parameter", "temperature"),
        ({"top_p": 0.5}, "unsupported_parameter", "top_p"),
        ({"tool_choice": "required", "tools": TOOLS}, "unsupported_parameter", "tool_choice"),
        ({"max_tokens": 1024}, "invalid_max_tokens", "max_tokens"),
        ({"reasoning_effort": "extreme"}, "invalid_reasoning_effort", "reasoning_effort"),
    ],
)
def test_what_thinking_cannot_take_is_a_clear_400_before_anything_is_sent(start_gateway, upstream, extra, code, param):
    gateway = start_gateway(CONFIG, upstream)
    body = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Think."}], "reasoning_effort": "low", **extra}
    response = gateway.http("POST", "/v1/chat/completions", key=USER_KEY, json=body)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    assert upstream.seen == []


def test_temperature_1_and_a_high_top_p_go_with_thinking():
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "Think."}], "reasoning_effort": "low", "temperature": 1, "top_p": 0.95}
    assert to_anthropic(route_call(body))["thinking"]["budget_tokens"] == 1024


def test_admission_reserves_the_thinking_budget_of_a_request_without_a_limit(start_gateway, upstream):
    upstream.script("p1", lambda body, request: _json(THINKING_MESSAGE))
    # 1,024 default output tokens at $15/1M ($0.015) fit in $0.05 of credit; 1,024 + 8,192 ($0.14) do not.
    gateway = start_gateway(CONFIG.replace("{credits: 10}", "{credits: 0.05}"), upstream)
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="medium")
    assert caught.value.status_code == 402 and upstream.seen == []
    client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Hi"}])
    assert len(upstream.seen) == 1
