"""The /v1 proxy end to end: real gateway, official openai SDK, fake upstream vendors."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from core.usage import estimate_prompt_tokens
from test.conftest import ADMIN_KEY, FREE, USER_KEY, keys_yaml
from test.servers import ServerThread, fail, hang, held_stream, openai_like, stream_chunks, streamed_text

TWO_PROVIDERS = """
providers:
  - provider: p1
    base_url: {fake:p1}
    api: up-key-1
    model: [gpt-4o]
  - provider: p2
    base_url: {fake:p2}
    api: up-key-2
    model: [gpt-4o]
preferences:
  cooldown_period: 60
""" + keys_yaml()

MESSAGES = [{"role": "user", "content": "hello there"}]


def test_echo_provider_answers_through_the_openai_sdk(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml())
    reply = gateway.client().chat.completions.create(model="echo-1", messages=MESSAGES)
    assert reply.choices[0].message.content == "Echo: hello there"
    assert reply.usage.prompt_tokens == 10  # 3 priming + 4 per message + ceil(11 bytes / 4)
    assert reply.usage.completion_tokens == 5  # ceil(len("Echo: hello there") / 4)


def test_echo_provider_streams_and_reports_usage(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml())
    stream = gateway.client().chat.completions.create(model="echo-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = streamed_text(chunks)
    assert text == "Echo: hello there"
    assert chunks[-1].usage.completion_tokens == 5


def test_echo_embeddings_and_completions(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml())
    client = gateway.client()
    embedding = client.embeddings.create(model="echo-1", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[0].embedding != embedding.data[1].embedding
    completion = client.completions.create(model="echo-1", prompt="say hi")
    assert completion.choices[0].text == "Echo: say hi"


def test_echo_ids_are_shaped_like_openai_ids(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml())
    client = gateway.client()
    first, second = (client.chat.completions.create(model="echo-1", messages=MESSAGES) for _ in range(2))
    assert first.id.startswith("chatcmpl-") and first.id != second.id
    chunks = list(client.chat.completions.create(model="echo-1", messages=MESSAGES, stream=True))
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert client.completions.create(model="echo-1", prompt="say hi").id.startswith("cmpl-")


def test_endpoints_answer_without_the_v1_prefix(start_gateway):
    gateway = start_gateway("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml())
    client = openai.OpenAI(base_url=gateway.url, api_key=USER_KEY, max_retries=0)  # a base URL without /v1
    assert client.chat.completions.create(model="echo-1", messages=MESSAGES).choices[0].message.content == "Echo: hello there"
    assert client.completions.create(model="echo-1", prompt="say hi").choices[0].text == "Echo: say hi"
    assert len(client.embeddings.create(model="echo-1", input="a").data) == 1
    assert [m.id for m in client.models.list()] == ["echo-1"] and client.models.retrieve("echo-1").id == "echo-1"
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=gateway.url, api_key="sk-wrong", max_retries=0).models.list()
    assert caught.value.code == "invalid_api_key", "answered as API JSON, not as a page"
    message = {"model": "echo-1", "max_tokens": 10, "messages": MESSAGES}
    assert gateway.http("POST", "/messages", json=message).json()["content"][0]["text"] == "Echo: hello there"
    assert gateway.http("POST", "/messages/count_tokens", json=message).json()["input_tokens"] == estimate_prompt_tokens(message)
    refused = gateway.http("POST", "/messages", key="sk-wrong", json=message)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_openai_upstream_gets_upstream_model_name_key_and_headers(start_gateway, upstream):
    config = """
providers:
  - provider: p1
    base_url: {fake:p1}
    api: up-key-1
    model:
      - gpt-4o-2024-08-06: gpt-4o
    preferences:
      headers: {X-Extra: extra-value}
""" + keys_yaml()
    gateway = start_gateway(config, upstream)
    reply = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.5)
    assert reply.choices[0].message.content == "Hello from upstream"
    seen = upstream.seen[-1]
    assert seen.body["model"] == "gpt-4o-2024-08-06"
    assert seen.body["temperature"] == 0.5
    assert seen.headers["authorization"] == "Bearer up-key-1"
    assert seen.headers["x-extra"] == "extra-value"
    assert USER_KEY not in json.dumps(seen.headers)


def test_provider_scoped_model_name_routes_to_that_provider(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    gateway.client().chat.completions.create(model="p2/gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p2"]


def test_stream_passes_chunks_and_hides_the_usage_chunk_the_client_did_not_ask_for(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    chunks = list(gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert streamed_text(chunks) == "Hello from upstream"
    assert all(c.choices for c in chunks), "the usage-only chunk must be stripped"
    assert upstream.seen[-1].body["stream_options"] == {"include_usage": True}


def test_stream_keeps_the_usage_chunk_when_the_client_asked(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    stream = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == 11


def test_stream_is_relayed_chunk_by_chunk_without_buffering(start_gateway, upstream):
    release = threading.Event()
    upstream.script("p1", held_stream(release, ["first", " second"]))
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    stream = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "first"  # arrived while the upstream still holds the rest
    release.set()
    assert streamed_text(stream) == " second"


def test_fixed_priority_uses_the_first_provider(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    client = gateway.client()
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p1", "p1", "p1"]


def test_round_robin_alternates_providers(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS.replace("cooldown_period: 60", "SCHEDULING_ALGORITHM: round_robin"), upstream)
    client = gateway.client()
    for _ in range(4):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p1", "p2", "p1", "p2"]


def test_weighted_round_robin_follows_weights(start_gateway, upstream):
    config = """
providers:
  - provider: p1
    base_url: {fake:p1}
    api: k
    model: [gpt-4o]
    preferences: {weight: 3}
  - provider: p2
    base_url: {fake:p2}
    api: k
    model: [gpt-4o]
preferences:
  SCHEDULING_ALGORITHM: weighted_round_robin
""" + keys_yaml()
    gateway = start_gateway(config, upstream)
    client = gateway.client()
    for _ in range(8):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen().count("p1") == 6
    assert upstream.providers_seen().count("p2") == 2


@pytest.mark.parametrize("failure", [fail(500), fail(429, {"error": {"message": "slow down", "type": "rate_limit", "code": "rate"}}), fail(503)])
def test_fails_over_to_the_next_provider(start_gateway, upstream, failure):
    upstream.script("p1", failure)
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    reply = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from upstream"
    assert upstream.providers_seen() == ["p1", "p2"]


def test_fails_over_when_a_provider_is_unreachable(start_gateway, upstream):
    config = TWO_PROVIDERS.replace("{fake:p1}", "http://127.0.0.1:9/v1")
    gateway = start_gateway(config, upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 200
    assert response.headers["x-tollgate-provider"] == "p2"


def test_fails_over_on_timeout_and_cools_the_slow_provider_down(start_gateway, upstream):
    upstream.script("p1", hang(1.0))
    config = TWO_PROVIDERS.replace("model: [gpt-4o]\n  - provider: p2", "model: [gpt-4o]\n    preferences: {model_timeout: {default: 0.3}}\n  - provider: p2")
    gateway = start_gateway(config, upstream)
    client = gateway.client()
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p1", "p2", "p2"], "the cooled-down provider is tried last"


def test_cooldown_ends_after_the_period(start_gateway, upstream):
    upstream.script("p1", fail(500))
    gateway = start_gateway(TWO_PROVIDERS.replace("cooldown_period: 60", "cooldown_period: 0.3"), upstream)
    client = gateway.client()
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    upstream.script("p1", openai_like)
    time.sleep(0.4)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p1", "p2", "p1"]


def test_streams_fail_over_before_the_first_byte(start_gateway, upstream):
    upstream.script("p1", fail(502))
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    chunks = list(gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert streamed_text(chunks) == "Hello from upstream"
    assert upstream.providers_seen() == ["p1", "p2"]


def test_no_failover_on_a_client_error_and_the_openai_error_passes_through(start_gateway, upstream):
    vendor = {"message": "messages: too long", "type": "invalid_request_error", "code": "context_length_exceeded", "param": "messages"}
    upstream.script("p1", fail(400, {"error": vendor}))
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")
    assert upstream.providers_seen() == ["p1"]


def test_auto_retry_off_tries_one_provider(start_gateway, upstream):
    upstream.script("p1", fail(500))
    gateway = start_gateway(TWO_PROVIDERS.replace("cooldown_period: 60", "AUTO_RETRY: false"), upstream)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert upstream.providers_seen() == ["p1"]


FOUR_PROVIDERS = (
    "providers:\n"
    + "".join(f"  - provider: p{n}\n    base_url: {{fake:p{n}}}\n    api: up-key\n    model: [gpt-4o]\n" for n in range(1, 5))
    + "preferences:\n  cooldown_period: 0\n  AUTO_RETRY: 1\n"
    + keys_yaml()
    + "  - api: sk-patient-0003\n    name: patient\n    preferences: {AUTO_RETRY: 3}\n"
)


def test_auto_retry_as_a_number_caps_the_retries_after_the_first_attempt(start_gateway, upstream):
    for name in ("p1", "p2", "p3"):
        upstream.script(name, fail(500))
    gateway = start_gateway(FOUR_PROVIDERS.replace("{fake:p4}", upstream.base_url("p4")), upstream)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert upstream.providers_seen() == ["p1", "p2"], "AUTO_RETRY: 1 is one retry after the first attempt"


def test_a_keys_auto_retry_number_overrides_the_global_one(start_gateway, upstream):
    for name in ("p1", "p2", "p3"):
        upstream.script(name, fail(500))
    gateway = start_gateway(FOUR_PROVIDERS.replace("{fake:p4}", upstream.base_url("p4")), upstream)
    reply = gateway.client("sk-patient-0003").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from upstream"
    assert upstream.providers_seen() == ["p1", "p2", "p3", "p4"]


def test_a_keys_scheduling_algorithm_overrides_the_global_one(start_gateway, upstream):
    config = TWO_PROVIDERS + "  - api: sk-spread-0004\n    name: spread\n    preferences: {SCHEDULING_ALGORITHM: round_robin}\n"
    gateway = start_gateway(config.replace("cooldown_period: 60", "SCHEDULING_ALGORITHM: fixed_priority"), upstream)
    for _ in range(4):
        gateway.client("sk-spread-0004").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    for _ in range(2):
        gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p1", "p2", "p1", "p2", "p1", "p1"]


OVERRIDDEN = TWO_PROVIDERS.replace(
    "    model: [gpt-4o]\n  - provider: p2",
    """    model:
      - gpt-4o-2024-08-06: gpt-4o
    preferences:
      post_body_parameter_overrides:
        __remove__: [temperature, stream_options]
        metadata: {team: ops, tags: {a: 1}}
        gpt-4o:
          __remove__: top_p
          seed: 7
          metadata: {tags: {b: 2}}
  - provider: p2""",
)


def test_body_overrides_apply_globally_then_per_public_model_and_merge_mappings(start_gateway, upstream):
    gateway = start_gateway(OVERRIDDEN, upstream)
    gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2, top_p=0.5, metadata={"user": "x"})
    seen = upstream.seen[-1].body
    assert seen["model"] == "gpt-4o-2024-08-06" and seen["seed"] == 7 and seen["messages"] == MESSAGES
    assert seen["metadata"] == {"user": "x", "team": "ops", "tags": {"a": 1, "b": 2}}
    assert "temperature" not in seen and "top_p" not in seen


def test_body_overrides_leave_the_usage_a_stream_is_billed_by_and_the_other_providers_body(start_gateway, upstream):
    gateway = start_gateway(OVERRIDDEN, upstream)
    chunks = list(gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, temperature=0.2))
    assert streamed_text(chunks) == "Hello from upstream"
    assert upstream.seen[-1].body["stream_options"] == {"include_usage": True}, "billing reads the final usage chunk"
    assert upstream.seen[-1].body["stream"] is True and "temperature" not in upstream.seen[-1].body
    gateway.client().chat.completions.create(model="p2/gpt-4o", messages=MESSAGES, temperature=0.2)
    assert upstream.seen[-1].provider == "p2" and upstream.seen[-1].body["temperature"] == 0.2 and "seed" not in upstream.seen[-1].body


class ForwardProxy:
    """A tiny HTTP forward proxy: records each request (its absolute-form target and
    Proxy-Authorization) and passes it on to the host it names."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.server = ServerThread(Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])])).start()

    @property
    def url(self) -> str:
        return self.server.url

    async def _forward(self, request: Request) -> Response:
        self.seen.append((request.url.path, request.headers.get("proxy-authorization")))
        headers = {name: value for name, value in request.headers.items() if name.lower() not in ("host", "proxy-authorization", "content-length")}
        target = f"http://{request.headers['host']}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        async with httpx.AsyncClient() as client:
            answer = await client.request(request.method, target, content=await request.body(), headers=headers)
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy()
    yield proxy
    proxy.server.stop()


def test_a_providers_http_proxy_carries_its_requests_and_a_socks5_one_is_ignored_with_a_warning(start_gateway, upstream, forward_proxy):
    proxied = forward_proxy.url.replace("http://", "http://ops:s3cret@")
    config = TWO_PROVIDERS.replace("cooldown_period: 60", "cooldown_period: 60\n  proxy: socks5://127.0.0.1:1080").replace(
        "    model: [gpt-4o]\n  - provider: p2", f"    model: [gpt-4o]\n    preferences: {{proxy: '{proxied}'}}\n  - provider: p2"
    )
    gateway = start_gateway(config, upstream)
    reply = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from upstream"
    assert forward_proxy.seen == [("/p1/v1/chat/completions", "Basic b3BzOnMzY3JldA==")]  # ops:s3cret
    gateway.client().chat.completions.create(model="p2/gpt-4o", messages=MESSAGES)
    assert len(forward_proxy.seen) == 1 and upstream.providers_seen() == ["p1", "p2"], "socks5 is ignored: p2 goes direct"
    warnings = gateway.status()["warnings"]
    assert any("socks5 proxies are not supported (http:// and https:// are) and are ignored" in str(w) for w in warnings)


def test_the_global_proxy_is_every_providers_and_its_credentials_are_never_logged_or_shown(start_gateway, upstream, caplog):
    config = TWO_PROVIDERS.replace("cooldown_period: 60", "AUTO_RETRY: false\n  proxy: http://ops:pr0xy-pass@127.0.0.1:9")
    gateway = start_gateway(config, upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
    assert upstream.seen == []
    shown = response.text + caplog.text + json.dumps(gateway.status()) + gateway.http("GET", "/admin/config/status", key=ADMIN_KEY).text
    assert "pr0xy-pass" not in shown


def test_all_providers_failing_gives_502_with_openai_shape(start_gateway, upstream):
    upstream.script("p1", fail(500))
    upstream.script("p2", fail(500))
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert response.json()["error"]["code"] == "upstream_error"


def test_upstream_timeout_gives_504(start_gateway, upstream):
    upstream.script("p1", hang(1.0))
    config = TWO_PROVIDERS.replace("cooldown_period: 60", "AUTO_RETRY: false\n  model_timeout: {default: 0.3}")
    gateway = start_gateway(config, upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_upstream_garbage_gives_502(start_gateway, upstream):
    async def html(body: dict[str, Any], request: Request) -> Response:
        return Response("<html>oops</html>", media_type="text/html")

    upstream.script("p1", html)
    gateway = start_gateway(TWO_PROVIDERS.replace("cooldown_period: 60", "AUTO_RETRY: false"), upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 502
    assert "not JSON" in response.json()["error"]["message"]


def test_upstream_auth_failure_is_not_passed_through(start_gateway, upstream):
    upstream.script(
        "p1", fail(401, {"error": {"message": "Incorrect API key provided: up-k***-1", "type": "invalid_request_error", "code": "invalid_api_key"}})
    )
    upstream.script("p2", fail(401))
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    response = gateway.http("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert "up-k" not in response.text


def test_upstream_keys_are_rotated(start_gateway, upstream):
    config = TWO_PROVIDERS.replace("api: up-key-1", "api: [up-a, up-b]")
    gateway = start_gateway(config, upstream)
    client = gateway.client()
    for _ in range(4):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert [s.headers["authorization"] for s in upstream.seen] == ["Bearer up-a", "Bearer up-b", "Bearer up-a", "Bearer up-b"]


def test_mid_stream_failure_ends_with_an_openai_error_event(start_gateway, upstream):
    async def cut(body: dict[str, Any], request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield stream_chunks(body, ["partial"])[0]
            yield b'data: {"choices": [{"delta": {"content": "tru'
            raise RuntimeError("upstream died")

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", cut)
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    stream = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["partial"]


def test_client_disconnect_cancels_the_upstream_stream(start_gateway, upstream):
    cancelled = threading.Event()

    async def endless(body: dict[str, Any], request: Request) -> Response:
        import asyncio

        async def gen():  # type: ignore[no-untyped-def]
            try:
                while True:
                    yield stream_chunks(body, ["tick"])[0]
                    await asyncio.sleep(0.02)
            finally:
                cancelled.set()

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", endless)
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    stream = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert next(iter(stream)).choices[0].delta.content == "tick"
    stream.close()
    assert cancelled.wait(5), "the upstream stream should be closed when the client goes away"


# --- authentication, allow-lists and request errors ------------------------------------------


def test_missing_and_wrong_keys_get_401(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    missing = gateway.http("POST", "/v1/chat/completions", key=None, json={"model": "gpt-4o", "messages": MESSAGES})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-wrong").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.seen == []


def test_x_api_key_header_authenticates(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    response = gateway.http("GET", "/v1/models", key=None, headers={"x-api-key": USER_KEY})
    assert response.status_code == 200


# gpt-4o from p1 and p2; the user key may use gpt-4o-mini and whatever p2 serves.
ALLOW_LIST_CONFIG = """
providers:
  - provider: p1
    base_url: {fake:p1}
    api: k
    model: [gpt-4o, gpt-4o-mini]
  - provider: p2
    base_url: {fake:p2}
    api: k
    model: [gpt-4o, o1]
""" + keys_yaml('[gpt-4o-mini, "p2/*"]')


def test_allow_list_limits_models_and_the_model_list(start_gateway, upstream):
    gateway = start_gateway(ALLOW_LIST_CONFIG, upstream)
    client = gateway.client()
    assert sorted(m.id for m in client.models.list()) == ["gpt-4o", "gpt-4o-mini", "o1"]
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert upstream.providers_seen() == ["p2"], "gpt-4o is allowed only through p2/*"
    admin_models = gateway.client(ADMIN_KEY).models.list()
    assert sorted(m.id for m in admin_models) == ["gpt-4o", "gpt-4o-mini", "o1"]


def test_retrieve_model_answers_for_models_the_key_may_use(start_gateway, upstream):
    client = start_gateway(ALLOW_LIST_CONFIG, upstream).client()
    model = client.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "p2")
    assert client.models.retrieve("p2/o1").id == "p2/o1", "a provider/model id (its slash sent as %2F) is one model"
    for hidden in ("p1/gpt-4o", "nope"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(hidden)
        assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


def test_model_not_allowed_gets_403(start_gateway, upstream):
    config = TWO_PROVIDERS.replace("api: up-key-2\n    model: [gpt-4o]", "api: up-key-2\n    model: [gpt-4o, o1]") + "    model: [gpt-4o]\n"
    gateway = start_gateway(config, upstream)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        gateway.client().chat.completions.create(model="o1", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_allowed"
    assert [m.id for m in gateway.client().models.list()] == ["gpt-4o"]


def test_unknown_model_gets_404(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_body", None),
        (json.dumps({"messages": MESSAGES}).encode(), "missing_model", "model"),
        (json.dumps({"model": "gpt-4o"}).encode(), "missing_messages", "messages"),
        (json.dumps({"model": "gpt-4o", "messages": "hi"}).encode(), "invalid_messages", "messages"),
        (json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": "yes"}).encode(), "invalid_stream", "stream"),
        (b"\xff\xfe\x00garbage", "invalid_json", None),
        (b"[" * 100000, "invalid_json", None),
    ],
)
def test_malformed_requests_get_400_naming_the_parameter(start_gateway, upstream, body, code, param):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    response = gateway.http("POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "invalid_request_error", "code": code, "param": param}
    assert upstream.seen == []


def test_parameter_errors_reach_the_sdk_with_their_param(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().embeddings.create(model="gpt-4o", input="x", extra_body={"stream": True})
    assert (caught.value.code, caught.value.param) == ("invalid_stream", "stream")
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().completions.create(model="gpt-4o", prompt=None)  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.param) == ("missing_prompt", "prompt")


def test_body_over_the_limit_gets_413(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS.replace("cooldown_period: 60", "max_request_body_bytes: 1000"), upstream)
    big = [{"role": "user", "content": "x" * 2000}]
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="gpt-4o", messages=big)
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    assert upstream.seen == []


def test_unknown_route_gets_an_openai_shaped_404(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    response = gateway.http("GET", "/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_config_status_needs_an_admin_key(start_gateway, upstream):
    gateway = start_gateway(TWO_PROVIDERS, upstream)
    assert gateway.http("GET", "/v1/config/status").status_code == 403
    assert gateway.http("GET", "/v1/config/status", key=None).status_code == 401
    status = gateway.status()
    assert status["providers"] == 2 and status["last_error"] is None and len(status["source_hash"]) == 64


def test_azure_uses_deployment_urls_api_version_and_api_key_header(start_gateway, upstream):
    config = """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: azure
    api: azure-secret
    model:
      - my-deployment: gpt-4o
    preferences: {api_version: 2024-06-01}
""" + keys_yaml()
    gateway = start_gateway(config.replace("{fake:p1}", upstream.base_url("p1").removesuffix("/v1")), upstream)
    reply = gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from upstream"
    seen = upstream.seen[-1]
    assert seen.path == "/p1/openai/deployments/my-deployment/chat/completions"
    assert seen.query == "api-version=2024-06-01"
    assert seen.headers["api-key"] == "azure-secret" and "authorization" not in seen.headers
    chunks = list(gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert streamed_text(chunks) == "Hello from upstream"
