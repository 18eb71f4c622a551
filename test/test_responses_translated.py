"""`POST /v1/responses` through Anthropic and Gemini providers: the Responses request
translated to each vendor's format, its answer and stream translated back, billed from the
vendor's usage. Driven by the openai SDK's `responses` client."""

from __future__ import annotations

import asyncio
import json
import typing
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.config import build_config
from core.providers import ADAPTERS
from core.providers.base import UpstreamCall
from core.providers.responses_events import ResponseFrame
from core.providers.responses_translate import TranslatedResponsesAdapter, from_chat
from core.usage import Usage
from test.conftest import FREE, keys_yaml
from test.servers import sse
from test.test_anthropic import CONFIG as ANTHROPIC_CONFIG
from test.test_anthropic import EXPECTED_COST_NANOS as ANTHROPIC_COST_NANOS
from test.test_anthropic import MESSAGE, THINKING_MESSAGE, ledger_rows, thinking_stream, wait_for_ledger_rows
from test.test_anthropic import STREAM as ANTHROPIC_STREAM
from test.test_gemini import CONFIG as GEMINI_CONFIG
from test.test_gemini import EXPECTED_COST_NANOS as GEMINI_COST_NANOS
from test.test_gemini import RESPONSE as GEMINI_RESPONSE
from test.test_gemini import STREAM as GEMINI_STREAM
from test.test_gemini import THINKING_RESPONSE as GEMINI_THINKING_RESPONSE

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather now",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    "strict": False,
}
PIXEL = "data:image/png;base64,iVBORw0KGgo="


def answers(body: Any) -> Any:
    async def handler(_body: dict[str, Any], _request: Request) -> Response:
        return JSONResponse(body)

    return handler


def streams(raw: bytes) -> Any:
    """A vendor streaming `raw` event by event (and ending there: cut off if `raw` is)."""

    async def handler(_body: dict[str, Any], _request: Request) -> Response:
        events = [part + b"\n\n" for part in raw.split(b"\n\n") if part.strip()]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    return handler


# --- Anthropic ----------------------------------------------------------------------------------


def test_anthropic_answers_a_response_billed_from_its_usage(start_gateway, upstream):
    upstream.script("p1", answers(MESSAGE))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    raw = gateway.client().responses.with_raw_response.create(
        model="claude-sonnet", instructions="Be brief.", input="Weather in Paris?", tools=[WEATHER_TOOL], max_output_tokens=300, temperature=0.2
    )
    response = raw.parse()
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.model == "claude-sonnet" and response.store is False
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check the weather."
    assert (call.type, call.call_id, call.name, json.loads(call.arguments)) == ("function_call", "toolu_01A", "get_weather", {"location": "Paris"})
    usage = response.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens, usage.output_tokens, usage.total_tokens) == (1125, 1000, 15, 1140)
    sent = upstream.seen[-1]
    assert sent.path == "/p1/v1/messages"
    assert sent.body == {
        "model": "claude-3-5-sonnet-20241022",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        "max_tokens": 300,
        "system": "Be brief.",
        "temperature": 0.2,
        "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER_TOOL["parameters"]}],
    }
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, ANTHROPIC_COST_NANOS)]
    assert raw.headers["x-tollgate-cost"] == "0.000975"


def test_anthropic_stream_is_the_responses_event_sequence(start_gateway, upstream):
    upstream.script("p1", streams(ANTHROPIC_STREAM))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    with gateway.client().responses.stream(model="claude-sonnet", input="Weather?", tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert upstream.seen[-1].body["stream"] is True
    assert final.output_text == "Let me check the weather." and final.status == "completed"
    call = final.output[1]
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("toolu_01A", "get_weather", {"location": "Paris"})
    assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens, final.usage.output_tokens) == (1125, 1000, 15)
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, ANTHROPIC_COST_NANOS)]


def test_a_stream_the_vendor_cuts_off_fails_and_is_billed(start_gateway, upstream):
    upstream.script("p1", streams(ANTHROPIC_STREAM.split(b"event: content_block_stop")[0]))  # message_start and some text
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    events = list(gateway.client().responses.create(model="claude-sonnet", input="Weather?", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Let me check the weather."
    error, failed = events[-2:]
    assert (error.type, error.code) == ("error", "upstream_stream_broken") and "before message_stop" in error.message
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert (failed.response.error.code, failed.response.error.message) == ("server_error", error.message)
    ((status, prompt, completion, cached, written, cost),) = ledger_rows(gateway)
    assert (status, prompt, cached, written) == ("error", 1125, 1000, 100)
    assert completion >= 6 and cost > 0  # 25 bytes of text streamed: estimated


def test_an_answer_cut_by_max_output_tokens_is_incomplete(start_gateway, upstream):
    upstream.script("p1", answers({**MESSAGE, "content": [{"type": "text", "text": "It is"}], "stop_reason": "max_tokens"}))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    response = gateway.client().responses.create(model="claude-sonnet", input="Weather?", max_output_tokens=16)
    assert upstream.seen[-1].body["max_tokens"] == 16
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.output_text == "It is"


def test_a_function_call_round_trip_reaches_anthropic_as_tool_use_and_result(start_gateway, upstream):
    upstream.script("p1", answers(MESSAGE))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    client = gateway.client()
    first = client.responses.create(model="claude-sonnet", input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required")
    call = first.output[1]
    history = [{"role": "user", "content": "Weather in Paris?"}, *(item.model_dump(exclude_none=True) for item in first.output)]
    client.responses.create(
        model="claude-sonnet", input=[*history, {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}], tools=[WEATHER_TOOL]
    )
    assert upstream.seen[0].body["tool_choice"] == {"type": "any"}
    assert upstream.seen[1].body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check the weather."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"location": "Paris"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C, sunny"}]},
    ]


def test_an_image_input_reaches_anthropic_as_an_image_block(start_gateway, upstream):
    upstream.script("p1", answers(MESSAGE))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": PIXEL, "detail": "auto"}]
    gateway.client().responses.create(model="claude-sonnet", input=[{"role": "user", "content": content}])
    assert upstream.seen[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
    ]


def test_a_conversation_history_reaches_anthropic_as_alternating_turns(start_gateway, upstream):
    upstream.script("p1", answers(MESSAGE))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    history = [
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # an earlier turn's reasoning: not sent back
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
        },
        {"role": "user", "content": "Weather?"},
    ]
    gateway.client().responses.create(model="claude-sonnet", instructions="Be brief.", input=history)
    sent = upstream.seen[-1].body
    assert sent["system"] == "Be brief.\n\nUse metric units."
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
    ]


def test_a_key_that_cannot_pay_is_refused_with_402(start_gateway, upstream):
    gateway = start_gateway(ANTHROPIC_CONFIG.replace("{credits: 10}", "{credits: 0.000001}"), upstream)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().responses.create(model="claude-sonnet", input="Weather?", max_output_tokens=1000)
    assert caught.value.status_code == 402
    assert upstream.seen == []


# The SDK reads events leniently; its models say what each event must hold.
STREAM_EVENT_TYPES = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


def strictly_read_events(raw: bytes) -> list[str]:
    """The event types of a raw Responses stream, each event validated against its SDK model."""
    kinds = []
    for block in raw.decode().split("\n\n"):
        if block:
            kind_line, data_line = block.split("\n")
            data = json.loads(data_line.removeprefix("data: "))
            assert kind_line == f"event: {data['type']}"
            kinds.append(STREAM_EVENT_TYPES[data["type"]].model_validate(data).type)
    return kinds


@pytest.mark.parametrize("cut", [False, True], ids=["completed", "failed"])
def test_every_stream_event_and_the_response_hold_what_the_sdk_models_require(start_gateway, upstream, cut):
    upstream.script("p1", streams(ANTHROPIC_STREAM.split(b"event: message_delta")[0] if cut else ANTHROPIC_STREAM))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    body = {"model": "claude-sonnet", "input": "Weather?", "tools": [WEATHER_TOOL], "text": {"format": {"type": "json_object"}}}
    kinds = strictly_read_events(gateway.http("POST", "/v1/responses", json={**body, "stream": True}).content)
    assert kinds[-2:] == (["error", "response.failed"] if cut else ["response.output_item.done", "response.completed"])
    upstream.script("p1", answers(MESSAGE))
    SdkResponse.model_validate(gateway.http("POST", "/v1/responses", json=body).json())


def test_a_stream_arriving_in_one_write_is_numbered_from_response_created(start_gateway, upstream):
    """The vendor's whole stream in one chunk: created/in_progress come first and are 0 and 1,
    the item events numbered on (before the fix the opening events were numbered after them)."""

    async def at_once(_body: dict[str, Any], _request: Request) -> Response:
        return StreamingResponse(iter([ANTHROPIC_STREAM]), media_type="text/event-stream")

    upstream.script("p1", at_once)
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    raw = gateway.http("POST", "/v1/responses", json={"model": "claude-sonnet", "input": "Weather?", "stream": True}).content
    events = [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in raw.decode().split("\n\n") if block]
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# --- reasoning --------------------------------------------------------------------------------


def test_anthropic_thinking_is_a_reasoning_item_and_the_effort_its_budget(start_gateway, upstream):
    upstream.script("p1", answers(THINKING_MESSAGE))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    response = gateway.client().responses.create(model="claude-sonnet", input="Weather?", reasoning={"effort": "medium"}, max_output_tokens=16000)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Paris is in France." and message.type == "message"
    assert response.output_text == "Sunny." and response.reasoning.effort == "medium"
    sent = upstream.seen[-1].body
    assert (sent["max_tokens"], sent["thinking"]) == (16000, {"type": "enabled", "budget_tokens": 8192})
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, ANTHROPIC_COST_NANOS)]  # Anthropic counts thinking as output


def test_anthropic_thinking_streams_as_a_reasoning_item(start_gateway, upstream):
    upstream.script("p1", streams(thinking_stream()))
    gateway = start_gateway(ANTHROPIC_CONFIG, upstream)
    with gateway.client().responses.stream(model="claude-sonnet", input="Weather?", reasoning={"effort": "low"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Paris is in France."
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "Sunny."
    assert final.output[0].content[0].text == "Paris is in France."
    assert upstream.seen[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert ledger_rows(gateway) == [("ok", 1125, 15, 1000, 100, ANTHROPIC_COST_NANOS)]


def test_gemini_thoughts_are_a_reasoning_item_billed_at_the_reasoning_price(start_gateway, upstream):
    upstream.script("p1", answers(GEMINI_THINKING_RESPONSE))
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    response = gateway.client().responses.create(model="flash", input="Weather?", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[0].content[0].text == "Paris, so look it up."
    assert response.usage.output_tokens_details.reasoning_tokens == 50
    assert upstream.seen[-1].body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 24576, "includeThoughts": True}}
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, GEMINI_COST_NANOS)]  # 50 thinking tokens x $3.5/1M in it


def test_gemini_thoughts_stream_as_a_reasoning_item(start_gateway, upstream):
    thought = b'data: {"candidates": [{"content": {"parts": [{"text": "Paris, so", "thought": true}],"role": "model"},"index": 0}]}\n\n'
    upstream.script("p1", streams(thought + GEMINI_STREAM))
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    with gateway.client().responses.stream(model="flash", input="Weather?", reasoning={"effort": "minimal"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events][2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "Paris, so" and final.usage.output_tokens_details.reasoning_tokens == 50
    assert upstream.seen[-1].body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, GEMINI_COST_NANOS)]


# --- a stream the gateway ends itself --------------------------------------------------------------


def long_anthropic_stream() -> bytes:
    """message_start, then 40 text deltas of 100 bytes and no end: over a 4 KB relay limit."""
    start, _, _, _, delta, *_ = ANTHROPIC_STREAM.split(b"\n\n")
    text = json.dumps("word " * 20).encode()
    return start + b"\n\n" + b"".join(delta.replace(b'"Let me check"', text) + b"\n\n" for _ in range(40))


def test_a_stream_over_the_relay_limit_ends_with_a_responses_error_event(start_gateway, upstream):
    upstream.script("p1", streams(long_anthropic_stream()))
    config = ANTHROPIC_CONFIG.replace("preferences:\n  model_price:", "preferences:\n  max_response_body_bytes: 4096\n  model_price:")
    gateway = start_gateway(config, upstream)
    raw = gateway.http("POST", "/v1/responses", json={"model": "claude-sonnet", "input": "Talk.", "stream": True}).content
    kinds = strictly_read_events(raw)  # every event one the SDK's models read, the error included
    assert kinds[-2:] == ["error", "response.failed"] and "response.output_text.delta" in kinds
    events = [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in raw.decode().split("\n\n") if block]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["code"] == "upstream_response_too_large" and "4096 bytes" in events[-2]["message"]
    assert events[-1]["response"]["error"]["code"] == "server_error"
    ((status, prompt, completion, *_),) = wait_for_ledger_rows(gateway)
    assert (status, prompt) == ("error", 1125) and completion > 0  # what was relayed is billed


def test_a_relayed_responses_stream_over_the_limit_ends_with_a_responses_error_event(start_gateway, upstream):
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "word " * 20}

    async def openai_responses(body: dict[str, Any], request: Request) -> Response:
        events = [f"event: response.output_text.delta\ndata: {json.dumps({**delta, 'sequence_number': n})}\n\n".encode() for n in range(60)]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    upstream.script("p1", openai_responses)
    config = "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o]\n"
    gateway = start_gateway(config + keys_yaml() + "preferences:\n  max_response_body_bytes: 4096\n", upstream)
    events = list(gateway.client().responses.create(model="gpt-4o", input="Talk.", stream=True))
    assert events[-1].type == "error" and events[-1].code == "upstream_response_too_large"
    assert events[0].type == "response.output_text.delta"


# --- what a translated provider cannot do -------------------------------------------------------

REFUSED = {
    "web search tool": ({"tools": [{"type": "web_search"}]}, "unsupported_tool", "tools", "'web_search'"),
    "file search tool": ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "unsupported_tool", "tools", "'file_search'"),
    "hosted tool choice": ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "web_search_preview"}}, "unsupported_tool", "tool_choice", "'web_search_preview'"),
    "file input": (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"}]}]},
        "unsupported_input",
        "input",
        "'input_file'",
    ),
    "stored item": ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_input", "input", "'item_reference'"),
    "uploaded image": (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1", "detail": "auto"}]}]},
        "unsupported_input",
        "input",
        "file_id",
    ),
}


@pytest.mark.parametrize("config", [ANTHROPIC_CONFIG, GEMINI_CONFIG], ids=["anthropic", "gemini"])
@pytest.mark.parametrize("extra, code, param, named", REFUSED.values(), ids=REFUSED.keys())
def test_what_cannot_be_translated_is_a_clear_400(start_gateway, upstream, config, extra, code, param, named):
    gateway = start_gateway(config, upstream)
    model = "claude-sonnet" if config is ANTHROPIC_CONFIG else "flash"
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().responses.create(**{"model": model, "input": "Weather?", **extra})
    error = caught.value.body
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert named in error["message"] and "'p1'" in error["message"]
    assert upstream.seen == [] and ledger_rows(gateway) == [("error", 0, 0, 0, 0, 0)]  # refused before the vendor: nothing charged


@pytest.mark.parametrize("config", [ANTHROPIC_CONFIG, GEMINI_CONFIG], ids=["anthropic", "gemini"])
def test_a_previous_response_no_provider_holds_is_404(start_gateway, upstream, config):
    """Translated providers store nothing: no response id made through them is ever known,
    so a follow-up naming one is the 404 of an unknown response, before any vendor call."""
    gateway = start_gateway(config, upstream)
    model = "claude-sonnet" if config is ANTHROPIC_CONFIG else "flash"
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().responses.create(model=model, input="Weather?", previous_response_id="resp_123")
    assert caught.value.body["code"] == "response_not_found"
    assert upstream.seen == []


# --- Gemini -------------------------------------------------------------------------------------


def test_gemini_answers_a_response_with_its_reasoning_tokens_priced(start_gateway, upstream):
    upstream.script("p1", answers(GEMINI_RESPONSE))
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    content = [{"type": "input_text", "text": "Where is this?"}, {"type": "input_image", "image_url": PIXEL}]
    raw = gateway.client().responses.with_raw_response.create(
        model="flash",
        instructions="Be brief.",
        input=[{"role": "user", "content": content}],
        tools=[WEATHER_TOOL],
        max_output_tokens=500,
        reasoning={"effort": "low"},
    )
    response = raw.parse()
    assert response.output_text == "Looking it up." and response.output[1].name == "get_weather"
    usage = response.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (1200, 1000)
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (70, 50)
    assert response.reasoning.effort == "low"
    sent = upstream.seen[-1]
    assert sent.path == "/p1/v1/models/gemini-2.5-flash:generateContent"
    assert sent.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent.body["contents"] == [{"role": "user", "parts": [{"text": "Where is this?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}]
    assert sent.body["generationConfig"] == {"maxOutputTokens": 500, "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}
    assert sent.body["tools"] == [{"functionDeclarations": [{k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")}]}]
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, GEMINI_COST_NANOS)]
    assert raw.headers["x-tollgate-cost"] == "0.00036"


def test_gemini_stream_is_the_responses_event_sequence(start_gateway, upstream):
    upstream.script("p1", streams(GEMINI_STREAM))
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    events = list(gateway.client().responses.create(model="flash", input="Weather?", tools=[WEATHER_TOOL], stream=True))
    assert upstream.seen[-1].path == "/p1/v1/models/gemini-2.5-flash:streamGenerateContent"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Looking it up."
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in done] == ["message", "function_call"] and json.loads(done[1].arguments) == {"location": "Paris"}
    completed = events[-1]
    assert completed.type == "response.completed" and [item.id for item in completed.response.output] == [item.id for item in done]
    usage = completed.response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (1200, 70, 50)
    assert ledger_rows(gateway) == [("ok", 1200, 70, 1000, 0, GEMINI_COST_NANOS)]


def test_a_stream_the_client_abandons_bills_what_gemini_reported(start_gateway, upstream):
    first = GEMINI_STREAM.split(b"\n\n")[0] + b"\n\n"  # "Looking"; 1,200 prompt tokens, 1,000 of them cached

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield first
            while True:
                await asyncio.sleep(0.02)

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", gemini)
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    stream = gateway.client().responses.create(model="flash", input="Weather?", stream=True)
    assert next(e for e in stream if e.type == "response.output_text.delta").delta == "Looking"
    stream.close()
    ((status, prompt, completion, cached, _, _),) = wait_for_ledger_rows(gateway)
    assert (status, prompt, cached, completion) == ("client_disconnected", 1200, 1000, 2)


def test_a_function_call_round_trip_reaches_gemini_as_function_call_and_response(start_gateway, upstream):
    upstream.script("p1", answers(GEMINI_RESPONSE))
    gateway = start_gateway(GEMINI_CONFIG, upstream)
    client = gateway.client()
    first = client.responses.create(model="flash", input="Weather in Paris?", tools=[WEATHER_TOOL])
    call = first.output[1]
    follow_up = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'},
    ]
    client.responses.create(model="flash", input=follow_up, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    sent = upstream.seen[-1].body
    assert sent["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}]},
    ]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


# --- the translation itself ---------------------------------------------------------------------


def test_reasoning_text_a_chat_stream_carries_is_streamed_as_a_reasoning_item(upstream):
    # Any chat stream that carries reasoning text translates alike: here DeepSeek's
    # `reasoning_content`, through the OpenAI chat adapter.
    async def reasoner(body: dict[str, Any], request: Request) -> Response:
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "r1"}
        deltas = [{"reasoning_content": "Six times"}, {"reasoning_content": " seven."}, {"content": "42"}]
        chunks = [sse({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas]
        usage = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15, "completion_tokens_details": {"reasoning_tokens": 5}}
        chunks += [sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}), sse(b"[DONE]")]
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    upstream.script("p1", reasoner)
    config = build_config(f"providers:\n  - provider: p1\n    base_url: {upstream.base_url('p1')}\n    api: k\n    model: [r1]\n{FREE}", "api.yaml")
    call = UpstreamCall("responses", {"model": "r1", "input": "6 x 7?", "stream": True}, True, config.routes["r1"][0], "k")

    async def relay() -> tuple[bytes, Any]:
        async with aiohttp.ClientSession() as http:
            stream = await TranslatedResponsesAdapter(ADAPTERS["openai"]).send(call, http)
            return b"".join([chunk async for chunk in stream]), stream

    raw, stream = asyncio.run(relay())
    assert strictly_read_events(raw)[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    final = json.loads(raw.decode().split("\n\n")[-2].split("\n")[1].removeprefix("data: "))["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Six times seven."}]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 5}
    assert stream.complete and stream.usage.reasoning_tokens == 5


def test_reasoning_text_a_chat_answer_carries_becomes_a_reasoning_item():
    chat = {"choices": [{"message": {"role": "assistant", "content": "42", "reasoning_content": "Six times seven."}, "finish_reason": "stop"}]}
    response = from_chat(chat, ResponseFrame.of({"input": "?"}, "m"), Usage(10, 5, reasoning_tokens=3))
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": "Six times seven."}]
    assert message["content"][0]["text"] == "42"
    assert response["usage"]["output_tokens_details"] == {"reasoning_tokens": 3}
