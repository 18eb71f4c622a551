"""`POST /v1/messages`: Anthropic's format through any provider, with the anthropic SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.usage import estimate_prompt_tokens, estimate_usage
from test.conftest import FREE, USER_KEY, keys_yaml
from test.servers import completion_body, stream_chunks
from test.test_anthropic import CONFIG as ANTHROPIC_CONFIG
from test.test_anthropic import EXPECTED_COST_NANOS, MESSAGE, STREAM, ledger_rows, wait_for_ledger_rows
from test.test_gemini import CONFIG as GEMINI_CONFIG
from test.test_gemini import STREAM as GEMINI_STREAM

ECHO = (
    "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
    + keys_yaml().replace("name: alice", "name: alice\n    preferences: {credits: 10}")
    + "preferences:\n  model_price: {default: '1000,2000'}\n"
)
WEATHER_TOOL = {"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}


def sdk(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)


def test_messages_through_an_openai_format_provider(start_gateway):
    gateway = start_gateway(ECHO)
    message = sdk(gateway).messages.create(model="echo-1", max_tokens=50, system="Be brief.", messages=[{"role": "user", "content": "hello there"}])
    assert message.content[0].text == "Echo: hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 5
    ((status, prompt, completion, *_),) = ledger_rows(gateway)
    assert (status, prompt, completion) == ("ok", message.usage.input_tokens, 5)


def test_messages_stream_through_an_openai_format_provider(start_gateway):
    gateway = start_gateway(ECHO)
    with sdk(gateway).messages.stream(model="echo-1", max_tokens=50, messages=[{"role": "user", "content": "hello there"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: hello there"
    assert final.usage.output_tokens == 5 and final.stop_reason == "end_turn"
    assert ledger_rows(gateway)[0][:3] == ("ok", final.usage.input_tokens, 5)


def test_messages_go_to_anthropic_natively_and_are_billed_the_same(start_gateway, upstream):
    seen_bodies: list[dict[str, Any]] = []

    async def anthropic_upstream(body: dict[str, Any], request: Request) -> Response:
        seen_bodies.append(body)
        return JSONResponse(MESSAGE)

    upstream.script("p1", anthropic_upstream)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    cached_system = [{"type": "text", "text": "Long instructions", "cache_control": {"type": "ephemeral"}}]
    message = sdk(gateway).messages.create(
        model="claude-sonnet", max_tokens=100, system=cached_system, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    )
    assert message.content[1].name == "get_weather" and message.usage.cache_read_input_tokens == 1000
    assert seen_bodies[0]["system"] == cached_system, "passed through untranslated: cache_control survives"
    assert seen_bodies[0]["model"] == "claude-3-5-sonnet-20241022"
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


def test_native_anthropic_stream_is_relayed_and_billed(start_gateway, upstream):
    async def anthropic_upstream(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for part in STREAM.split(b"\n\n"):
                yield part + b"\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", anthropic_upstream)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    with sdk(gateway).messages.stream(
        model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Let me check the weather." and final.content[1].input == {"location": "Paris"}
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


def test_tool_use_round_trip_through_an_openai_format_provider(start_gateway, upstream):
    async def openai_tool_call(body: dict[str, Any], request: Request) -> Response:
        assert body["tools"][0]["function"]["name"] == "get_weather"
        assert body["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}
        reply = {"id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is 18C."}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}}  # fmt: skip
        return JSONResponse(reply)

    upstream.script("p1", openai_tool_call)
    config = "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o]\n" + keys_yaml()
    gateway = start_gateway(config, upstream)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]},
    ]
    message = sdk(gateway).messages.create(model="gpt-4o", max_tokens=100, messages=messages, tools=[WEATHER_TOOL])
    assert message.content[0].text == "It is 18C." and message.usage.input_tokens == 30
    assert json.loads(json.dumps(upstream.seen[-1].body["messages"][1]["tool_calls"][0]["function"]["arguments"])) == '{"location": "Paris"}'


# Claude Code sends reminders mid-conversation as messages of role "system".
MID_SYSTEM = [
    {"role": "user", "content": "Fix the bug."},
    {"role": "assistant", "content": "Looking at it."},
    {"role": "system", "content": [{"type": "text", "text": "The user changed main.py."}]},
    {"role": "user", "content": "Go on."},
]


def test_a_mid_conversation_system_message_stays_a_system_message_at_its_place(start_gateway, upstream):
    gateway = start_gateway(OPENAI_FORMAT, upstream)
    message = sdk(gateway).messages.create(model="gpt-4o", max_tokens=100, system="Be brief.", messages=MID_SYSTEM)
    assert message.content[0].text == "Hello from upstream"
    assert upstream.seen[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": "Looking at it."},
        {"role": "system", "content": "The user changed main.py."},
        {"role": "user", "content": "Go on."},
    ]


def test_a_mid_conversation_system_message_reaches_gemini_as_its_system_instruction(start_gateway, upstream):
    from test.test_gemini import RESPONSE

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(RESPONSE)

    upstream.script("p1", gemini)
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    response = gateway.http("POST", "/v1/messages", json={"model": "flash", "max_tokens": 100, "system": "Be brief.", "messages": MID_SYSTEM})
    assert response.status_code == 200, response.text
    sent = upstream.seen[-1].body
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nThe user changed main.py."}]}
    assert [(c["role"], [p["text"] for p in c["parts"]]) for c in sent["contents"]] == [
        ("user", ["Fix the bug."]),
        ("model", ["Looking at it."]),
        ("user", ["Go on."]),
    ]


def test_errors_on_messages_are_anthropic_shaped(start_gateway):
    gateway = start_gateway(ECHO)
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk(gateway).messages.create(model="nope", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'nope' does not exist or is not served by this gateway."},
    }


def test_a_bad_key_on_messages_is_an_anthropic_authentication_error(start_gateway):
    gateway = start_gateway(ECHO)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=gateway.url, api_key="sk-wrong", max_retries=0).messages.create(
            model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_a_forbidden_model_on_messages_is_an_anthropic_permission_error(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1, echo-2]\n" + FREE + keys_yaml("echo-2"))
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        sdk(gateway).messages.create(model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "permission_error"


def test_a_rate_limited_key_on_messages_gets_an_anthropic_rate_limit_error(start_gateway):
    gateway = start_gateway(ECHO.replace("{credits: 10}", "{credits: 10, rate_limit: '1/min'}"))
    sdk(gateway).messages.create(model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(gateway).messages.create(model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "rate_limit_error"


def test_a_key_out_of_credit_on_messages_gets_an_anthropic_billing_error(start_gateway):
    gateway = start_gateway(ECHO.replace("{credits: 10}", "{credits: 0.000001}"))  # less than one request costs
    with pytest.raises(anthropic.PaymentRequiredError) as caught:
        sdk(gateway).messages.create(model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "billing_error"


def test_optional_fields_are_not_sent_as_nulls_when_translated(start_gateway, upstream):
    config = "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o]\n" + keys_yaml()
    gateway = start_gateway(config, upstream)
    response = gateway.http("POST", "/v1/messages", key=USER_KEY, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["content"][0]["text"] == "Hello from upstream"
    sent = upstream.seen[-1].body
    assert "max_tokens" not in sent and "temperature" not in sent


def test_count_tokens_answers_the_estimate_free_of_charge(start_gateway):
    gateway = start_gateway(ECHO)
    request = {"system": "Be brief.", "messages": [{"role": "user", "content": "hello there"}]}
    counted = sdk(gateway).messages.count_tokens(model="echo-1", **request)  # type: ignore[arg-type]
    assert counted.input_tokens == estimate_prompt_tokens(request) > estimate_prompt_tokens({"messages": request["messages"]}), "the system prompt counts"
    assert ledger_rows(gateway) == [], "counting is not a billed request"
    sdk(gateway).messages.create(model="echo-1", max_tokens=10, messages=[{"role": "user", "content": "hello there"}])
    assert len(ledger_rows(gateway)) == 1


def test_count_tokens_refuses_like_messages_does(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1, echo-2]\n" + FREE + keys_yaml("echo-2"))
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(anthropic.NotFoundError) as not_found:
        sdk(gateway).messages.count_tokens(model="nope", messages=hello)
    with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
        sdk(gateway).messages.count_tokens(model="echo-1", messages=hello)
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        anthropic.Anthropic(base_url=gateway.url, api_key="sk-wrong", max_retries=0).messages.count_tokens(model="echo-2", messages=hello)
    with pytest.raises(anthropic.BadRequestError) as malformed:
        sdk(gateway).messages.count_tokens(model="echo-2", messages="hello")  # type: ignore[arg-type]
    types = [caught.value.body["error"]["type"] for caught in (not_found, forbidden, unauthenticated, malformed)]
    assert types == ["not_found_error", "permission_error", "authentication_error", "invalid_request_error"]
    bearer = gateway.http("POST", "/v1/messages/count_tokens", key=USER_KEY, json={"model": "echo-2", "messages": hello})
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0


# --- what /v1/messages bills when the vendor's usage is missing or partial ----------------------

OPENAI_FORMAT = "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o]\n" + keys_yaml()
HUNDRED_TOKENS = "word " * 80  # 400 bytes of text: 100 estimated tokens


def anthropic_event_bytes(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def message_start(input_tokens: int) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-3-5-sonnet-20241022",
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}  # fmt: skip
    return anthropic_event_bytes({"type": "message_start", "message": message}) + anthropic_event_bytes(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )


def text_delta(text: str) -> bytes:
    return anthropic_event_bytes({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def anthropic_stream(*parts: bytes, then_hang: bool = False) -> Any:
    """A fake Anthropic upstream streaming `parts`, then ending (cut off) or hanging until dropped."""

    async def handler(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for part in parts:
                yield part
            while then_hang:
                await asyncio.sleep(0.02)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return handler


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_a_native_stream_cut_off_bills_the_text_it_relayed(start_gateway, upstream, path):
    upstream.script("p1", anthropic_stream(message_start(25), *(text_delta(HUNDRED_TOKENS) for _ in range(5))))  # 500 tokens, no message_stop
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    body = {"model": "claude-sonnet", "max_tokens": 1000, "stream": True, "messages": [{"role": "user", "content": "Talk."}]}
    response = gateway.http("POST", path, json=body)
    assert "before message_stop" in response.text
    ((status, prompt, completion, *_),) = ledger_rows(gateway)
    assert (status, prompt, completion) == ("error", 25, 500)


def thinking_delta(thinking: str) -> bytes:
    return anthropic_event_bytes({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": thinking}})


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_a_native_stream_cut_off_bills_the_thinking_it_streamed(start_gateway, upstream, path):
    upstream.script("p1", anthropic_stream(message_start(25), *(thinking_delta(HUNDRED_TOKENS) for _ in range(5)), text_delta("42")))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    body = {"model": "claude-sonnet", "max_tokens": 1000, "stream": True, "messages": [{"role": "user", "content": "Think."}]}
    assert "before message_stop" in gateway.http("POST", path, json=body).text
    ((status, prompt, completion, *_),) = ledger_rows(gateway)
    assert (status, prompt, completion) == ("error", 25, 501)  # 2,000 bytes of thinking + "42"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_an_abandoned_stream_bills_the_prompt_size_the_vendor_reported(start_gateway, upstream, path):
    upstream.script("p1", anthropic_stream(message_start(1000), text_delta("Hello"), then_hang=True))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    body = {"model": "claude-sonnet", "max_tokens": 1000, "stream": True, "messages": [{"role": "user", "content": "Talk."}]}
    with httpx.stream("POST", f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=10) as response:
        received = b""
        for chunk in response.iter_bytes():
            received += chunk
            if b"Hello" in received:
                break
    ((status, prompt, completion, *_),) = wait_for_ledger_rows(gateway)
    assert (status, prompt, completion) == ("client_disconnected", 1000, 2)  # "Hello": 5 bytes of text


def test_a_native_stream_the_client_leaves_after_message_stop_is_not_a_disconnect(start_gateway, upstream):
    async def stop_then_linger(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            for part in STREAM.split(b"\n\n"):
                yield part + b"\n\n"
            await asyncio.sleep(1)  # the vendor ends its response well after its message_stop

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", stop_then_linger)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    body = {"model": "claude-sonnet", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "Weather?"}]}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=10) as response:
        received = b""
        for chunk in response.iter_bytes():
            received += chunk
            if b"event: message_stop" in received:
                break  # a client may hang up once it has the whole message
    assert wait_for_ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, EXPECTED_COST_NANOS)]


def test_an_openai_format_answer_without_usage_is_estimated_from_its_text(start_gateway, upstream):
    async def no_usage(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse({k: v for k, v in completion_body(body, HUNDRED_TOKENS).items() if k != "usage"})

    upstream.script("p1", no_usage)
    gateway = start_gateway(OPENAI_FORMAT, upstream)
    request = {"model": "gpt-4o", "max_tokens": 200, "system": "Be brief.", "messages": [{"role": "user", "content": "Talk."}]}
    message = sdk(gateway).messages.create(**request)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (estimate_prompt_tokens(request), 100)
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 100)


def test_a_native_answer_without_usage_is_estimated_from_its_text(start_gateway, upstream):
    async def no_usage(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse({**MESSAGE, "content": [{"type": "text", "text": HUNDRED_TOKENS}], "usage": None})

    upstream.script("p1", no_usage)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    request = {"model": "claude-sonnet", "max_tokens": 200, "messages": [{"role": "user", "content": "Talk."}]}
    gateway.http("POST", "/v1/messages", json=request).raise_for_status()
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 100)


@pytest.mark.parametrize(("usage", "completion"), [({}, 100), ({"output_tokens": 15}, 15)], ids=["empty", "output only"])
def test_a_native_answer_with_partial_usage_is_completed_by_estimate(start_gateway, upstream, usage, completion):
    async def partial(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse({**MESSAGE, "content": [{"type": "text", "text": HUNDRED_TOKENS}], "usage": usage})

    upstream.script("p1", partial)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    request = {"model": "claude-sonnet", "max_tokens": 200, "messages": [{"role": "user", "content": "Talk."}]}
    gateway.http("POST", "/v1/messages", json=request).raise_for_status()
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), completion)


def test_a_native_answer_without_usage_bills_its_thinking_too(start_gateway, upstream):
    async def no_usage(body: dict[str, Any], request: Request) -> Response:
        content = [{"type": "thinking", "thinking": HUNDRED_TOKENS, "signature": "sig"}, {"type": "text", "text": HUNDRED_TOKENS}]
        return JSONResponse({**MESSAGE, "content": content, "usage": None})

    upstream.script("p1", no_usage)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    request = {"model": "claude-sonnet", "max_tokens": 2000, "messages": [{"role": "user", "content": "Think."}]}
    gateway.http("POST", "/v1/messages", json=request).raise_for_status()
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 200)


def test_a_translated_stream_announces_the_prompt_size_and_bills_what_it_announced(start_gateway, upstream):
    async def stream_without_usage(body: dict[str, Any], request: Request) -> Response:
        chunks = stream_chunks({**body, "stream_options": None}, [HUNDRED_TOKENS])
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    upstream.script("p1", stream_without_usage)
    gateway = start_gateway(OPENAI_FORMAT, upstream)
    request = {"model": "gpt-4o", "max_tokens": 200, "system": "Be brief.", "messages": [{"role": "user", "content": "Talk."}]}
    events = list(sdk(gateway).messages.create(**request, stream=True))
    start, end = events[0], next(e for e in events if e.type == "message_delta")
    assert start.type == "message_start" and start.message.usage.input_tokens == estimate_prompt_tokens(request) > 10
    assert (end.usage.input_tokens, end.usage.output_tokens) == (estimate_prompt_tokens(request), 100)
    assert ledger_rows(gateway)[0][:3] == ("estimated", estimate_prompt_tokens(request), 100)


def test_a_translated_stream_announces_the_prompt_size_the_vendor_reported_early(start_gateway, upstream):
    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return StreamingResponse(iter([part + b"\n\n" for part in GEMINI_STREAM.split(b"\n\n") if part.strip()]), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    events = list(sdk(gateway).messages.create(model="flash", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}], stream=True))
    assert events[0].type == "message_start"  # Gemini's first chunk: 1,200 prompt tokens, 1,000 of them cached
    assert (events[0].message.usage.input_tokens, events[0].message.usage.cache_read_input_tokens) == (200, 1000)


BIG = "x" * 40_000  # 10,000 tokens: $10 at the ECHO config's $1,000 per million, more than the key's credits
LARGE_PARTS = {
    "system": {"system": BIG},
    "system blocks": {"system": [{"type": "text", "text": BIG}]},
    "tools": {"tools": [{**WEATHER_TOOL, "description": BIG}]},
    "tool result": {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": BIG}]}]}]},
    "tool use": {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"q": BIG}}]}]},
}


@pytest.mark.parametrize("part", LARGE_PARTS.values(), ids=LARGE_PARTS.keys())
def test_every_part_of_a_messages_request_counts_toward_the_reservation(start_gateway, part):
    gateway = start_gateway(ECHO)
    small = {"model": "echo-1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    response = gateway.http("POST", "/v1/messages", json={**small, **part})
    assert response.status_code == 402 and response.json()["error"]["type"] == "billing_error"
    assert gateway.http("POST", "/v1/messages", json=small).status_code == 200


def test_tool_definitions_count_toward_a_chat_completion_reservation(start_gateway):
    gateway = start_gateway(ECHO)
    tools = [{"type": "function", "function": {"name": "f", "description": BIG, "parameters": {"type": "object"}}}]
    response = gateway.http(
        "POST", "/v1/chat/completions", json={"model": "echo-1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    )
    assert response.status_code == 402 and response.json()["error"]["code"] == "credit_balance_exhausted"


class BrokenStore:
    """Fault injection: a config store whose every read raises, as a bug would."""

    @property
    def current(self) -> Any:
        raise RuntimeError("injected fault")


@pytest.mark.parametrize("path", ["/v1/messages", "/messages", "/v1/messages/count_tokens", "/messages/count_tokens"])
def test_an_internal_error_on_an_anthropic_path_is_anthropic_shaped(start_gateway, path):
    gateway = start_gateway(ECHO)
    app = gateway.server.app
    store, app.state.store = app.state.store, BrokenStore()
    try:
        response = gateway.http("POST", path, json={"model": "echo-1", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})
        openai_path = gateway.http("POST", "/v1/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "x"}]})
    finally:
        app.state.store = store
    assert response.status_code == 500
    assert response.json() == {"type": "error", "error": {"type": "api_error", "message": "The gateway hit an internal error; it has been logged."}}
    assert openai_path.status_code == 500 and openai_path.json()["error"]["code"] == "internal_error"


def test_a_tool_input_is_estimated_alike_in_the_request_and_the_reply():
    tool_input = {"city": "東京", "days": [1, 2], "metric": True}
    call = {"type": "tool_use", "id": "t1", "name": "", "input": tool_input}
    in_request = estimate_prompt_tokens({"messages": [{"role": "assistant", "content": [call]}]}) - estimate_prompt_tokens(
        {"messages": [{"role": "assistant", "content": []}]}
    )
    in_reply = estimate_usage({}, {"content": [call]}).completion_tokens
    assert in_request == in_reply == 11  # '{"city":"東京","days":[1,2],"metric":true}': 44 bytes of UTF-8
