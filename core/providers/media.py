"""Images, speech and moderations on OpenAI-style providers (`openai`, `azure`; `echo` answers
them locally, core/providers/echo_media.py).

The JSON body passes through with the model renamed, to the URL the engine's adapter builds
(`{base_url}/images/generations`, Azure's deployment URL). What is billed is read from the
answer: the images in its `data` list, with the vendor's token usage when it reports it
(gpt-image-1), never estimated; speech is billed by the characters of its input, and its
audio is relayed as it arrives (AudioStream); moderations cost a price per call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from core.config import ModelRoute
from core.providers.base import Adapter, Reply, UpstreamCall, UpstreamFailure, UpstreamStream, final_body
from core.providers.echo_media import EchoMediaAdapter
from core.providers.http import open_stream, post_json
from core.providers.openai import AzureAdapter, OpenAIAdapter
from core.providers.relay import RelayedEvents, stream_broken_off, stream_timed_out
from core.sse import event_data
from core.usage import Usage, reported_count

OCTET_STREAM = "application/octet-stream"


class MediaAdapter:
    """One OpenAI-style engine's media calls, sent where its chat adapter sends (`target`)."""

    def __init__(self, engine: OpenAIAdapter):
        self.engine = engine

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        url, headers = self.engine.target(call)
        payload = orjson.dumps(final_body(call, {**call.body, "model": call.route.upstream_name}))
        if call.endpoint == "audio/speech":
            return await open_audio(http, url, headers, payload, call)
        if call.stream:  # GPT image models stream partial images, then each one completed
            return ImageStream(await open_stream(http, url, headers, payload, call), call.route, call.body.get("n") or 1)
        body, data = await post_json(http, url, headers, payload, call)
        usage = _ANSWER_USAGE[call.endpoint](data)
        if usage is None:
            raise UpstreamFailure.invalid(call.route)
        return Reply(200, body, usage)


def image_usage(data: Any) -> Usage | None:
    """An images answer's usage: one image per item of `data`, exact; the vendor's token
    counts as well when it reports both (GPT image models). None if it is no answer."""
    images = data.get("data") if isinstance(data, dict) else None
    if not isinstance(images, list):
        return None
    tokens = _token_usage(data.get("usage"))
    if tokens is None:  # half a report is no report: billed per image
        return Usage(images=len(images))
    return Usage(prompt_tokens=tokens.prompt_tokens, completion_tokens=tokens.completion_tokens, images=len(images))


def moderation_usage(data: Any) -> Usage | None:
    """A moderation is billed per call: no tokens, nothing estimated. None if it is no answer."""
    return Usage() if isinstance(data, dict) and isinstance(data.get("results"), list) else None


_ANSWER_USAGE: dict[str, Callable[[Any], Usage | None]] = {"images/generations": image_usage, "moderations": moderation_usage}


async def open_audio(http: aiohttp.ClientSession, url: str, headers: dict[str, str], payload: bytes, call: UpstreamCall) -> AudioStream:
    """Start the speech answer and read its first bytes. Until they arrive nothing has gone to
    the client, so a failure up to then is one another provider may be tried for."""
    route = call.route
    response = await open_stream(http, url, headers, payload, call)
    try:
        first = await response.content.readany()
    except TimeoutError:
        response.close()
        raise UpstreamFailure.timeout(route) from None
    except aiohttp.ClientError:
        response.close()
        raise UpstreamFailure(stream_broken_off(route), retryable=True) from None
    if not first:
        response.release()
        raise UpstreamFailure.invalid(route)
    return AudioStream(response, route, first, Usage(characters=len(call.body["input"])))


class AudioStream(UpstreamStream):
    """The upstream's audio, relayed chunk by chunk as it arrives, in its content type.

    Its usage is known from the start (the characters read aloud) and is what the vendor
    charges once it has begun: a client that leaves mid-audio is billed it all the same.
    `complete` turns True at the upstream's end of stream (audio has no end marker).
    """

    binary = True

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, first: bytes, usage: Usage):
        super().__init__()
        self.content_type = response.headers.get("Content-Type", OCTET_STREAM)
        self.usage = self.partial_usage = usage
        self._response = response
        self._route = route
        self._first = first
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            yield self._first
            async for chunk in self._response.content.iter_any():
                yield chunk
            self._finished = self.complete = True
        except TimeoutError:
            self.error = stream_timed_out(self._route)
        except aiohttp.ClientError:
            self.error = stream_broken_off(self._route)
        finally:
            self.close()

    def close(self) -> None:
        # Cut short, the connection is dropped (that stops the vendor); finished, it is reused.
        if self._finished:
            self._response.release()
        else:
            self._response.close()


COMPLETED_IMAGE = b"image_generation.completed"


class ImageStream(RelayedEvents):
    """A GPT image model's stream (`image_generation.partial_image` events, then one
    `image_generation.completed` per image, which carries the image's token usage), relayed
    as it comes. Only completed events are parsed: partial images pass through untouched.

    Billed for the images completed, by the tokens their events report when each reports
    them; a stream the client leaves before its last image is billed the `n` images it asked
    for, as the vendor goes on to make them (see `close`).
    """

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, requested: int):
        super().__init__(response, route)
        self._requested = requested
        self._completed: list[Usage | None] = []  # each completed image's token usage, if reported

    def _relay(self, events: list[bytes]) -> list[bytes]:
        for event in events:
            if COMPLETED_IMAGE in event:
                self._observe(event)
        return events

    def _observe(self, event: bytes) -> None:
        data = event_data(event)
        try:
            parsed = orjson.loads(data) if data is not None else None
        except ValueError:
            return
        if not isinstance(parsed, dict) or parsed.get("type") != "image_generation.completed":
            return
        self._completed.append(_token_usage(parsed.get("usage")))
        self.usage = self._images_usage()
        self.complete = len(self._completed) >= self._requested

    def _images_usage(self) -> Usage:
        images = len(self._completed)
        if any(usage is None for usage in self._completed):
            return Usage(images=images)
        reported = [usage for usage in self._completed if usage is not None]
        return Usage(sum(u.prompt_tokens for u in reported), sum(u.completion_tokens for u in reported), images=images)

    def close(self) -> None:
        super().close()
        if self._finished:
            return
        if self.error is None and not self.complete:  # the client left: the vendor makes and bills them all
            self.usage = Usage(images=self._requested, estimated=True)


def _token_usage(reported: Any) -> Usage | None:
    """A GPT image model's `usage` (input and output tokens), or None if it lacks either."""
    tokens = reported if isinstance(reported, dict) else {}
    prompt, completion = reported_count(tokens.get("input_tokens")), reported_count(tokens.get("output_tokens"))
    return None if prompt is None or completion is None else Usage(prompt_tokens=prompt, completion_tokens=completion)


MEDIA_ADAPTERS: dict[str, Adapter] = {"openai": MediaAdapter(OpenAIAdapter()), "azure": MediaAdapter(AzureAdapter()), "echo": EchoMediaAdapter()}


def media_adapter_for(engine: str) -> Adapter:
    """Routing sends these endpoints to these engines alone (core/endpoints.py SERVED_BY)."""
    return MEDIA_ADAPTERS[engine]
