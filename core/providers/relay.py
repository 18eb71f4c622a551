"""The relay every server-sent-events upstream stream shares: whole events passed on as they
arrive, read only as far as billing needs, and an end that says how the stream failed.

Chat (OpenAIStream), Responses, image and transcription streams differ only in what they
read from an event and in the shape of their last error event; how a stream is read, when it
counts as broken, and how its connection ends is the same for all, and lives here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator

import aiohttp
import orjson

from core.config import ModelRoute
from core.errors import GatewayError, bad_gateway
from core.providers.base import UpstreamStream
from core.sse import SseSplitter, encode_event


def stream_timed_out(route: ModelRoute) -> GatewayError:
    return GatewayError(504, "api_error", "upstream_timeout", f"Provider '{route.provider.name}' stopped sending for {route.timeout:g}s.")


def stream_broken_off(route: ModelRoute) -> GatewayError:
    return bad_gateway(f"Provider '{route.provider.name}' broke off the stream.", "upstream_stream_broken")


def stream_ended_early(route: ModelRoute) -> GatewayError:
    return bad_gateway(f"Provider '{route.provider.name}' ended the stream early.", "upstream_stream_broken")


class RelayedEvents(UpstreamStream):
    """An upstream SSE stream relayed event by event (never a partial event: an error event
    may have to follow). A stream that stops before its subclass saw it end (`complete`), or
    with half an event, failed; its last event tells the client so (`error_event`)."""

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute):
        super().__init__()
        self._response = response
        self._route = route
        self._finished = False

    @abstractmethod
    def _relay(self, events: list[bytes]) -> list[bytes]:
        """Read what billing needs from one read's events; the ones the client gets."""

    def error_event(self, error: GatewayError) -> bytes | None:
        """The client's last event for a failed stream (None: it has had the upstream's own)."""
        return encode_event(orjson.dumps(error.body()))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.content.iter_any():
                out = self._relay(splitter.feed(chunk))
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
            self._finished = True
        except TimeoutError:
            self.error = stream_timed_out(self._route)
        except aiohttp.ClientError:
            self.error = stream_broken_off(self._route)
        finally:
            self.close()
        if self.error is None and (splitter.rest().strip() or not self.complete):
            self.error = stream_ended_early(self._route)
        if self.error is not None:
            event = self.error_event(self.error)
            if event is not None:
                yield event

    def close(self) -> None:
        # A stream cut short must drop its connection (that is what cancels the upstream
        # generation); a finished one goes back to the pool.
        if self._finished:
            self._response.release()
        else:
            self._response.close()
