"""`engine: echo`: answers locally, deterministically, with real usage numbers.

It lets a new user try Tollgate with no vendor account, and operators test configs and
load without spending money. Usage is estimated from the input with the same rules the
gateway uses for admission, so billing can be checked by hand.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from core.providers.base import Reply, UpstreamCall, UpstreamStream
from core.request_checks import output_token_limit
from core.sse import encode_event
from core.usage import BYTES_PER_TOKEN, Usage, estimate_prompt_tokens, estimate_text_tokens, message_text

EMBEDDING_DIMENSIONS = 16
_ID_PREFIX = secrets.token_hex(6)  # unique across processes and restarts, as new_request_id's
_ids = itertools.count(1)


def completion_id(endpoint: str) -> str:
    """An id shaped like OpenAI's (`chatcmpl-…`, `cmpl-…`): some clients check the prefix."""
    return f"{'chatcmpl' if endpoint == 'chat/completions' else 'cmpl'}-{_ID_PREFIX}{next(_ids):x}"


class EchoAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        if call.endpoint == "embeddings":
            return _embeddings(call)
        text = reply_text(call)
        usage = Usage(prompt_tokens=estimate_prompt_tokens(call.body), completion_tokens=estimate_text_tokens(text))
        if call.endpoint == "responses":
            response = echo_response(call, text, usage)
            return EchoResponsesStream(response, text, usage) if call.stream else Reply(200, _dumps(response), usage)
        if call.stream:
            return EchoStream(call, text, usage)
        return Reply(200, _dumps(_completion(call, text, usage)), usage)


def reply_text(call: UpstreamCall) -> str:
    """`Echo: <last user message>`, cut to `max_tokens` like a real model would be."""
    if call.endpoint == "chat/completions":
        messages = call.body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        said = message_text(users[-1].get("content")) if users else ""
    elif call.endpoint == "responses":
        said = _last_user_input(call.body.get("input"))
    else:
        prompt = call.body.get("prompt")
        said = prompt if isinstance(prompt, str) else " ".join(p for p in prompt or [] if isinstance(p, str))
    text = f"Echo: {said}"
    limit = output_token_limit(call.endpoint, call.body)
    if limit is not None:
        text = text.encode()[: limit * BYTES_PER_TOKEN].decode(errors="ignore")
    return text


def _last_user_input(items: Any) -> str:
    """The text of a Responses `input`: itself if a string, else its last user message's."""
    if isinstance(items, str):
        return items
    users = [item for item in items or [] if isinstance(item, dict) and item.get("role") == "user"]
    return message_text(users[-1].get("content")) if users else ""


def echo_response(call: UpstreamCall, text: str, usage: Usage) -> dict[str, Any]:
    """A Responses API response object holding one message with the reply text."""
    number = f"{_ID_PREFIX}{next(_ids):x}"
    content = [{"type": "output_text", "text": text, "annotations": []}]
    message = {"type": "message", "id": f"msg_{number}", "status": "completed", "role": "assistant", "content": content}
    body = call.body
    return {
        "id": f"resp_{number}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": call.route.public_name,
        "output": [message],
        "instructions": body.get("instructions"),
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True) is not False,
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "error": None,
        "incomplete_details": None,
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        },
    }


def _completion(call: UpstreamCall, text: str, usage: Usage) -> dict[str, Any]:
    created = int(time.time())
    base = {"id": completion_id(call.endpoint), "created": created, "model": call.route.public_name, "usage": _usage_json(usage)}
    if call.endpoint == "chat/completions":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice]}
    return {**base, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}


def _embeddings(call: UpstreamCall) -> Reply:
    raw = call.body.get("input")
    inputs = raw if isinstance(raw, list) and all(isinstance(i, str) for i in raw) else [raw if isinstance(raw, str) else json.dumps(raw)]
    data = [{"object": "embedding", "index": i, "embedding": _vector(text)} for i, text in enumerate(inputs)]
    usage = Usage(prompt_tokens=sum(estimate_text_tokens(text) for text in inputs))
    body = {
        "object": "list",
        "data": data,
        "model": call.route.public_name,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }
    return Reply(200, _dumps(body), usage)


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255 * 2 - 1, 6) for byte in digest[:EMBEDDING_DIMENSIONS]]


def _usage_json(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}


def _dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


class EchoStream(UpstreamStream):
    """Streams the reply word by word, then a usage chunk if the client asked for one."""

    def __init__(self, call: UpstreamCall, text: str, usage: Usage):
        super().__init__()
        self._call = call
        self._text = text
        self._final_usage = usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chat = self._call.endpoint == "chat/completions"
        base = {"id": completion_id(self._call.endpoint), "created": int(time.time()), "model": self._call.route.public_name}
        obj = "chat.completion.chunk" if chat else "text_completion"
        words = self._text.split(" ")
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            if chat:
                delta: dict[str, Any] = {"content": piece} if index else {"role": "assistant", "content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
            self.completion_text_bytes += len(piece.encode())
            yield encode_event(_dumps({**base, "object": obj, "choices": [choice]}))
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
        yield encode_event(_dumps({**base, "object": obj, "choices": [last]}))
        self.usage = self._final_usage
        if self._call.client_wants_usage:
            yield encode_event(_dumps({**base, "object": obj, "choices": [], "usage": _usage_json(self._final_usage)}))
        self.complete = True
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        pass


class EchoResponsesStream(UpstreamStream):
    """A Responses stream as OpenAI sends one: created, the message's text word by word, completed."""

    def __init__(self, response: dict[str, Any], text: str, usage: Usage):
        super().__init__()
        self._response = response
        self._text = text
        self._final_usage = usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        done = self._response
        message = done["output"][0]
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": started}), ("response.in_progress", {"response": started})]
        events.append(("response.output_item.added", {"output_index": 0, "item": {**message, "status": "in_progress", "content": []}}))
        part = {"type": "output_text", "text": "", "annotations": []}
        events.append(("response.content_part.added", {"item_id": message["id"], "output_index": 0, "content_index": 0, "part": part}))
        for number, (kind, data) in enumerate(events):
            yield _responses_event(kind, number, data)
        number = len(events)
        for index, word in enumerate(self._text.split(" ")):
            piece = word if index == 0 else " " + word
            self.completion_text_bytes += len(piece.encode())
            yield _responses_event("response.output_text.delta", number, {"item_id": message["id"], "output_index": 0, "content_index": 0, "delta": piece})
            number += 1
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        closing = [
            ("response.output_text.done", {**where, "text": self._text}),
            ("response.content_part.done", {**where, "part": message["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": message}),
        ]
        for kind, data in closing:
            yield _responses_event(kind, number, data)
            number += 1
        self.usage = self._final_usage
        self.complete = True
        yield _responses_event("response.completed", number, {"response": done})

    def close(self) -> None:
        pass


def _responses_event(kind: str, number: int, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + encode_event(_dumps({"type": kind, "sequence_number": number, **data}))
