"""OpenAI's Responses API through the gateway: the official openai SDK, a fake vendor that
speaks the API (test/servers.py: ResponsesVendor), the real app and its SQLite ledger."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import openai
import pytest

from core.usage import estimate_prompt_tokens
from test.conftest import ADMIN_KEY, FREE, USER_KEY
from test.servers import ResponsesVendor, fail

OTHER_KEY = "sk-other-user-0003"
BROKE_KEY = "sk-broke-user-0004"


def config(providers: str = "p1", engine: str = "openai") -> str:
    """Providers serving gpt-5 (each a fake vendor), priced with cache-read and reasoning prices."""
    entries = "".join(
        f"  - provider: {name}\n    engine: {engine}\n    base_url: {{fake:{name}}}\n    api: up-key-{name}\n    model: [gpt-5]\n" for name in providers.split()
    )
    return f"""
providers:
{entries}api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: alice
    preferences: {{billing_mode: token, credits: 10}}
  - api: {OTHER_KEY}
    name: bob
    preferences: {{billing_mode: token, credits: 10}}
  - api: {BROKE_KEY}
    name: carol
    preferences: {{billing_mode: token, credits: 0}}
preferences:
  cooldown_period: 60
  model_price:
    gpt-5: {{token_price: '2,8', cache_read_price: 0.5, reasoning_price: 10}}
"""


# The vendor's usage (servers.RESPONSES_USAGE): 1000 input (400 cached), 300 output (100 reasoning):
# 600 x 2 + 400 x 0.5 + 200 x 8 + 100 x 10 per 1M tokens = 0.004 USD.
COST_NANOS = 4_000_000


def ledger_rows(gateway, sql: str = "SELECT status, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost_nanos FROM usage") -> list[tuple]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # flushes the ledger
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def vendor(upstream) -> ResponsesVendor:
    vendor = ResponsesVendor()
    for name in ("p1", "p2"):
        upstream.script(name, vendor)
    return vendor


def test_a_response_is_billed_from_its_usage_with_cached_and_reasoning_prices(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    raw = gateway.client().responses.with_raw_response.create(model="gpt-5", input="hello there")
    response = raw.parse()
    assert response.output_text == "Hello from responses" and response.usage.input_tokens == 1000
    assert raw.headers["x-tollgate-cost"] == "0.004" and raw.headers["x-tollgate-provider"] == "p1"
    assert ledger_rows(gateway) == [("ok", 1000, 400, 300, 100, COST_NANOS)]
    prices = ledger_rows(gateway, "SELECT unit_prices FROM usage")[0][0]
    assert json.loads(prices) == {"input": "2", "output": "8", "cache_read": "0.5", "reasoning": "10"}


def test_the_body_reaches_the_upstream_untouched_but_for_the_model(start_gateway, upstream, vendor):
    gateway = start_gateway(config().replace("model: [gpt-5]", "model: [{gpt-5-2025-08-07: gpt-5}]"), upstream)
    body: dict[str, Any] = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "instructions": "be brief",
        "store": True,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
        "reasoning": {"effort": "low", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "max_output_tokens": 500,
        "metadata": {"k": "v"},
    }
    gateway.client().responses.create(model="gpt-5", **body)
    (seen,) = upstream.seen
    assert seen.body == {"model": "gpt-5-2025-08-07", **body}
    assert seen.path == "/p1/v1/responses" and seen.headers["authorization"] == "Bearer up-key-p1"


def test_a_stream_relays_every_event_and_is_billed_from_its_completed_event(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    events = list(gateway.client().responses.create(model="gpt-5", input="hello there", stream=True))
    assert [event.type for event in events] == ["response.created", *["response.output_text.delta"] * 3, "response.completed"]
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 100
    assert "stream_options" not in upstream.seen[0].body
    assert ledger_rows(gateway) == [("ok", 1000, 400, 300, 100, COST_NANOS)]


def test_a_response_without_usage_is_billed_on_an_estimate(start_gateway, upstream, vendor):
    vendor.usage = None
    gateway = start_gateway(config(), upstream)
    gateway.client().responses.create(model="gpt-5", input="hello there", instructions="be brief")
    prompt = estimate_prompt_tokens({"input": "hello there", "instructions": "be brief"})
    assert ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage") == [("estimated", prompt, 5)]  # 20 bytes of text


def test_a_stream_cut_midway_is_billed_for_what_it_streamed(start_gateway, upstream, vendor):
    vendor.cut_after, vendor.words = 2, ("abcdefgh", "ijklmnop", "qrst")
    gateway = start_gateway(config(), upstream)
    events = list(gateway.client().responses.create(model="gpt-5", input="hello there", stream=True))
    assert [event.type for event in events] == ["response.created", "response.output_text.delta", "response.output_text.delta", "error"]
    assert events[-1].code == "upstream_stream_broken" and "ended the stream early" in events[-1].message  # as OpenAI ends a stream
    prompt = estimate_prompt_tokens({"input": "hello there", "stream": True})
    assert ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage") == [("error", prompt, 4)]  # 16 bytes streamed


def test_a_key_that_cannot_pay_gets_402(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client(BROKE_KEY).responses.create(model="gpt-5", input="hello there")
    assert caught.value.status_code == 402 and upstream.seen == []


def test_input_of_the_wrong_shape_is_a_clear_400(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    answer = gateway.http("POST", "/v1/responses", json={"model": "gpt-5", "input": {"text": "hi"}})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_input" and answer.json()["error"]["param"] == "input"


def test_azure_is_called_on_its_v1_responses_path_with_its_key_header(start_gateway, upstream, vendor):
    gateway = start_gateway(config(engine="azure").replace("model: [gpt-5]", "model: [{my-deployment: gpt-5}]"), upstream)
    response = gateway.client().responses.create(model="gpt-5", input="hello there")
    gateway.client().responses.retrieve(response.id)
    create, retrieve = upstream.seen
    assert create.path == "/p1/v1/openai/v1/responses" and create.query == "" and create.body["model"] == "my-deployment"
    assert create.headers["api-key"] == "up-key-p1" and "authorization" not in create.headers
    assert retrieve.path == f"/p1/v1/openai/v1/responses/{response.id}" and retrieve.headers["api-key"] == "up-key-p1"


def test_a_failing_provider_fails_over_and_the_response_is_held_by_the_one_that_answered(start_gateway, upstream, vendor):
    upstream.script("p1", fail(500))
    gateway = start_gateway(config("p1 p2"), upstream)
    client = gateway.client()
    response = client.responses.create(model="gpt-5", input="hello there")
    assert upstream.providers_seen() == ["p1", "p2"]
    assert client.responses.retrieve(response.id).id == response.id and upstream.providers_seen()[-1] == "p2"


def test_stored_responses_are_retrieved_cancelled_listed_and_deleted_by_their_key(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    client = gateway.client()
    response = client.responses.create(model="gpt-5", input="hello there")
    assert client.responses.retrieve(response.id).output_text == "Hello from responses"
    assert client.responses.cancel(response.id).status == "cancelled"
    items = client.responses.input_items.list(response.id, limit=5, order="asc")
    assert [item.content[0].text for item in items.data] == ["hello there"]
    assert upstream.seen[-1].path == f"/p1/v1/responses/{response.id}/input_items" and "limit=5" in upstream.seen[-1].query
    client.responses.delete(response.id)
    assert [(seen.path.rsplit("/", 1)[-1], seen.headers["authorization"]) for seen in upstream.seen[1:]] == [
        (response.id, "Bearer up-key-p1"),
        ("cancel", "Bearer up-key-p1"),
        ("input_items", "Bearer up-key-p1"),
        (response.id, "Bearer up-key-p1"),
    ]
    with pytest.raises(openai.NotFoundError):  # the upstream's own 404, passed on
        client.responses.retrieve(response.id)
    assert len(ledger_rows(gateway)) == 1, "only the create is billed"


def test_another_key_cannot_see_a_response_nor_continue_it(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    response = gateway.client().responses.create(model="gpt-5", input="hello there")
    other = gateway.client(OTHER_KEY)
    for call in (
        lambda: other.responses.retrieve(response.id),
        lambda: other.responses.delete(response.id),
        lambda: other.responses.cancel(response.id),
        lambda: other.responses.input_items.list(response.id),
        lambda: other.responses.create(model="gpt-5", input="more", previous_response_id=response.id),
        lambda: gateway.client().responses.retrieve("resp_unknown"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["code"] == "response_not_found"
    assert len(upstream.seen) == 1, "nothing reached the upstream"


def test_a_response_made_with_store_false_is_not_remembered(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    response = gateway.client().responses.create(model="gpt-5", input="hello there", store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().responses.retrieve(response.id)
    assert caught.value.body["code"] == "response_not_found" and len(upstream.seen) == 1  # the gateway's 404: never forwarded


def test_a_follow_up_goes_to_the_provider_holding_the_previous_response(start_gateway, upstream, vendor):
    gateway = start_gateway(config("p1 p2") + "  SCHEDULING_ALGORITHM: round_robin\n", upstream)
    client = gateway.client()
    first = client.responses.create(model="gpt-5", input="hello there")
    holder = upstream.providers_seen()[0]
    for _ in range(4):
        client.responses.create(model="gpt-5", input="and then?", previous_response_id=first.id)
    assert upstream.providers_seen() == [holder] * 5
    streamed = list(client.responses.create(model="gpt-5", input="and then?", previous_response_id=first.id, stream=True))
    assert upstream.providers_seen()[-1] == holder and streamed[-1].type == "response.completed"
    # A streamed create is remembered from its `response.created` event: its follow-ups go there too.
    for _ in range(2):
        client.responses.create(model="gpt-5", input="more", previous_response_id=streamed[0].response.id)
    assert upstream.providers_seen() == [holder] * 8


def test_a_follow_up_the_key_may_not_send_to_the_holder_is_refused(start_gateway, upstream, vendor):
    gateway = start_gateway(config("p1 p2") + "  SCHEDULING_ALGORITHM: fixed_priority\n", upstream)
    first = gateway.client().responses.create(model="gpt-5", input="hello there")
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().responses.create(model="p2/gpt-5", input="more", previous_response_id=first.id)
    assert caught.value.body["code"] == "previous_response_provider_mismatch" and "'p1'" in caught.value.body["message"]


def test_echo_answers_the_responses_api(start_gateway):
    gateway = start_gateway(f"providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n{FREE}api_keys:\n  - api: {USER_KEY}\n")
    client = gateway.client()
    response = client.responses.create(model="echo-1", input=[{"role": "user", "content": "hello there"}])
    assert response.output_text == "Echo: hello there" and response.id.startswith("resp_") and response.usage.output_tokens == 5
    events = list(client.responses.create(model="echo-1", input="hello there", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "Echo: hello there"
    assert events[-1].response.usage.input_tokens == response.usage.input_tokens


def test_a_stored_response_is_found_after_a_restart(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    response = gateway.client().responses.create(model="gpt-5", input="hello there")
    gateway.server.stop()  # writes everything queued
    restarted = start_gateway(config(), upstream)
    assert restarted.client().responses.retrieve(response.id).id == response.id
    with pytest.raises(openai.NotFoundError):
        restarted.client(OTHER_KEY).responses.retrieve(response.id)


def test_retrieving_a_stored_response_as_a_stream_is_refused_clearly(start_gateway, upstream, vendor):
    gateway = start_gateway(config(), upstream)
    response = gateway.client().responses.create(model="gpt-5", input="hello there")
    answer = gateway.http("GET", f"/v1/responses/{response.id}?stream=true")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "stream_not_supported"
    assert gateway.http("GET", f"/responses/{response.id}").json()["id"] == response.id  # unprefixed paths too


def test_a_stream_ending_incomplete_is_billed_from_the_usage_it_reports(start_gateway, upstream):
    from starlette.responses import StreamingResponse

    from test.servers import RESPONSES_USAGE, responses_event

    async def incomplete(body: dict[str, Any], request: Any) -> Any:
        response = {"id": "resp_cut", "object": "response", "status": "incomplete", "output": [], "usage": RESPONSES_USAGE}
        events = [
            responses_event("response.created", {"response": {**response, "usage": None}}),
            responses_event("response.incomplete", {"response": response}),
        ]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    upstream.script("p1", incomplete)
    gateway = start_gateway(config(), upstream)
    events = list(gateway.client().responses.create(model="gpt-5", input="hello there", stream=True, max_output_tokens=16))
    assert [event.type for event in events] == ["response.created", "response.incomplete"]
    assert ledger_rows(gateway) == [("ok", 1000, 400, 300, 100, COST_NANOS)]


def test_an_upstream_error_event_is_relayed_once_and_what_was_streamed_is_billed(start_gateway, upstream):
    from starlette.responses import StreamingResponse

    from test.servers import responses_event

    async def failing(body: dict[str, Any], request: Any) -> Any:
        started = {"id": "resp_err", "object": "response", "status": "in_progress", "output": []}
        events = [
            responses_event("response.created", {"response": started}),
            responses_event("response.output_text.delta", {"item_id": "m", "output_index": 0, "content_index": 0, "delta": "abcdefgh"}),
            responses_event("error", {"code": "server_error", "message": "boom", "param": None}),
        ]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    upstream.script("p1", failing)
    gateway = start_gateway(config(), upstream)
    events = list(gateway.client().responses.create(model="gpt-5", input="hello there", stream=True))
    assert [event.type for event in events] == ["response.created", "response.output_text.delta", "error"] and events[-1].message == "boom"
    prompt = estimate_prompt_tokens({"input": "hello there", "stream": True})
    assert ledger_rows(gateway, "SELECT status, prompt_tokens, completion_tokens FROM usage") == [("error", prompt, 2)]
