"""`engine: echo` for the multipart endpoints, so the example config can demo them: a
transcript that says how long the audio was (billed by that duration, as the vendor's
`usage: {"type": "duration"}` would be), and `n` one-pixel PNGs for image edits."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from core.providers.base import SSE_CONTENT_TYPE, Reply, UpstreamCall
from core.sse import encode_event
from core.uploads import Upload
from core.uploads.audio_length import estimate_audio_ms
from core.usage import Usage

# A 1x1 transparent PNG, base64: what every echoed image edit returns.
PIXEL_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
_TEXT_FORMATS = {"text": "text/plain; charset=utf-8", "srt": "application/x-subrip", "vtt": "text/vtt"}


class EchoUploadAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply:
        assert call.upload is not None
        if call.endpoint == "images/edits":
            return _edited_images(call)
        return _transcript(call, call.upload)


def _transcript(call: UpstreamCall, upload: Upload) -> Reply:
    audio = upload.file("file")
    measured = upload.audio_ms
    heard_ms = measured if measured is not None else estimate_audio_ms(audio.size if audio is not None else 0)
    seconds = heard_ms / 1000
    usage = Usage(audio_ms=heard_ms, estimated=measured is None)
    text = f"Echo: {seconds:g} seconds of audio."
    if call.stream:  # the whole event stream in one answer: the client reads it as it reads any
        events: list[dict[str, Any]] = [{"type": "transcript.text.delta", "delta": word} for word in _words(text)]
        events.append({"type": "transcript.text.done", "text": text, "usage": {"type": "duration", "seconds": seconds}})
        return Reply(200, b"".join(encode_event(json.dumps(event).encode()) for event in events), usage, SSE_CONTENT_TYPE)
    response_format = call.body.get("response_format") or "json"
    if response_format in _TEXT_FORMATS:
        return Reply(200, text.encode(), usage, _TEXT_FORMATS[str(response_format)])
    answer: dict[str, Any] = {"text": text, "usage": {"type": "duration", "seconds": seconds}}
    if response_format == "verbose_json":
        task = "translate" if call.endpoint == "audio/translations" else "transcribe"
        answer = {"task": task, "language": "english", "duration": seconds, "text": text, "segments": []}
    return Reply(200, json.dumps(answer).encode(), usage)


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(f" {word}" for word in words[1:])]


def _edited_images(call: UpstreamCall) -> Reply:
    raw = call.body.get("n")
    count = int(raw) if isinstance(raw, str) and raw.isdigit() else 1  # checked on arrival (core/uploads/request.py)
    answer = {"created": int(time.time()), "data": [{"b64_json": PIXEL_PNG_B64}] * count}
    return Reply(200, json.dumps(answer).encode(), Usage(images=count))
