"""Streamed transcriptions (`stream: true`, gpt-4o-transcribe and later): OpenAI's
`transcript.text.delta` events relayed as they come, usage read from `transcript.text.done`.

A stream that ends without a usage report is billed by the duration measured from the upload
(else its size bound, estimated), as a text transcript is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from core.config import ModelRoute
from core.errors import GatewayError, bad_gateway
from core.providers.base import UpstreamStream
from core.sse import DONE, SseSplitter, encode_event, event_data
from core.usage import Usage, text_bytes

DELTA = "transcript.text.delta"
DONE_EVENT = "transcript.text.done"


class TranscriptStream(UpstreamStream):
    """Relays a transcription's events. `usage_of(event)` is the usage a done event reports;
    `usage_of(None)` what to bill when none came (the measured duration)."""

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, usage_of: Callable[[dict[str, Any] | None], Usage]):
        super().__init__()
        self._response = response
        self._route = route
        self._usage_of = usage_of
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.content.iter_any():
                events = splitter.feed(chunk)
                for event in events:
                    self._observe(event)
                if events:
                    yield b"".join(events)
            self._finished = True
        except TimeoutError:
            self.error = GatewayError(
                504, "api_error", "upstream_timeout", f"Provider '{self._route.provider.name}' stopped sending for {self._route.timeout:g}s."
            )
        except aiohttp.ClientError:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if self.error is None and not self.complete:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' ended the stream early.", "upstream_stream_broken")
        if self.usage is None:
            self.usage = self._usage_of(None)  # no report: the measured (or bounded) duration
        if self.error is not None:
            yield encode_event(orjson.dumps(self.error.body()))

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

    def close(self) -> None:
        # Cut short: drop the connection (that cancels the transcription); finished: reuse it.
        if self._finished:
            self._response.release()
        else:
            self._response.close()
