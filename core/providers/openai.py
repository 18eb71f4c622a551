"""OpenAI and OpenAI-compatible upstreams: the body passes through with the model renamed.

Streams ask the upstream for a final usage chunk (`stream_options.include_usage`) so billing
uses the vendor's numbers; the extra chunk is dropped again if the client did not ask for it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from core.config import ModelRoute
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamFailure, UpstreamStream, final_body
from core.providers.http import open_stream, post_json
from core.providers.relay import RelayedEvents
from core.request_checks import too_deeply_nested
from core.sse import DONE, event_data
from core.usage import text_bytes, usage_from_openai

AZURE_API_VERSION = "2024-10-21"


class OpenAIAdapter:
    """OpenAI itself and any OpenAI-compatible API: `{base_url}/{endpoint}`, bearer key."""

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        route = call.route
        return f"{route.provider.base_url}/{call.endpoint}", {
            "Authorization": f"Bearer {call.upstream_key}",
            "Content-Type": JSON_CONTENT_TYPE,
            **route.provider.headers,
        }

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        url, headers = self.target(call)
        try:
            payload = orjson.dumps(upstream_body(call))
        except orjson.JSONEncodeError:  # a /v1/messages body at the nesting cap, one level deeper once translated
            raise too_deeply_nested() from None
        if call.stream:
            return OpenAIStream(await open_stream(http, url, headers, payload, call), call.route, call.client_wants_usage)
        body, data = await post_json(http, url, headers, payload, call)
        if not is_answer(call.endpoint, data):
            raise UpstreamFailure.invalid(call.route)
        return Reply(200, body, usage_from_openai(data, call.endpoint != "embeddings"))


class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: the upstream model name is the deployment; `api-key` header; `api-version`."""

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        route = call.route
        url = f"{route.provider.base_url}/openai/deployments/{quote(route.upstream_name, safe='')}/{call.endpoint}?api-version={quote(route.provider.api_version or AZURE_API_VERSION)}"
        return url, {"api-key": call.upstream_key, "Content-Type": JSON_CONTENT_TYPE, **route.provider.headers}


# The list every answer of an endpoint has: without it no OpenAI client can use the answer.
_ANSWER_LISTS = {"chat/completions": "choices", "completions": "choices", "embeddings": "data"}


def is_answer(endpoint: str, data: Any) -> bool:
    """A 200's JSON is relayed when it is an object with its endpoint's list (`choices`,
    `data`), whatever is inside: odd items are the client's to judge and billing estimates
    them. Anything else (an error object, a bare list) is no answer."""
    return isinstance(data, dict) and isinstance(data.get(_ANSWER_LISTS.get(endpoint, "choices")), list)


def upstream_body(call: UpstreamCall) -> dict[str, Any]:
    body = final_body(call, {**call.body, "model": call.route.upstream_name})
    if call.stream and call.endpoint != "embeddings":
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return body


class OpenAIStream(RelayedEvents):
    """Relays the upstream's events, reading only what billing needs.

    Most events are text deltas: they pass through unparsed and are kept (as the bytes they
    already are) in case the stream ends without a usage report and the text has to be
    estimated. Only an event that carries a usage object is parsed on the way.
    """

    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, client_wants_usage: bool):
        self._unread: list[bytes] = []  # text events not yet counted (see completion_text_bytes)
        self._unread_size = 0
        super().__init__(response, route)
        self._client_wants_usage = client_wants_usage

    @property  # type: ignore[override]
    def completion_text_bytes(self) -> int:
        if self._unread:
            self._count_unread()
        return self._text_bytes

    @completion_text_bytes.setter
    def completion_text_bytes(self, value: int) -> None:
        self._text_bytes = value

    def _relay(self, events: list[bytes]) -> list[bytes]:
        return [event for event in events if self._observe(event)]

    def _observe(self, event: bytes) -> bool:
        """Record usage and streamed text from one event; say whether the client should see it."""
        data = event_data(event)
        if data is None:
            return True
        if data == DONE:
            self.complete = True
            return True
        if not _may_carry_usage(data):
            self._unread.append(data)
            self._unread_size += len(data)
            if self._unread_size > MAX_UNREAD_BYTES:
                self._count_unread()
            return True
        try:
            chunk = orjson.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        usage = usage_from_openai(chunk)
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        self._text_bytes += _chunk_text_bytes(chunk)
        return self._client_wants_usage or usage is None or bool(choices)

    def _count_unread(self) -> None:
        """Count the text of the events kept so far (bounded: called past MAX_UNREAD_BYTES)."""
        for data in self._unread:
            try:
                self._text_bytes += _chunk_text_bytes(orjson.loads(data))
            except ValueError:
                continue
        self._unread.clear()
        self._unread_size = 0


MAX_UNREAD_BYTES = 256 * 1024


def _may_carry_usage(data: bytes) -> bool:
    """False for an event whose `usage` is absent or null: no parse needed. (A `"usage"`
    inside a content string is escaped, so a hit is a real key or, harmlessly, a full parse.)"""
    at = data.find(b'"usage"')
    return at >= 0 and not data[at + 7 : at + 24].lstrip(b" \t:").startswith(b"null")


def _chunk_text_bytes(chunk: Any) -> int:
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    return sum(_choice_text_bytes(choice) for choice in choices) if isinstance(choices, list) else 0


def _choice_text_bytes(choice: Any) -> int:
    if not isinstance(choice, dict):
        return 0
    delta = choice.get("delta")
    if isinstance(delta, dict):  # every field checked for its type: a vendor's odd one counts 0, never raises
        # The answer, the reasoning some vendors stream beside it (DeepSeek), tool call arguments.
        tool_calls, reasoning = delta.get("tool_calls"), delta.get("reasoning_content")
        size = text_bytes(delta.get("content")) + (text_bytes(reasoning) if reasoning is not None else 0)
        for tool_call in tool_calls if isinstance(tool_calls, list) else ():
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict):
                size += text_bytes(function.get("arguments"))
        return size
    return text_bytes(choice.get("text"))
