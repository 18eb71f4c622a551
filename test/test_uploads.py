"""The multipart endpoints end to end: audio transcriptions and translations, image edits,
through the real gateway with the official openai SDK, billed per minute and per image."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from core.providers.echo_uploads import PIXEL_PNG_B64
from test.conftest import ADMIN_KEY, keys_yaml
from test.servers import fail, sse

COUNT_KEY = "sk-count-uploads-0003"
POOR_KEY = "sk-poor-uploads-0004"

CONFIG = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: up-key-1
    model:
      - upstream-whisper: whisper-1
      - gpt-4o-transcribe
      - gpt-image-1
  - provider: p2
    base_url: {{fake:p2}}
    api: up-key-2
    model: [whisper-1]
  - provider: claude
    engine: anthropic
    base_url: {{fake:p3}}
    api: up-key-3
    model: [claude-only]
  - provider: echo
    engine: echo
    model: [echo-whisper, echo-image]
preferences:
  count_billing: {{enabled: true, default_count_price: 0.01}}
  model_price:
    whisper-1: {{audio_minute_price: 0.006}}
    echo-whisper: {{audio_minute_price: 0.006}}
    gpt-4o-transcribe: {{audio_minute_price: 0.006, token_price: "2.5,10"}}
    gpt-image-1: {{image_price: 0.04}}
    echo-image: {{image_price: 0.04}}
    default: 1,2
{keys_yaml()}
  - api: {COUNT_KEY}
    name: counter
    preferences: {{billing_mode: count, count_credits: 5}}
  - api: {POOR_KEY}
    name: poor
    preferences: {{billing_mode: token, credits: 0.0001}}
"""


def wav(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV of exactly `seconds`, its samples random (a corrupted copy shows)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(os.urandom(round(seconds * rate) * 2))
    return out.getvalue()


def transcribes(answer: dict[str, Any] | str, check: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    """A fake vendor's transcription: `answer` as JSON, or as text/plain if it is a string.
    `check`, when given, collects what the vendor received."""

    async def handler(body: dict[str, Any], _request: Request) -> Response:
        if check is not None:
            check.update(body)
        return PlainTextResponse(answer) if isinstance(answer, str) else JSONResponse(answer)

    return handler


def usage_rows(gateway: Any, columns: str = "model, audio_ms, images, prompt_tokens, completion_tokens, cost_nanos, unit_prices, status") -> list[tuple]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # flushes the ledger's queue
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute(f"SELECT {columns} FROM usage ORDER BY id").fetchall()


def test_transcription_is_billed_per_minute_from_the_vendors_usage_seconds(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    audio = wav(3.5)
    received: dict[str, Any] = {}
    upstream.script("p1", transcribes({"text": "hello there", "usage": {"type": "duration", "seconds": 9}}, received))
    raw = gateway.client().audio.transcriptions.with_raw_response.create(file=("talk.wav", audio, "audio/wav"), model="whisper-1", language="en")
    assert raw.parse().text == "hello there"
    # The file arrived byte for byte, `model` renamed to the provider's name, every other field as sent.
    assert received["file"] == {"filename": "talk.wav", "content_type": "audio/wav", "content": audio}
    assert received["model"] == "upstream-whisper" and received["language"] == "en"
    assert upstream.seen[-1].path == "/p1/v1/audio/transcriptions"
    # 9 s at 0.006 USD per minute.
    assert raw.headers["x-tollgate-cost"] == "0.0009"
    assert usage_rows(gateway) == [("whisper-1", 9000, 0, 0, 0, 900_000, '{"audio_minute":"0.006"}', "ok")]


def test_verbose_json_is_billed_by_its_duration(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    answer = {"task": "transcribe", "language": "english", "duration": 12.25, "text": "hi", "segments": []}
    upstream.script("p1", transcribes(answer))
    reply = gateway.client().audio.transcriptions.create(file=("a.wav", wav(1)), model="whisper-1", response_format="verbose_json")
    assert reply.duration == 12.25
    assert usage_rows(gateway, "audio_ms, cost_nanos, status") == [(12_250, 1_225_000, "ok")]


def test_a_text_transcript_is_relayed_as_text_and_billed_by_the_measured_file(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    received: dict[str, Any] = {}
    upstream.script("p1", transcribes("hello there\n", received))
    raw = gateway.client().audio.transcriptions.with_raw_response.create(file=("a.wav", wav(7.5)), model="whisper-1", response_format="text")
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.http_response.text == "hello there\n"
    assert received["response_format"] == "text"
    # No usage in a text answer: the 7.5 s the WAV plays, measured from the upload.
    assert usage_rows(gateway, "audio_ms, cost_nanos, status") == [(7500, 750_000, "ok")]


def test_translations_are_billed_per_minute(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    received: dict[str, Any] = {}
    upstream.script("p1", transcribes({"text": "hello"}, received))
    reply = gateway.client().audio.translations.create(file=("fr.wav", wav(30)), model="whisper-1", prompt="Bonjour")
    assert reply.text == "hello"
    assert upstream.seen[-1].path == "/p1/v1/audio/translations" and received["prompt"] == "Bonjour"
    assert usage_rows(gateway, "model, audio_ms, cost_nanos") == [("whisper-1", 30_000, 3_000_000)]


def test_a_token_priced_transcription_model_is_billed_by_its_reported_tokens(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    usage = {"type": "tokens", "input_tokens": 1000, "input_token_details": {"audio_tokens": 1000}, "output_tokens": 100, "total_tokens": 1100}
    upstream.script("p1", transcribes({"text": "hi", "usage": usage}))
    gateway.client().audio.transcriptions.create(file=("a.wav", wav(2)), model="gpt-4o-transcribe")
    # 1000 x 2.5 + 100 x 10 per 1M tokens; the 2 s measured from the file are recorded too.
    assert usage_rows(gateway)[0][1:] == (2000, 0, 1000, 100, 3_500_000, '{"input":"2.5","output":"10"}', "ok")


def test_image_edits_are_billed_per_image(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    png = bytes.fromhex("89504e470d0a1a0a") + os.urandom(3000)
    received: dict[str, Any] = {}

    async def edited(body: dict[str, Any], _request: Request) -> Response:
        received.update(body)
        return JSONResponse({"created": 1, "data": [{"b64_json": PIXEL_PNG_B64}, {"b64_json": PIXEL_PNG_B64}]})

    upstream.script("p1", edited)
    raw = gateway.client().images.with_raw_response.edit(image=("cat.png", png, "image/png"), prompt="add a hat", model="gpt-image-1", n=2)
    assert len(raw.parse().data) == 2
    assert received["image"]["content"] == png and received["prompt"] == "add a hat" and received["n"] == "2"
    assert upstream.seen[-1].path == "/p1/v1/images/edits"
    assert raw.headers["x-tollgate-cost"] == "0.08"
    assert usage_rows(gateway) == [("gpt-image-1", 0, 2, 0, 0, 80_000_000, '{"image":"0.04"}', "ok")]


def test_an_upload_over_the_body_limit_gets_413(start_gateway, upstream):
    gateway = start_gateway(CONFIG.replace("preferences:\n  count_billing", "preferences:\n  max_request_body_bytes: 100000\n  count_billing", 1), upstream)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().audio.transcriptions.create(file=("a.wav", wav(10)), model="whisper-1")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    assert upstream.seen == []


def test_a_chunked_upload_is_refused_while_it_streams(start_gateway, upstream):
    """No Content-Length: the gateway counts the form as it arrives and stops at the limit."""
    gateway = start_gateway(CONFIG.replace("preferences:\n  count_billing", "preferences:\n  max_request_body_bytes: 100000\n  count_billing", 1), upstream)
    boundary = "tollgate-test-boundary"

    def body():  # type: ignore[no-untyped-def]
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
        for _ in range(1000):  # 1 MB in 1 KB chunks
            yield b"x" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        response = gateway.http("POST", "/v1/audio/transcriptions", content=body(), headers=headers)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    except httpx.HTTPError:
        pass  # the server may also close the connection right after its 413
    assert upstream.seen == []


def test_a_key_that_cannot_pay_for_the_audio_gets_402(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    # 10 s of audio reserve 0.001 USD; the key has 0.0001.
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client(POOR_KEY).audio.transcriptions.create(file=("a.wav", wav(10)), model="whisper-1")
    assert caught.value.status_code == 402 and caught.value.body["code"] == "credit_balance_exhausted"
    assert upstream.seen == []


def test_a_count_key_pays_one_count_credit_per_upload(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    upstream.script("p1", transcribes({"text": "hi", "usage": {"type": "duration", "seconds": 600}}))
    raw = gateway.client(COUNT_KEY).audio.transcriptions.with_raw_response.create(file=("a.wav", wav(1)), model="whisper-1")
    assert raw.headers["x-tollgate-count-credits-remaining"] == "4"
    assert usage_rows(gateway, "cost_type, count_charged, audio_ms") == [("count", 1, 600_000)]


def test_a_model_only_an_anthropic_provider_serves_is_a_400(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().audio.transcriptions.create(file=("a.wav", wav(1)), model="claude-only")
    assert (caught.value.code, caught.value.param) == ("unsupported_endpoint", "model")
    assert upstream.seen == []


def test_failover_sends_the_whole_file_again_to_the_next_provider(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    audio = wav(70, rate=16000)  # 2.2 MB: spooled to disk, past the 1 MiB kept in memory
    received: dict[str, Any] = {}

    async def broken(_body: dict[str, Any], _request: Request) -> Response:
        return Response("down", status_code=503)

    upstream.script("p1", broken)
    upstream.script("p2", transcribes({"text": "second", "usage": {"type": "duration", "seconds": 70}}, received))
    reply = gateway.client().audio.transcriptions.create(file=("long.wav", audio), model="whisper-1")
    assert reply.text == "second" and upstream.providers_seen() == ["p1", "p2"]
    assert upstream.seen[0].body["file"]["content"] == audio and received["file"]["content"] == audio
    assert received["model"] == "whisper-1"  # p2 serves it under its public name
    assert usage_rows(gateway, "provider, audio_ms, cost_nanos") == [("p2", 70_000, 7_000_000)]


def spooled_files(directory: Path) -> list[str]:
    """This process's open files in `directory` (an unnamed temporary file shows as `#N (deleted)`)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(directory))]


def test_no_temporary_file_outlives_its_request(start_gateway, upstream, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    gateway = start_gateway(CONFIG, upstream)
    during: list[list[str]] = []

    async def looks(body: dict[str, Any], _request: Request) -> Response:
        during.append(spooled_files(spool))
        return JSONResponse({"text": "ok"})

    upstream.script("p1", looks)
    big = ("long.wav", wav(70, rate=16000))
    gateway.client().audio.transcriptions.create(file=big, model="whisper-1")
    assert len(during[0]) == 1  # the gateway's spool of the upload, on disk while the vendor reads it
    # Refused uploads: mid-way (too large), after arrival (no model), and a failed upstream.
    small_limit = CONFIG.replace("preferences:\n  count_billing", "preferences:\n  max_request_body_bytes: 1500000\n  count_billing", 1)
    with pytest.raises(openai.BadRequestError):
        gateway.client().audio.transcriptions.create(file=big, model="")
    upstream.script("p1", fail(400, {"error": {"message": "bad audio", "type": "invalid_request_error"}}))
    with pytest.raises(openai.BadRequestError):
        gateway.client().audio.transcriptions.create(file=big, model="gpt-4o-transcribe")
    with pytest.raises(openai.APIStatusError) as caught:
        start_gateway(small_limit, upstream).client().audio.transcriptions.create(file=big, model="whisper-1")
    assert caught.value.status_code == 413
    assert spooled_files(spool) == [] and os.listdir(spool) == []


def test_a_form_without_model_or_file_or_not_a_form_is_a_clear_400(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    cases = [
        ({"data": {"language": "en"}, "files": {"file": ("a.wav", wav(1))}}, "missing_model", "model"),
        ({"data": {"model": "whisper-1"}, "files": {"audio": ("a.wav", wav(1))}}, "missing_file", "file"),
        ({"json": {"model": "whisper-1", "file": "a.wav"}}, "invalid_content_type", None),
    ]
    for request, code, param in cases:
        response = gateway.http("POST", "/v1/audio/transcriptions", **request)
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    for path in ("/v1/audio/translations", "/v1/images/edits"):
        response = gateway.http("POST", path, data={"model": "whisper-1", "stream": "true"}, files={"file": ("a.wav", b"x"), "image": ("a.png", b"x")})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_stream", response.text
    response = gateway.http("POST", "/v1/images/edits", data={"model": "gpt-image-1", "prompt": "x", "n": "11"}, files={"image": ("a.png", b"png")})
    assert response.json()["error"]["code"] == "invalid_n"
    response = gateway.http("POST", "/v1/images/edits", data={"model": "gpt-image-1", "prompt": "x"}, files={"mask": ("m.png", b"png")})
    assert response.json()["error"] == {"message": "The 'image' file is required.", "type": "invalid_request_error", "code": "missing_file", "param": "image"}
    truncated = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
    response = gateway.http("POST", "/v1/audio/transcriptions", content=truncated, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_multipart"
    assert upstream.seen == []


def test_the_echo_engine_transcribes_and_edits_for_demos(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    client = gateway.client()
    reply = client.audio.transcriptions.create(file=("a.wav", wav(4.5)), model="echo-whisper")
    assert reply.text == "Echo: 4.5 seconds of audio."
    text = client.audio.transcriptions.create(file=("a.wav", wav(4.5)), model="echo-whisper", response_format="text")
    assert text == "Echo: 4.5 seconds of audio."
    edit = client.images.edit(image=("a.png", b"\x89PNG"), prompt="x", model="echo-image", n=3)
    assert [image.b64_json for image in edit.data] == [PIXEL_PNG_B64] * 3
    assert usage_rows(gateway, "audio_ms, images, cost_nanos") == [(4500, 0, 450_000), (4500, 0, 450_000), (0, 3, 120_000_000)]


def test_azure_gets_the_form_at_its_deployment_url(start_gateway, upstream):
    config = """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: azure
    api: azure-secret
    model:
      - my-whisper: whisper-1
    preferences: {api_version: 2024-06-01}
""" + keys_yaml()
    gateway = start_gateway(config.replace("{fake:p1}", upstream.base_url("p1").removesuffix("/v1")), upstream)
    received: dict[str, Any] = {}
    upstream.script("p1", transcribes({"text": "hi"}, received))
    assert gateway.client().audio.transcriptions.create(file=("a.wav", wav(1)), model="whisper-1").text == "hi"
    seen = upstream.seen[-1]
    assert seen.path == "/p1/openai/deployments/my-whisper/audio/transcriptions" and seen.query == "api-version=2024-06-01"
    assert seen.headers["api-key"] == "azure-secret" and received["model"] == "my-whisper"


def test_estimated_audio_reserves_at_the_documented_bitrate(start_gateway, upstream):
    """A file whose duration cannot be read is billed at 16 kbit/s of its size, marked estimated."""
    gateway = start_gateway(CONFIG, upstream)
    upstream.script("p1", transcribes("some words"))
    gateway.client().audio.transcriptions.create(file=("a.webm", os.urandom(20_000)), model="whisper-1", response_format="text")
    # 20,000 bytes at 2,000 bytes a second: 10 s.
    assert usage_rows(gateway, "audio_ms, cost_nanos, status") == [(10_000, 1_000_000, "estimated")]


def transcript_events(usage: dict[str, Any] | None):  # type: ignore[no-untyped-def]
    """A fake vendor's streamed transcription: two deltas, then the done event (with `usage` if given)."""

    async def handler(body: dict[str, Any], _request: Request) -> Response:
        assert body["stream"] == "true"
        done = {"type": "transcript.text.done", "text": "Hello there", **({"usage": usage} if usage else {})}
        events = [{"type": "transcript.text.delta", "delta": "Hello"}, {"type": "transcript.text.delta", "delta": " there"}, done]

        async def gen():  # type: ignore[no-untyped-def]
            for event in events:
                yield sse(event)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return handler


def test_a_streamed_transcription_is_relayed_and_billed_from_its_done_event(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    usage = {"type": "tokens", "input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100}
    upstream.script("p1", transcript_events(usage))
    events = list(gateway.client().audio.transcriptions.create(file=("a.wav", wav(2)), model="gpt-4o-transcribe", stream=True))
    assert [event.type for event in events] == ["transcript.text.delta", "transcript.text.delta", "transcript.text.done"]
    assert events[-1].text == "Hello there"
    assert usage_rows(gateway, "audio_ms, prompt_tokens, completion_tokens, cost_nanos, status") == [(2000, 1000, 100, 3_500_000, "ok")]


def test_a_streamed_transcription_without_usage_is_billed_by_the_measured_file(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    upstream.script("p1", transcript_events(None))
    events = list(gateway.client().audio.transcriptions.create(file=("a.wav", wav(20)), model="whisper-1", stream=True))
    assert events[-1].type == "transcript.text.done"
    assert usage_rows(gateway, "audio_ms, cost_nanos, status") == [(20_000, 2_000_000, "ok")]
    echoed = list(gateway.client().audio.transcriptions.create(file=("a.wav", wav(1.5)), model="echo-whisper", stream=True))
    assert "".join(event.delta for event in echoed[:-1]) == echoed[-1].text == "Echo: 1.5 seconds of audio."


def test_a_streamed_transcription_the_client_leaves_is_billed_its_measured_audio(start_gateway, upstream):
    """The vendor charges the whole file once it has begun: a client that hangs up after the
    first delta is billed the file's 20 seconds, not a few output tokens."""

    async def endless(body: dict[str, Any], _request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            while True:
                yield sse({"type": "transcript.text.delta", "delta": "word "})
                await asyncio.sleep(0.05)

        return StreamingResponse(gen(), media_type="text/event-stream")

    upstream.script("p1", endless)
    gateway = start_gateway(CONFIG, upstream)
    stream = gateway.client().audio.transcriptions.create(file=("a.wav", wav(20)), model="whisper-1", stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while not (rows := usage_rows(gateway, "audio_ms, cost_nanos, status")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rows == [(20_000, 2_000_000, "client_disconnected")]
