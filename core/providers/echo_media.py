"""`engine: echo` for images, speech and moderations: small valid answers made locally, so
an operator can try these endpoints (and their billing) with no vendor account.

An image is a 1x1 transparent PNG (streamed as one completed event when asked), speech a tenth of a second of silence as WAV whatever
format was asked for, a moderation never flags anything. Usage is what a vendor's would be:
the images made, the characters read aloud.
"""

from __future__ import annotations

import json
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from core.providers.base import Reply, UpstreamCall, UpstreamStream
from core.usage import Usage

PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR4nGNgAAIAAAUAAXpeqz8AAAAASUVORK5CYII="
WAV_CONTENT_TYPE = "audio/wav"
# OpenAI's moderation categories (omni-moderation-latest).
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def silent_wav(rate: int = 8000, samples: int = 800) -> bytes:
    """A mono 16-bit PCM WAV file of silence."""
    data = bytes(2 * samples)
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1, rate, 2 * rate, 2, 16, b"data", len(data))
    return header + data


SILENT_WAV = silent_wav()


class EchoMediaAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        if call.endpoint == "audio/speech":
            return EchoAudioStream(Usage(characters=len(call.body["input"])))
        if call.endpoint == "moderations":
            return Reply(200, _dumps(_moderation(call)), Usage())
        n = call.body.get("n") or 1
        if call.stream:
            return EchoImageStream(n)
        return Reply(200, _dumps(_images(call, n)), Usage(images=n))


def _images(call: UpstreamCall, n: int) -> dict[str, Any]:
    """`n` images, as data URLs when `response_format: url` is asked for (there is no server to link to)."""
    if call.body.get("response_format") == "url":
        image = {"url": f"data:image/png;base64,{PNG_BASE64}"}
    else:
        image = {"b64_json": PNG_BASE64}
    return {"created": int(time.time()), "data": [{**image, "revised_prompt": call.body["prompt"]} for _ in range(n)]}


def _moderation(call: UpstreamCall) -> dict[str, Any]:
    """One result per text (or one for a list of parts), none flagged."""
    value = call.body["input"]
    count = len(value) if isinstance(value, list) and all(isinstance(item, str) for item in value) else 1
    result = {
        "flagged": False,
        "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
        "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
        "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
    }
    return {"id": f"modr-{secrets.token_hex(8)}", "model": call.route.public_name, "results": [result] * count}


def _dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


class EchoAudioStream(UpstreamStream):
    """The silent WAV in two chunks, as a vendor streams audio."""

    binary = True
    content_type = WAV_CONTENT_TYPE

    def __init__(self, usage: Usage):
        super().__init__()
        self.usage = self.partial_usage = usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield SILENT_WAV[:44]
        yield SILENT_WAV[44:]
        self.complete = True

    def close(self) -> None:
        pass


class EchoImageStream(UpstreamStream):
    """A GPT image model's stream: one `image_generation.completed` event per image."""

    def __init__(self, n: int):
        super().__init__()
        self._n = n
        self.usage = Usage(images=n)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        event = {"type": "image_generation.completed", "b64_json": PNG_BASE64, "created_at": int(time.time()), "output_format": "png", "size": "1x1"}
        for _ in range(self._n):
            yield b"event: image_generation.completed\ndata: " + _dumps(event) + b"\n\n"
        self.complete = True

    def close(self) -> None:
        pass
