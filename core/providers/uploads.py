"""The multipart endpoints upstream (transcriptions, translations, image edits): the form is
rebuilt as it arrived, `model` renamed to the route's upstream name, the spooled files
streamed from their first byte on every attempt (failover sends them again).

OpenAI-style providers only (core/endpoints.py): OpenAI `{base}/audio/transcriptions`,
Azure `/openai/deployments/{deployment}/audio/transcriptions?api-version=...`. The answer
is relayed with its content type: JSON (`json`, `verbose_json`, images) or text (`text`,
`srt`, `vtt`), or a transcription's event stream (core/providers/transcript_stream.py).
Usage: the vendor's when it reports one, else the duration measured from the upload, else
the admission's estimate (marked estimated).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from core.errors import bad_gateway
from core.providers.base import JSON_CONTENT_TYPE, Adapter, Reply, UpstreamCall, UpstreamFailure
from core.providers.echo_uploads import EchoUploadAdapter
from core.providers.http import open_stream, post
from core.providers.openai import AzureAdapter, OpenAIAdapter
from core.providers.transcript_stream import TranscriptStream
from core.uploads import AUDIO_ENDPOINTS, Upload, UploadedFile
from core.uploads.audio_length import estimate_audio_ms
from core.usage import Usage, reported_count

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


class UploadAdapter:
    """Sends the form to an OpenAI-style provider; `urls` is that engine's JSON adapter,
    whose URL and credentials the form reuses (not its JSON Content-Type)."""

    def __init__(self, urls: OpenAIAdapter):
        self.urls = urls

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | TranscriptStream:
        url, headers = self.urls.target(call)
        headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
        if call.stream:  # a transcription (core/uploads/request.py refuses the others)
            upload = call.upload
            response = await open_stream(http, url, headers, upstream_form(call), call)
            return TranscriptStream(response, call.route, lambda done: audio_usage(done, upload))
        body, content_type = await post(http, url, headers, upstream_form(call), call)
        return read_answer(call, body, content_type)


def upstream_form(call: UpstreamCall) -> aiohttp.MultipartWriter:
    """The client's form in its order, every field as sent but `model`, the route's upstream name."""
    assert call.upload is not None
    form = aiohttp.MultipartWriter("form-data")
    for name, value in call.upload.parts:
        if isinstance(value, UploadedFile):
            form.append_payload(SpooledFilePayload(value)).set_content_disposition("form-data", name=name, filename=value.filename)
        else:
            text = call.route.upstream_name if name == "model" else value
            form.append(text).set_content_disposition("form-data", name=name)
    return form


class SpooledFilePayload(Payload):
    """A spooled upload as an aiohttp payload of known size (so the form has a
    Content-Length), read from its first byte each time it is written. Closing it leaves
    the spool open: the endpoint closes the upload once the answer is sent."""

    def __init__(self, file: UploadedFile):
        super().__init__(file, content_type=file.content_type, filename=file.filename)
        self._size = file.size

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        size = self._value.size
        remaining = size if content_length is None else min(content_length, size)
        for chunk in self._value.chunks():
            if remaining <= 0:
                return
            await writer.write(chunk[:remaining])
            remaining -= len(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value.chunks()).decode(encoding, errors)


def read_answer(call: UpstreamCall, body: bytes, content_type: str) -> Reply:
    """The answer as it is relayed, and its usage. A JSON answer must be the endpoint's
    object (with its `text`, or images' `data` list); a text answer (`text`, `srt`, `vtt`)
    is one only for transcriptions and translations."""
    assert call.upload is not None
    if not content_type.lower().startswith(JSON_CONTENT_TYPE):
        if call.endpoint not in AUDIO_ENDPOINTS:
            raise UpstreamFailure.invalid(call.route)
        relayed = content_type if content_type and content_type.isascii() and content_type.isprintable() else TEXT_CONTENT_TYPE
        return Reply(200, body, audio_usage(None, call.upload), relayed)
    try:
        data = orjson.loads(body)
    except ValueError:
        raise UpstreamFailure(bad_gateway(f"Provider '{call.route.provider.name}' returned a response that is not JSON."), retryable=True) from None
    answer = data.get("text" if call.endpoint in AUDIO_ENDPOINTS else "data") if isinstance(data, dict) else None
    if not isinstance(answer, str if call.endpoint in AUDIO_ENDPOINTS else list):
        raise UpstreamFailure.invalid(call.route)  # an error object or another shape: no answer
    if call.endpoint in AUDIO_ENDPOINTS:
        return Reply(200, body, audio_usage(data, call.upload))
    images = data["data"]
    prompt, completion = _token_counts(data.get("usage"))
    return Reply(200, body, Usage(prompt_tokens=prompt, completion_tokens=completion, images=len(images)))


def audio_usage(data: dict[str, Any] | None, upload: Upload | None) -> Usage:
    """What a transcription heard: the vendor's `usage` (`{"type": "duration", "seconds"}`, or
    `{"type": "tokens", ...}` as gpt-4o-transcribe reports), else verbose_json's `duration`,
    else the duration measured from the upload, else the admission's estimate (estimated)."""
    usage = data.get("usage") if data is not None else None
    usage = usage if isinstance(usage, dict) else {}
    heard_ms = _milliseconds(usage.get("seconds")) if usage.get("type") == "duration" else None
    if heard_ms is None and data is not None:
        heard_ms = _milliseconds(data.get("duration"))
    if heard_ms is None and upload is not None:
        heard_ms = upload.audio_ms
    prompt, completion = _token_counts(usage) if usage.get("type") == "tokens" else (0, 0)
    if heard_ms is None:
        audio = upload.file("file") if upload is not None else None
        estimate = estimate_audio_ms(audio.size if audio is not None else 0)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, audio_ms=estimate, estimated=not (prompt or completion))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, audio_ms=heard_ms)


def _milliseconds(seconds: Any) -> int | None:
    """Seconds a vendor reported (a non-negative number) in whole milliseconds, rounded half up."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0 or seconds == float("inf"):
        return None
    return int((Decimal(str(seconds)) * 1000).to_integral_value(rounding=ROUND_HALF_UP))


def _token_counts(usage: Any) -> tuple[int, int]:
    """(input, output) tokens of the media endpoints' usage objects; 0 for what is missing."""
    if not isinstance(usage, dict):
        return 0, 0
    return reported_count(usage.get("input_tokens")) or 0, reported_count(usage.get("output_tokens")) or 0


_UPLOAD_ADAPTERS: dict[str, Adapter] = {
    "openai": UploadAdapter(OpenAIAdapter()),
    "azure": UploadAdapter(AzureAdapter()),
    "echo": EchoUploadAdapter(),
}


def upload_adapter_for(engine: str) -> Adapter:
    """Routing sends these endpoints to OpenAI-style engines only (core/endpoints.py SERVED_BY)."""
    return _UPLOAD_ADAPTERS[engine]
