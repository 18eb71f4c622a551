"""OpenAI and OpenAI-compatible upstreams: the body passes through with the model renamed.

Streams ask the upstream for a final usage chunk (`stream_options.include_usage`) so billing
uses the vendor's numbers; the extra chunk is dropped again if the client did not ask for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from core.config import ModelRoute
from core.errors import GatewayError, bad_gateway
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamStream
from core.providers.http import open_stream, post_json
from core.sse import DONE, SseSplitter, encode_event, event_data
from core.usage import usage_from_openai

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
        payload = orjson.dumps(upstream_body(call))
        if call.stream:
            return OpenAIStream(await open_stream(http, url, headers, payload, call.route), call.route, call.client_wants_usage)
        body, data = await post_json(http, url, headers, payload, call.route)
        return Reply(200, body, usage_from_openai(data))


class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: the upstream model name is the deployment; `api-key` header; `api-version`."""

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        route = call.route
        url = f"{route.provider.base_url}/openai/deployments/{quote(route.upstream_name, safe='')}/{call.endpoint}?api-version={quote(route.provider.api_version or AZURE_API_VERSION)}"
        return url, {"api-key": call.upstream_key, "Content-Type": JSON_CONTENT_TYPE, **route.provider.headers}


def upstream_body(call: UpstreamCall) -> dict[str, Any]:
    body = dict(call.body)
    body["model"] = call.route.upstream_name
    if call.stream and call.endpoint != "embeddings":
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return body


class OpenAIStream(UpstreamStream):
    def __init__(self, response: aiohttp.ClientResponse, route: ModelRoute, client_wants_usage: bool):
        super().__init__()
        self._response = response
        self._route = route
        self._client_wants_usage = client_wants_usage
        self._finished = False
        self._done_seen = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.content.iter_any():
                out = [event for event in splitter.feed(chunk) if self._observe(event)]
                if out:
                    yield b"".join(out)
            self._finished = True
        except TimeoutError:
            self.error = GatewayError(
                504, "api_error", "upstream_timeout", f"Provider '{self._route.provider.name}' stopped sending for {self._route.timeout:g}s."
            )
        except aiohttp.ClientError:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if self.error is None and (splitter.rest().strip() or not self._done_seen):
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' ended the stream early.", "upstream_stream_broken")
        if self.error is not None:
            yield encode_event(json.dumps(self.error.body()).encode())

    def _observe(self, event: bytes) -> bool:
        """Record usage and streamed text from one event; say whether the client should see it."""
        data = event_data(event)
        if data == DONE:
            self._done_seen = True
            return True
        if data is None:
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
        if isinstance(choices, list):
            self.completion_text_bytes += sum(_choice_text_bytes(choice) for choice in choices)
        return self._client_wants_usage or usage is None or bool(choices)

    def close(self) -> None:
        # A stream cut short must drop its connection (that is what cancels the upstream
        # generation); a finished one goes back to the pool.
        if self._finished:
            self._response.release()
        else:
            self._response.close()


def _choice_text_bytes(choice: Any) -> int:
    if not isinstance(choice, dict):
        return 0
    delta = choice.get("delta")
    if isinstance(delta, dict):
        size = len((delta.get("content") or "").encode()) if isinstance(delta.get("content"), str) else 0
        for tool_call in delta.get("tool_calls") or ():
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                size += len(function["arguments"].encode())
        return size
    text = choice.get("text")
    return len(text.encode()) if isinstance(text, str) else 0
