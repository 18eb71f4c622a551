"""Streamed transcriptions (`stream: true`, gpt-4o-transcribe and later): OpenAI's
`transcript.text.delta` events relayed as they come, usage read from `transcript.text.done`.

A stream that ends without a usage report is billed by the duration measured from the upload
(else its size bound, estimated), as a text transcript is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from core.config import ModelRoute
from core.providers.relay import RelayedEvents
from core.sse import DONE, event_data
from core.usage import Usage, text_bytes

DELTA = "transcript.text.delta"
DONE_EVENT = "transcript.text.done"


class TranscriptStream(RelayedEvents):
    """Relays a transcription's events. `usage_of(event)` is the usage a done event reports;
    `usage_of(None)` what to bill when none came (the measured duration)."""

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, usage_of: Callable[[dict[str, Any] | None], Usage]):
        super().__init__(response, route)
        self._usage_of = usage_of
        # Billed from the start: the measured (or bounded) duration, which the vendor charges
        # once it has begun, however the stream ends (a client leaving, a cut); the done
        # event's report replaces it.
        self.usage = self.partial_usage = usage_of(None)

    def _relay(self, events: list[bytes]) -> list[bytes]:
        for event in events:
            self._observe(event)
        return events

    def _observe(self, event: bytes) -> None:
        data = event_data(event)
        if data is None or data == DONE:
            return
        try:
            payload = orjson.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if payload.get("type") == DELTA:
            self.completion_text_bytes += text_bytes(payload.get("delta"))
        elif payload.get("type") == DONE_EVENT:
            self.usage = self._usage_of(payload)
            self.complete = True
