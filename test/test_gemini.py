"""Gemini behind the OpenAI endpoint: translation both ways, streams, cache and thinking tokens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.config import build_config
from core.providers.base import UpstreamCall
from core.providers.gemini import from_gemini, to_gemini
from core.usage import estimate_prompt_tokens
from test.conftest import FREE, keys_yaml
from test.servers import streamed_text
from test.test_anthropic import TOOLS, ledger_rows, wait_for_ledger_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RESPONSE = json.loads((FIXTURES / "gemini_response.json").read_text())
STREAM = (FIXTURES / "gemini_stream.txt").read_bytes()

CONFIG = (
    """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: gemini
    api: google-secret
    model:
      - gemini-2.5-flash: flash
"""
    + keys_yaml().replace("name: alice", "name: alice\n    preferences: {credits: 10}")
    + """
preferences:
  model_price:
    flash: {token_price: '0.3,2.5', cache_read_price: 0.075, reasoning_price: 3.5}
"""
)
# 200 uncached x 0.3 + 1000 cached x 0.075 + 20 output x 2.5 + 50 thinking x 3.5, per 1M tokens.
EXPECTED_COST_NANOS = (60 + 75 + 50 + 175) * 1000


def route_call(body: dict[str, Any]) -> UpstreamCall:
    config = build_config(
        "providers:\n  - provider: g\n    base_url: https://generativelanguage.googleapis.com/v1beta\n    api: k\n    model: [gem]\n" + FREE, "api.yaml"
    )
    assert config.providers[0].engine == "gemini"
    return UpstreamCall("chat/completions", body, False, config.routes["gem"][0], "k")


def test_request_translation():
    body = {
        "model": "gem",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Where?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "{\"temp\": 18}"},
        ],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0.1,
        "max_tokens": 300,
        "stop": ["END"],
    }  # fmt: skip
    out = to_gemini(route_call(body))
    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert out["generationConfig"] == {"temperature": 0.1, "maxOutputTokens": 300, "stopSequences": ["END"]}
    assert out["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    user, model, tool = out["contents"]
    assert user == {"role": "user", "parts": [{"text": "Where?"}, {"inlineData": {"mimeType": "image/png", "data": "QUJD"}}]}
    assert model == {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]}
    assert tool == {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}]}


def test_response_translation_and_usage():
    message, finish_reason, usage = from_gemini(RESPONSE)
    assert message["content"] == "Looking it up." and message["tool_calls"][0]["function"]["arguments"] == '{"location": "Paris"}'
    assert finish_reason == "tool_calls"
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning_tokens) == (1200, 1000, 70, 50)
    assert from_gemini({"candidates": [{"finishReason": "SAFETY"}]})[1] == "content_filter"
    assert from_gemini({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "MAX_TOKENS"}]})[1] == "length"


def test_non_stream_end_to_end_bills_cache_and_thinking_tokens(start_gateway, upstream):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(RESPONSE)

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    reply = gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS)
    assert reply.choices[0].message.content == "Looking it up."
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    seen = upstream.seen[-1]
    assert seen.path == "/p1/v1/models/gemini-2.5-flash:generateContent"
    assert seen.headers["x-goog-api-key"] == "google-secret"
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, EXPECTED_COST_NANOS)]


def test_stream_end_to_end(start_gateway, upstream):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for part in STREAM.split(b"\n\n"):
                if part.strip():
                    yield part + b"\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(
        gateway.client().chat.completions.create(
            model="flash", messages=[{"role": "user", "content": "Weather?"}], stream=True, stream_options={"include_usage": True}
        )
    )
    assert upstream.seen[-1].path == "/p1/v1/models/gemini-2.5-flash:streamGenerateContent" and upstream.seen[-1].query == "alt=sse"
    assert streamed_text(chunks) == "Looking it up."
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"location": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == 70
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, EXPECTED_COST_NANOS)]


def test_stream_without_a_finish_reason_is_an_error_billed_in_part(start_gateway, upstream):
    first = STREAM.split(b"\n\n")[0] + b"\n\n"

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield first

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.APIError):
        list(gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "Weather?"}], stream=True))
    ((status, prompt, completion, cached, _, cost),) = ledger_rows(gateway)
    assert (status, prompt, cached) == ("error", 1200, 1000) and completion >= 1 and cost > 0


def test_gemini_errors_come_back_openai_shaped(start_gateway, upstream):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse({"error": {"code": 400, "message": "Invalid JSON payload received.", "status": "INVALID_ARGUMENT"}}, status_code=400)

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["message"] == "Invalid JSON payload received." and caught.value.body["type"] == "invalid_request_error"


def test_an_abandoned_stream_bills_the_prompt_size_gemini_reported(start_gateway, upstream):
    first = STREAM.split(b"\n\n")[0] + b"\n\n"  # usageMetadata: 1,200 prompt tokens, 1,000 of them cached

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield first
            while True:
                await asyncio.sleep(0.02)

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    stream = gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "Weather?"}], stream=True)
    assert next(c for c in stream if c.choices and c.choices[0].delta.content).choices[0].delta.content == "Looking"
    stream.close()
    ((status, prompt, completion, cached, _, _),) = wait_for_ledger_rows(gateway)
    assert (status, prompt, cached, completion) == ("client_disconnected", 1200, 1000, 2)


def test_a_cut_stream_without_usage_metadata_still_bills_the_prompt(start_gateway, upstream):
    text_only = b'data: {"candidates": [{"content": {"parts": [{"text": "Looking"}], "role": "model"}, "index": 0}]}\n\n'

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return StreamingResponse(iter([text_only]), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    messages = [{"role": "user", "content": "Weather?"}]
    with pytest.raises(openai.APIError):
        list(gateway.client().chat.completions.create(model="flash", messages=messages, stream=True))
    ((status, prompt, completion, *_),) = ledger_rows(gateway)
    assert (status, prompt, completion) == ("error", estimate_prompt_tokens({"messages": messages}), 2)


@pytest.mark.parametrize("metadata", [None, {}, {"totalTokenCount": 160}], ids=["absent", "empty", "total only"])
def test_an_answer_without_usage_metadata_is_estimated_from_its_text(start_gateway, upstream, metadata):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        answer = {"candidates": [{"content": {"parts": [{"text": "word " * 80}], "role": "model"}, "finishReason": "STOP"}]}
        return JSONResponse(answer if metadata is None else {**answer, "usageMetadata": metadata})

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    request = {"model": "flash", "messages": [{"role": "user", "content": "Talk."}]}
    reply = gateway.client().chat.completions.create(**request)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (estimate_prompt_tokens(request), 100)
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 100)


def test_the_larger_of_both_output_limits_is_sent_as_billing_reserves_it():
    body = {"model": "gem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "max_completion_tokens": 200}
    assert to_gemini(route_call(body))["generationConfig"] == {"maxOutputTokens": 300}


# --- reasoning_effort: thinking ------------------------------------------------------------------

THOUGHT = {"text": "Paris, so look it up.", "thought": True}
THINKING_RESPONSE = {
    **RESPONSE,
    "candidates": [{**RESPONSE["candidates"][0], "content": {"role": "model", "parts": [THOUGHT, *RESPONSE["candidates"][0]["content"]["parts"]]}}],
}


def test_reasoning_effort_is_a_thinking_budget_with_thoughts_included():
    body = {"model": "gem", "messages": [{"role": "user", "content": "Think."}], "reasoning_effort": "medium", "max_tokens": 300}
    assert to_gemini(route_call(body))["generationConfig"] == {"maxOutputTokens": 300, "thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True}}
    assert to_gemini(route_call({**body, "reasoning_effort": "none"}))["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert "generationConfig" not in to_gemini(route_call({"model": "gem", "messages": [{"role": "user", "content": "Hi"}]}))


def test_thought_parts_come_back_as_reasoning_content(start_gateway, upstream):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(THINKING_RESPONSE)

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    reply = gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "Weather?"}], reasoning_effort="low")
    message = reply.choices[0].message
    assert message.content == "Looking it up." and message.model_extra["reasoning_content"] == "Paris, so look it up."
    assert reply.usage.completion_tokens_details.reasoning_tokens == 50
    assert upstream.seen[-1].body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, EXPECTED_COST_NANOS)]  # the 50 thinking tokens at reasoning_price


def test_a_stream_relays_thought_parts_as_reasoning_content(start_gateway, upstream):
    thought = b'data: {"candidates": [{"content": {"parts": [{"text": "Paris, so", "thought": true}],"role": "model"},"index": 0}]}\n\n'

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return Response(thought + STREAM, media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(CONFIG, upstream)
    chunks = list(
        gateway.client().chat.completions.create(model="flash", messages=[{"role": "user", "content": "Weather?"}], reasoning_effort="high", stream=True)
    )
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert reasoning == "Paris, so" and streamed_text(chunks) == "Looking it up."
    assert upstream.seen[-1].body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 24576, "includeThoughts": True}
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, EXPECTED_COST_NANOS)]
