"""Images, speech and moderations end to end: the real gateway, the official openai SDK, a
fake OpenAI-style vendor, the SQLite ledger."""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from decimal import Decimal

import openai
import pytest
from starlette.responses import StreamingResponse

from test.conftest import ADMIN_KEY, clear_of_window_edge
from test.servers import fail, image_stream_like, images_like, moderation_like, speech_like

TOKEN_KEY = "sk-media-token-0001"
COUNT_KEY = "sk-media-count-0002"
POOR_KEY = "sk-media-poor-0003"
LIMITED_KEY = "sk-media-limited-0004"

CONFIG = f"""
providers:
  - provider: claude
    engine: anthropic
    base_url: {{fake:p3}}
    api: k3
    model: [claude-only, mixed]
  - provider: p1
    base_url: {{fake:p1}}
    api: k1
    model: [dall-e-3, gpt-image-1, tts-1, omni-moderation-latest, text-moderation-007, mixed]
  - provider: p2
    base_url: {{fake:p2}}
    api: k2
    model: [dall-e-3, tts-1]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {TOKEN_KEY}
    preferences: {{billing_mode: token, credits: 10}}
  - api: {COUNT_KEY}
    preferences: {{billing_mode: count, count_credits: 5}}
  - api: {POOR_KEY}
    preferences: {{billing_mode: token, credits: 0.001}}
  - api: {LIMITED_KEY}
    preferences: {{billing_mode: token, credits: 10, rate_limit: '2/min'}}
preferences:
  cooldown_period: 60
  count_billing:
    enabled: true
    default_count_price: 0.001
    model_count_prices: {{text-moderation-007: 0.002}}
  model_price:
    dall-e-3: {{image_price: 0.04}}
    gpt-image-1: {{image_price: 0.04, token_price: "5,40"}}
    tts-1: {{character_price: 15}}
    default: 1,2
"""
ECHO = f"""
providers:
  - provider: echo
    engine: echo
    model: [dall-e-3, tts-1, omni-moderation-latest]
api_keys:
  - api: {TOKEN_KEY}
    preferences: {{billing_mode: token, credits: 10}}
preferences:
  model_price:
    dall-e-3: {{image_price: 0.04}}
    tts-1: {{character_price: 15}}
"""
GPT_IMAGE_USAGE = {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210, "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
AUDIO = [b"ID3-first-frame", b"-second-frame", b"-third-frame"]
SPOKEN = "hello world"  # 11 characters: 11 * 15 / 1M USD = 165,000 nano-dollars


ROWS = "SELECT status, provider, images, characters, prompt_tokens, completion_tokens, unit_prices, cost_nanos FROM usage ORDER BY id"


def ledger_rows(gateway, sql: str = ROWS) -> list[tuple]:
    """The ledger's rows, once there are any (a stream settles when the gateway notices its end)."""
    deadline = time.monotonic() + 10
    while True:
        gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # flushes the ledger
        with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
            rows = db.execute(sql).fetchall()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def script_media(upstream, provider: str = "p1", image_usage=None, audio=AUDIO) -> None:
    """`provider` answers images, moderations and speech (by path) as OpenAI would."""
    images, speech = images_like(image_usage), speech_like(audio)

    async def handler(body, request):
        path = request.url.path
        if path.endswith("/images/generations"):
            return await images(body, request)
        if path.endswith("/moderations"):
            return await moderation_like(body, request)
        return await speech(body, request)

    upstream.script(provider, handler)


# --- images ---------------------------------------------------------------------------------


def test_images_are_billed_per_image_exactly(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(TOKEN_KEY).images.with_raw_response.generate(model="dall-e-3", prompt="a lighthouse at dusk", n=3)
    assert len(raw.parse().data) == 3
    assert Decimal(raw.headers["x-tollgate-cost"]) == Decimal("0.12")  # 3 x 0.04
    assert Decimal(raw.headers["x-tollgate-credits-remaining"]) == Decimal("9.88")
    assert ledger_rows(gateway) == [("ok", "p1", 3, 0, 0, 0, '{"image":"0.04"}', 120_000_000)]
    assert upstream.seen[-1].path == "/p1/v1/images/generations" and upstream.seen[-1].body["n"] == 3


def test_gpt_image_is_billed_by_the_tokens_it_reports(start_gateway, upstream):
    script_media(upstream, image_usage=GPT_IMAGE_USAGE)
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(TOKEN_KEY).images.with_raw_response.generate(model="gpt-image-1", prompt="a lighthouse")
    assert raw.parse().usage.output_tokens == 4160
    # 50 x 5 / 1M + 4160 x 40 / 1M
    assert Decimal(raw.headers["x-tollgate-cost"]) == Decimal("0.16665")
    assert ledger_rows(gateway) == [("ok", "p1", 1, 0, 50, 4160, '{"input":"5","output":"40"}', 166_650_000)]


def test_gpt_image_without_usage_is_billed_per_image_not_estimated(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(TOKEN_KEY).images.with_raw_response.generate(model="gpt-image-1", prompt="a lighthouse", n=2)
    assert Decimal(raw.headers["x-tollgate-cost"]) == Decimal("0.08")
    assert ledger_rows(gateway) == [("ok", "p1", 2, 0, 0, 0, '{"image":"0.04"}', 80_000_000)]


@pytest.mark.parametrize(("n", "shown"), [(0, "0"), (11, "11"), (2.5, "2.5"), ("2", "a string"), (True, "a boolean")])
def test_a_bad_n_is_a_400_naming_it(start_gateway, upstream, n, shown):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/v1/images/generations", key=TOKEN_KEY, json={"model": "dall-e-3", "prompt": "x", "n": n})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_n" and error["param"] == "n" and shown in error["message"]
    assert upstream.seen == []


def test_an_image_stream_is_relayed_and_billed_from_its_completed_event(start_gateway, upstream):
    upstream.script("p1", image_stream_like(GPT_IMAGE_USAGE))
    gateway = start_gateway(CONFIG, upstream)
    events = list(gateway.client(TOKEN_KEY).images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=1))
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[-1].usage.output_tokens == 4160
    assert ledger_rows(gateway) == [("ok", "p1", 1, 0, 50, 4160, '{"input":"5","output":"40"}', 166_650_000)]


def test_a_client_leaving_an_image_stream_is_billed_the_images_it_asked_for(start_gateway, upstream):
    between = threading.Event()
    upstream.script("p1", image_stream_like(GPT_IMAGE_USAGE, between))
    gateway = start_gateway(CONFIG, upstream)
    try:
        stream = gateway.client(TOKEN_KEY).images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=1, n=2)
        assert next(iter(stream)).type == "image_generation.partial_image"
        stream.close()
        rows = ledger_rows(gateway, "SELECT status, images, unit_prices, cost_nanos FROM usage")
    finally:
        between.set()
    assert rows == [("client_disconnected", 2, '{"image":"0.04"}', 80_000_000)]


def test_an_image_stream_ending_before_its_image_ends_with_an_error_event_unbilled(start_gateway, upstream):
    async def partial_only(body, request):
        chunk = b'event: image_generation.partial_image\ndata: {"type": "image_generation.partial_image", "b64_json": "AA=="}\n\n'
        return StreamingResponse(iter([chunk]), media_type="text/event-stream")

    upstream.script("p1", partial_only)
    gateway = start_gateway(CONFIG, upstream)
    received = []
    with pytest.raises(openai.APIError, match="ended the stream early"):
        for event in gateway.client(TOKEN_KEY).images.generate(model="gpt-image-1", prompt="x", stream=True):
            received.append(event.type)
    assert received == ["image_generation.partial_image"]
    assert ledger_rows(gateway, "SELECT status, images, cost_nanos FROM usage") == [("error", 0, 0)]  # released: nothing charged


def test_an_images_answer_without_data_is_no_answer_and_the_next_provider_is_tried(start_gateway, upstream):
    upstream.script("p1", fail(200, {"created": 1}))
    script_media(upstream, "p2")
    gateway = start_gateway(CONFIG, upstream)
    raw = gateway.client(TOKEN_KEY).images.with_raw_response.generate(model="dall-e-3", prompt="x")
    assert raw.headers["x-tollgate-provider"] == "p2" and upstream.providers_seen() == ["p1", "p2"]
    assert ledger_rows(gateway, "SELECT provider, cost_nanos FROM usage") == [("p2", 40_000_000)]


# --- moderations ----------------------------------------------------------------------------


def test_moderations_cost_their_count_price_and_nothing_by_default(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(TOKEN_KEY)
    free = client.moderations.with_raw_response.create(model="omni-moderation-latest", input="is this fine?")
    assert free.parse().results[0].flagged is False
    assert free.headers["x-tollgate-cost"] == "0"
    priced = client.moderations.with_raw_response.create(model="text-moderation-007", input=["one", "two"])
    assert priced.headers["x-tollgate-cost"] == "0.002"
    assert ledger_rows(gateway, "SELECT status, unit_prices, cost_nanos FROM usage ORDER BY id") == [
        ("ok", '{"count":"0"}', 0),
        ("ok", '{"count":"0.002"}', 2_000_000),
    ]


def test_moderation_input_must_be_text_or_a_list(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/v1/moderations", key=TOKEN_KEY, json={"model": "omni-moderation-latest", "input": 5})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_input"
    response = gateway.http("POST", "/v1/moderations", key=TOKEN_KEY, json={"model": "omni-moderation-latest", "input": "x", "stream": True})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_stream"


# --- speech ---------------------------------------------------------------------------------


def test_speech_streams_audio_as_it_arrives_and_is_billed_per_character(start_gateway, upstream):
    between = threading.Event()
    upstream.script("p1", speech_like(AUDIO, between))
    gateway = start_gateway(CONFIG, upstream)
    fallback = threading.Timer(30, between.set)  # should the relay buffer, the test fails instead of hanging
    fallback.start()
    try:
        with gateway.client(TOKEN_KEY).audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
            assert response.headers["content-type"] == "audio/mpeg"
            chunks = response.iter_bytes()
            first = next(chunks)
            assert not between.is_set(), "the first audio reached the client only after the upstream had finished"
            between.set()
            audio = first + b"".join(chunks)
    finally:
        fallback.cancel()
    assert audio == b"".join(AUDIO)
    assert upstream.seen[-1].path == "/p1/v1/audio/speech" and upstream.seen[-1].body["input"] == SPOKEN
    assert ledger_rows(gateway) == [("ok", "p1", 0, 11, 0, 0, '{"character":"15"}', 165_000)]


def test_a_client_leaving_mid_audio_is_billed_once_for_every_character(start_gateway, upstream):
    between = threading.Event()
    upstream.script("p1", speech_like(AUDIO, between))
    gateway = start_gateway(CONFIG, upstream)
    try:
        with gateway.client(TOKEN_KEY).audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
            assert next(response.iter_bytes()) == AUDIO[0]
        rows = ledger_rows(gateway, "SELECT status, characters, cost_nanos FROM usage")
    finally:
        between.set()
    assert rows == [("client_disconnected", 11, 165_000)]
    time.sleep(0.2)
    assert len(ledger_rows(gateway, "SELECT id FROM usage")) == 1


def test_audio_broken_off_upstream_is_cut_off_not_ended_with_error_text(start_gateway, upstream):
    upstream.script("p1", speech_like(AUDIO, fail_after=True))
    gateway = start_gateway(CONFIG, upstream)
    received = b""
    with pytest.raises(Exception, match="incomplete chunked read"):  # the client sees its audio cut short
        with gateway.client(TOKEN_KEY).audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
            for chunk in response.iter_bytes():
                received += chunk
    assert received == b"".join(AUDIO)  # no SSE error event written into the audio
    assert ledger_rows(gateway, "SELECT status, characters, cost_nanos FROM usage") == [("error", 11, 165_000)]


def test_speech_fails_over_before_its_first_byte(start_gateway, upstream):
    upstream.script("p1", fail(503))
    upstream.script("p2", speech_like(AUDIO))
    gateway = start_gateway(CONFIG, upstream)
    with gateway.client(TOKEN_KEY).audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
        assert response.headers["x-tollgate-provider"] == "p2"
        assert response.read() == b"".join(AUDIO)
    assert upstream.providers_seen() == ["p1", "p2"]
    assert ledger_rows(gateway, "SELECT provider, characters FROM usage") == [("p2", 11)]


def test_speech_input_must_be_text(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/v1/audio/speech", key=TOKEN_KEY, json={"model": "tts-1", "voice": "alloy", "input": ["a"]})
    assert response.status_code == 400 and response.json()["error"] | {} == {
        "message": "Invalid 'input': expected a string, got a list.",
        "type": "invalid_request_error",
        "code": "invalid_input",
        "param": "input",
    }


# --- every endpoint: payment, count keys, routing, limits ----------------------------------


def test_a_key_that_cannot_pay_gets_402_on_each_endpoint(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(POOR_KEY)  # 0.001 USD
    calls = [
        lambda: client.images.generate(model="dall-e-3", prompt="x"),  # reserves 0.04
        lambda: client.moderations.create(model="text-moderation-007", input="x"),  # 0.002
        lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 1000),  # 0.015
    ]
    for call in calls:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == 402 and caught.value.body["code"] == "credit_balance_exhausted"
    assert upstream.seen == []
    assert client.moderations.create(model="omni-moderation-latest", input="x").results  # free


def test_a_count_key_pays_one_count_credit_per_call(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(COUNT_KEY)
    raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="x", n=3)
    assert raw.headers["x-tollgate-count-credits-remaining"] == "4" and raw.headers["x-tollgate-cost"] == "0.001"
    raw = client.moderations.with_raw_response.create(model="text-moderation-007", input="x")
    assert raw.headers["x-tollgate-count-credits-remaining"] == "3" and raw.headers["x-tollgate-cost"] == "0.002"
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
        response.read()
    assert ledger_rows(gateway, "SELECT cost_type, count_charged FROM usage ORDER BY id") == [("count", 1)] * 3


def test_a_model_only_an_anthropic_provider_serves_is_a_400_unsupported_endpoint(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(TOKEN_KEY).images.generate(model="claude-only", prompt="x")
    assert caught.value.body["code"] == "unsupported_endpoint"
    assert upstream.seen == []


def test_a_mixed_model_goes_to_its_openai_provider(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(TOKEN_KEY)
    client.images.generate(model="mixed", prompt="x")
    client.moderations.create(model="mixed", input="x")
    assert client.audio.speech.create(model="mixed", voice="alloy", input=SPOKEN).read() == b"".join(AUDIO)
    assert upstream.providers_seen() == ["p1", "p1", "p1"]


def test_images_fail_over_on_a_5xx(start_gateway, upstream):
    upstream.script("p1", fail(500))
    script_media(upstream, "p2")
    gateway = start_gateway(CONFIG, upstream)
    assert len(gateway.client(TOKEN_KEY).images.generate(model="dall-e-3", prompt="x").data) == 1
    assert upstream.providers_seen() == ["p1", "p2"]


def test_a_request_rate_limit_counts_media_calls(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client(LIMITED_KEY)
    clear_of_window_edge(60)  # the 2/min window is fixed: the three calls must fall in one
    client.images.generate(model="dall-e-3", prompt="x")
    client.moderations.create(model="omni-moderation-latest", input="x")
    with pytest.raises(openai.RateLimitError):
        client.audio.speech.create(model="tts-1", voice="alloy", input=SPOKEN)
    assert len(upstream.seen) == 2


def test_azure_gets_deployment_urls_for_each_endpoint(start_gateway, upstream):
    config = f"""
providers:
  - provider: p1
    base_url: {upstream.base_url("p1").removesuffix("/v1")}
    engine: azure
    api: azure-secret
    model:
      - my-dalle: dall-e-3
      - my-tts: tts-1
      - my-mod: omni-moderation-latest
    preferences: {{api_version: 2025-04-01-preview}}
api_keys:
  - api: {TOKEN_KEY}
"""
    script_media(upstream)
    gateway = start_gateway(config, upstream)
    client = gateway.client(TOKEN_KEY)
    client.images.generate(model="dall-e-3", prompt="x")
    client.moderations.create(model="omni-moderation-latest", input="x")
    client.audio.speech.create(model="tts-1", voice="alloy", input=SPOKEN).read()
    assert [(seen.path, seen.query, seen.body["model"]) for seen in upstream.seen] == [
        ("/p1/openai/deployments/my-dalle/images/generations", "api-version=2025-04-01-preview", "my-dalle"),
        ("/p1/openai/deployments/my-mod/moderations", "api-version=2025-04-01-preview", "my-mod"),
        ("/p1/openai/deployments/my-tts/audio/speech", "api-version=2025-04-01-preview", "my-tts"),
    ]
    assert all(seen.headers["api-key"] == "azure-secret" for seen in upstream.seen)


def test_media_paths_answer_without_v1_and_their_errors_are_openai_json(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)
    response = gateway.http("POST", "/images/generations", key=TOKEN_KEY, json={"model": "dall-e-3", "prompt": "x"})
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    for path in ("/images/generations", "/audio/speech", "/moderations", "/v1/audio/speech"):
        wrong_method = gateway.http("GET", path, key=TOKEN_KEY)
        assert wrong_method.status_code == 405 and "error" in wrong_method.json(), path
    missing = gateway.http("POST", "/audio/speech", key=TOKEN_KEY, json={"model": "tts-1", "voice": "alloy"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_input"


# --- the echo engine ------------------------------------------------------------------------


def test_echo_answers_images_speech_and_moderations(start_gateway):
    gateway = start_gateway(ECHO)
    client = gateway.client(TOKEN_KEY)
    images = client.images.generate(model="dall-e-3", prompt="x", n=2, response_format="b64_json")
    assert [base64.b64decode(image.b64_json)[:8] for image in images.data] == [b"\x89PNG\r\n\x1a\n"] * 2
    assert [event.type for event in client.images.generate(model="dall-e-3", prompt="x", stream=True)] == ["image_generation.completed"]
    assert client.moderations.create(model="omni-moderation-latest", input=["a", "b"]).results[1].flagged is False
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert response.read()[:4] == b"RIFF"
    assert ledger_rows(gateway, "SELECT images, characters, cost_nanos FROM usage ORDER BY id") == [
        (2, 0, 80_000_000),
        (1, 0, 40_000_000),
        (0, 0, 0),
        (0, 11, 165_000),
    ]


# --- many at once ----------------------------------------------------------------------------


def test_sixty_image_requests_at_once_never_overspend_a_key(start_gateway, upstream):
    """Each request reserves its n=2 images (0.08 USD) before the vendor is called: with 1
    USD, exactly 12 of 60 concurrent requests are served and the key ends at 0.04, the sum of
    its ledger rows."""
    script_media(upstream)
    gateway = start_gateway(CONFIG.replace("billing_mode: token, credits: 10}", "billing_mode: token, credits: 1}", 1), upstream)
    results = gateway.fire(TOKEN_KEY, 60, lambda client: client.images.generate(model="dall-e-3", prompt="x", n=2))
    assert results.count(200) == 12 and results.count(402) == 48
    assert len(upstream.seen) == 12
    state = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][TOKEN_KEY]
    assert Decimal(str(state["remaining_credits"])) == Decimal("0.04")
    assert ledger_rows(gateway, "SELECT COUNT(*), SUM(images), SUM(cost_nanos) FROM usage WHERE status = 'ok'") == [(12, 24, 960_000_000)]


def test_fifty_speech_requests_at_once_on_a_count_key_spend_exactly_its_credits(start_gateway, upstream):
    script_media(upstream)
    gateway = start_gateway(CONFIG, upstream)  # COUNT_KEY: 5 count credits

    async def speak(client):
        async with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=SPOKEN) as response:
            await response.read()

    results = gateway.fire(COUNT_KEY, 50, speak)
    assert results.count(200) == 5 and results.count(402) == 45
    assert ledger_rows(gateway, "SELECT COUNT(*), SUM(count_charged), SUM(characters) FROM usage WHERE status = 'ok'") == [(5, 5, 55)]
