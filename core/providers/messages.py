"""`POST /v1/messages`: Anthropic's request format in, Anthropic's format out, any provider.

Anthropic providers get the request as it came (model renamed): nothing is lost in
translation. Every other provider gets it translated to the OpenAI chat format, and its
answer (or stream) is translated back into Anthropic's message (or events).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from core.errors import GatewayError, bad_gateway
from core.providers.anthropic import StreamUsage, anthropic_headers, delta_text_bytes, usage_from_anthropic
from core.providers.base import Adapter, Reply, UpstreamCall, UpstreamFailure, UpstreamStream, final_body, translate_batch
from core.providers.http import open_stream, post_json
from core.sse import SseSplitter, chat_chunk, event_data
from core.usage import Usage, complete_usage, estimate_prompt_tokens, estimate_usage, usage_from_openai, usage_so_far

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use", "content_filter": "refusal"}


# Anthropic's error type for each HTTP status (docs.claude.com/en/api/errors, and the types
# its SDK knows: 402 billing_error, 504 timeout_error). OpenAI's types differ: a bad key is
# its `invalid_request_error`, an empty balance its `insufficient_quota`.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(error: GatewayError) -> dict[str, Any]:
    """Anthropic's error shape, its type chosen by status (other 4xx invalid_request_error, as
    Anthropic does; other 5xx, such as a failed provider's 502, api_error)."""
    type_ = ANTHROPIC_ERROR_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": error.message}}


def _block_text(content: Any) -> str:
    """The text of a string or of a list of text blocks (a system prompt's two forms)."""
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type", "text") == "text")
    return content if isinstance(content, str) else ""


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request. A message of role `system`
    among the messages (Claude Code sends its reminders so) stays a system message where it
    is, as the chat format allows; the translators onward gather them into their own
    system prompt (core/providers/anthropic.py, gemini.py)."""
    messages: list[dict[str, Any]] = []
    system = _block_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if message.get("role") == "system":
            if text := _block_text(content):
                messages.append({"role": "system", "content": text})
            continue
        role = "assistant" if message.get("role") == "assistant" else "user"
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        parts, tool_calls, results = [], [], []
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                source = block.get("source") or {}
                url = (
                    f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}" if source.get("type") == "base64" else source.get("url", "")
                )
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use":
                tool_calls.append(
                    {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}}
                )
            elif kind == "tool_result":
                inner = block.get("content")
                text = inner if isinstance(inner, str) else "".join(b.get("text", "") for b in inner or [] if isinstance(b, dict))
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        messages.extend(results)
        if parts or tool_calls:
            entry: dict[str, Any] = {"role": role, "content": parts if parts else None}
            if tool_calls:
                entry["tool_calls"] = tool_calls
            messages.append(entry)
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    for name in ("max_tokens", "temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    if body.get("tools"):
        out["tools"] = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema") or {}}}
                        for t in body["tools"] if isinstance(t, dict)]  # fmt: skip
        choice = body.get("tool_choice") or {}
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(str(choice.get("type"))) if isinstance(choice, dict) else None
        if isinstance(choice, dict) and choice.get("type") == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif mapped:
            out["tool_choice"] = mapped
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def anthropic_usage(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": max(0, usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
    }


def to_anthropic_message(data: Any, model: str, usage: Usage) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic message."""
    choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": anthropic_usage(usage),
    }


def anthropic_event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class MessagesAdapter:
    """Serves the `messages` endpoint through any provider's adapter."""

    def __init__(self, inner: Adapter, native: bool):
        self.inner = inner
        self.native = native

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        if self.native:
            return await self._native(call, http)
        chat = dataclasses.replace(call, endpoint="chat/completions", body=to_openai(call.body))
        answer = await self.inner.send(chat, http)
        if isinstance(answer, UpstreamStream):
            return EventsFromChunks(answer, call.route.public_name, call.body)
        data = json.loads(answer.body)
        # Estimated here, where the OpenAI reply is still at hand, and shown to the client too.
        usage = complete_usage(answer.usage, lambda: estimate_usage(call.body, data))
        return Reply(200, json.dumps(to_anthropic_message(data, call.route.public_name, usage)).encode(), usage)

    async def _native(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        route = call.route
        headers = anthropic_headers(call)
        payload = json.dumps(final_body(call, {**call.body, "model": route.upstream_name}), ensure_ascii=False).encode()
        url = f"{route.provider.base_url}/messages"
        if call.stream:
            return NativeEvents(await open_stream(http, url, headers, payload, call), route.provider.name)
        body, data = await post_json(http, url, headers, payload, call)
        reported = data.get("usage") if isinstance(data, dict) else None
        return Reply(200, body, usage_from_anthropic(reported))  # None, or partial: billing estimates (the rest of) it


async def count_tokens_upstream(call: UpstreamCall, http: aiohttp.ClientSession) -> bytes:
    """Anthropic's own count of a Messages request's input (`POST /messages/count_tokens`),
    which it gives free: the client's body (model renamed) with the client's betas, its answer
    relayed as it is. Refusals come back as UpstreamFailure, as for any call."""
    route = call.route
    payload = json.dumps({**call.body, "model": route.upstream_name}, ensure_ascii=False).encode()
    body, data = await post_json(http, f"{route.provider.base_url}/messages/count_tokens", anthropic_headers(call), payload, call)
    if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
        raise UpstreamFailure.invalid(route)
    return body


class NativeEvents(UpstreamStream):
    """An Anthropic stream relayed as it is, reading its usage on the way."""

    def __init__(self, response: aiohttp.ClientResponse, provider: str):
        super().__init__()
        self._response = response
        self._provider = provider
        self._usage = StreamUsage()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.content.iter_any():
                for event in splitter.feed(chunk):
                    self._observe(event)
                yield chunk
        except (TimeoutError, aiohttp.ClientError):
            self.error = bad_gateway(f"Provider '{self._provider}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if not self.complete and self.error is None:
            self.error = bad_gateway(f"Provider '{self._provider}' ended the stream before message_stop.", "upstream_stream_broken")
        if self.error is not None:
            yield anthropic_event("error", anthropic_error_body(self.error))

    def _observe(self, event: bytes) -> None:
        raw = event_data(event)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if data.get("type") == "message_start":
            self.partial_usage = self._usage.start(data.get("message"))
        elif data.get("type") == "content_block_delta":
            self.completion_text_bytes += delta_text_bytes(data.get("delta"))
        elif data.get("type") == "message_delta":
            self.partial_usage = self._usage.delta(data.get("usage"))
            if self._usage.final:
                self.usage = self.partial_usage
        elif data.get("type") == "message_stop":
            self.complete = True
            self.usage = self.partial_usage  # None without a message_start: billing estimates it

    def close(self) -> None:
        if self.complete:
            self._response.release()
        else:
            self._response.close()


class EventsFromChunks(UpstreamStream):
    """Any provider's OpenAI-format stream re-encoded as Anthropic's stream events."""

    def __init__(self, inner: UpstreamStream, model: str, body: dict[str, Any]):
        super().__init__()
        self._inner = inner
        self._model = model
        self._body = body
        # The prompt size message_start announces when the vendor has not reported one by then
        # (OpenAI's comes at the end), and billed if it never does: client and ledger agree.
        # Estimated only then: a vendor that reports early (Gemini) spares it.
        self._announced: Usage | None = None
        self._block = -1
        self._open: str | None = None  # "text" or a tool call's index
        self._stop_reason = "end_turn"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        started = False
        try:
            async for chunk in self._inner:
                out, unreadable = translate_batch(splitter.feed(chunk), self._translate)
                if not started:  # sent with the first chunk: a vendor that reports usage early (Gemini) has by then
                    started = True
                    out.insert(0, self._message_start())
                if out:
                    yield b"".join(out)
                if unreadable is not None:
                    raise unreadable
        finally:
            self._sync()
        tail = [] if started else [self._message_start()]
        if self.error is not None:
            yield b"".join([*tail, anthropic_event("error", anthropic_error_body(self.error))])
            return
        tail += self._close_block()
        usage = anthropic_usage(complete_usage(self.usage, lambda: usage_so_far(self.partial_usage, self._body, self.completion_text_bytes)))
        tail.append(
            anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": self._stop_reason, "stop_sequence": None}, "usage": usage})
        )
        tail.append(anthropic_event("message_stop", {"type": "message_stop"}))
        self.complete = True
        yield b"".join(tail)

    def _message_start(self) -> bytes:
        usage = anthropic_usage(self._inner.partial_usage or self._announce_prompt())
        start: dict[str, Any] = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": self._model, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
        return anthropic_event("message_start", {"type": "message_start", "message": start})

    def _announce_prompt(self) -> Usage:
        if self._announced is None:
            self._announced = Usage(prompt_tokens=estimate_prompt_tokens(self._body), estimated=True)
        return self._announced

    def _sync(self) -> None:
        """Take the inner stream's figures. An error already set stays: the gateway sets one
        when it cuts the stream off (MeteredStream._end_with) and closes it only then."""
        self.usage = self._inner.usage
        self.partial_usage = self._inner.partial_usage or self._announced  # None: billing estimates the same prompt
        self.completion_text_bytes = self._inner.completion_text_bytes
        self.error = self.error or self._inner.error

    def _translate(self, event: bytes) -> list[bytes]:
        data = chat_chunk(event)
        if data is None:
            return []
        usage = usage_from_openai(data)
        if usage is not None:
            self.usage = usage
        choices = data.get("choices")
        out: list[bytes] = []
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                out += self._translate_choice(choice)
        return out

    def _translate_choice(self, choice: dict[str, Any]) -> list[bytes]:
        """One choice's delta as content block events. Every field is checked for its type, as
        OpenAIStream counts them: a vendor's odd field is skipped, never raises."""
        delta = choice.get("delta")
        content, tool_calls = (delta.get("content"), delta.get("tool_calls")) if isinstance(delta, dict) else (None, None)
        out: list[bytes] = []
        if isinstance(content, str) and content:
            if self._open != "text":
                out += self._close_block()
                out += self._start_block({"type": "text", "text": ""}, "text")
            text_delta = {"type": "content_block_delta", "index": self._block, "delta": {"type": "text_delta", "text": content}}
            out.append(anthropic_event("content_block_delta", text_delta))
        for call in tool_calls if isinstance(tool_calls, list) else ():
            if isinstance(call, dict):
                out += self._translate_tool_call(call)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._stop_reason = STOP_REASONS.get(reason, "end_turn")
        return out

    def _translate_tool_call(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        key = f"tool{call.get('index', 0)}"
        if self._open != key:
            out += self._close_block()
            block_id = call.get("id") or f"toolu_{uuid.uuid4().hex[:20]}"
            out += self._start_block({"type": "tool_use", "id": block_id, "name": function.get("name"), "input": {}}, key)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            json_delta = {"type": "content_block_delta", "index": self._block, "delta": {"type": "input_json_delta", "partial_json": arguments}}
            out.append(anthropic_event("content_block_delta", json_delta))
        return out

    def _start_block(self, block: dict[str, Any], key: str) -> list[bytes]:
        self._block += 1
        self._open = key
        return [anthropic_event("content_block_start", {"type": "content_block_start", "index": self._block, "content_block": block})]

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [anthropic_event("content_block_stop", {"type": "content_block_stop", "index": self._block})]

    def close(self) -> None:
        self._inner.close()
        self._sync()
