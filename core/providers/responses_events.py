"""OpenAI's Response object and its stream events, built from an OpenAI chat answer.

Used by `/v1/responses` on providers that do not speak the Responses API (see
responses_translate.py): the chat answer, or chat stream, of the provider's adapter is
re-encoded as a Response, or as the Responses event sequence (`response.created` …
`response.completed`) that the openai SDK's `responses.stream()` accumulates.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.errors import GatewayError
from core.providers.base import UpstreamStream, translate_batch
from core.sse import SseSplitter, chat_chunk
from core.usage import Usage, complete_usage, estimate_prompt_tokens, usage_so_far

# Why a response stopped short, by the chat finish_reason that says so (others complete it).
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_usage(usage: Usage) -> dict[str, Any]:
    """The Responses API's usage object for a normalised Usage (input counts cached tokens
    in, as OpenAI's does; output counts reasoning in)."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [output_text_part(text)]}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name, "arguments": arguments}


def status_of(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) of a response that ended with this chat finish_reason."""
    reason = INCOMPLETE_REASONS.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


# Request fields a Response echoes back, with OpenAI's defaults for those left out.
_ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "temperature": None,
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "truncation": "disabled",
    "user": None,
}


@dataclass(frozen=True, slots=True)
class ResponseFrame:
    """What every Response object of one answer shares: its id, time, model and the request
    fields it echoes. Translated providers store nothing, so `store` is always false."""

    model: str
    echoed: dict[str, Any]
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, body: dict[str, Any], model: str) -> ResponseFrame:
        echoed = {name: body[name] if body.get(name) is not None else default for name, default in _ECHOED.items()}
        reasoning, text = body.get("reasoning"), body.get("text")
        reasoning, text = (reasoning if isinstance(reasoning, dict) else {}), (text if isinstance(text, dict) else {})
        echoed["reasoning"] = {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
        echoed["text"] = {"format": text.get("format") or {"type": "text"}}
        return cls(model, echoed)

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None, **details: Any) -> dict[str, Any]:
        """The Response object; `details` sets `incomplete_details` or `error`."""
        body: dict[str, Any] = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status, "model": self.model}
        body.update(self.echoed)
        body.update({"error": None, "incomplete_details": None, "previous_response_id": None, "store": False, "background": False})
        body.update(details)
        body["output"] = output
        body["usage"] = responses_usage(usage) if usage is not None else None
        return body


@dataclass(slots=True)
class _OpenItem:
    """The output item being streamed: its index, its item as added, and its text so far."""

    index: int
    item: dict[str, Any]
    key: str  # "text", "reasoning", or "tool<n>" for the chat stream's tool call n
    text: list[str] = field(default_factory=list)


class ResponseEvents(UpstreamStream):
    """Any provider's OpenAI chat stream re-encoded as Responses stream events. Billing reads
    the wrapped stream's figures, taken over when it ends (see `_sync`)."""

    def __init__(self, inner: UpstreamStream, frame: ResponseFrame, chat_body: dict[str, Any]):
        super().__init__()
        self._inner = inner
        self._frame = frame
        self._chat_body = chat_body
        self._sequence = 0
        self._done: list[dict[str, Any]] = []  # finished output items, in order
        self._open: _OpenItem | None = None
        self._finish: str | None = None
        self._prompt_estimate: Usage | None = None
        self._started = False  # response.created is out
        self._before_chunk = (0, False)  # (_sequence, _started) before the last chunk yielded

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._inner:
                self._before_chunk = (self._sequence, self._started)
                opening = self._start()  # numbered before the chunk's own events
                out, unreadable = translate_batch(splitter.feed(chunk), self._translate)
                out[:0] = opening
                if out:
                    yield b"".join(out)
                if unreadable is not None:
                    raise unreadable
        finally:
            self._sync()
        if self.error is not None:
            yield self.failure_events(self.error, dropped=False)
            return
        yield b"".join(self._start() + self._finished())

    def failure_events(self, error: GatewayError, dropped: bool) -> bytes:
        """The end of a failed stream, the vendor's failure or the gateway's cut-off: the
        events numbered on from the last one the client got (see `_failed`)."""
        if dropped:
            self._sequence, self._started = self._before_chunk
        return b"".join([*self._start(), self._failed(error)])

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def _start(self) -> list[bytes]:
        """`response.created` and `.in_progress`, once: [] after the first call."""
        if self._started:
            return []
        self._started = True
        response = self._frame.response("in_progress", [])
        return [self._event("response.created", response=response), self._event("response.in_progress", response=response)]

    def _finished(self) -> list[bytes]:
        """The close of the last item and `response.completed` (or `.incomplete`, as OpenAI
        ends a response cut by its output limit), with the usage billing will charge."""
        status, incomplete = status_of(self._finish)
        out = self._close(status)
        if not self._done:  # an empty answer is still one (empty) message
            self._open_item("text", message_item(new_id("msg"), "", "in_progress"), out)
            out += self._close(status)
        usage = complete_usage(self.usage, lambda: usage_so_far(self.partial_usage, self._chat_body, self.completion_text_bytes))
        response = self._frame.response(status, self._done, usage, incomplete_details=incomplete)
        self.complete = True
        return [*out, self._event(f"response.{status}", response=response)]

    def _failed(self, error: GatewayError) -> bytes:
        """An `error` event with the gateway's stable code, then `response.failed`, whose
        error code must be one of OpenAI's (the server's fault: `server_error`)."""
        failure = {"code": "server_error", "message": error.message}
        return self._event("error", code=error.code, message=error.message, param=None) + self._event(
            "response.failed", response=self._frame.response("failed", self._done, error=failure)
        )

    def _sync(self) -> None:
        """Take the inner stream's figures. An error already set stays: the gateway sets one
        when it cuts the stream off (MeteredStream._end_with) and closes it only then. A
        stream whose vendor reported no prompt count is billed the translated prompt's
        estimate, as the usage shown to the client is."""
        self.usage = self._inner.usage
        self.partial_usage = self._inner.partial_usage or self._estimated_prompt()
        self.completion_text_bytes = self._inner.completion_text_bytes
        self.error = self.error or self._inner.error

    def _estimated_prompt(self) -> Usage:
        if self._prompt_estimate is None:
            self._prompt_estimate = Usage(prompt_tokens=estimate_prompt_tokens(self._chat_body), estimated=True)
        return self._prompt_estimate

    def _translate(self, event: bytes) -> list[bytes]:
        data = chat_chunk(event)
        if data is None:
            return []
        choices = data.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        return self._translate_choice(first) if isinstance(first, dict) else []

    def _translate_choice(self, choice: dict[str, Any]) -> list[bytes]:
        """One chunk's delta as item events. Every field is checked for its type: a vendor's
        odd field is skipped, never raises."""
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        out: list[bytes] = []
        reasoning, content, tool_calls = delta.get("reasoning_content"), delta.get("content"), delta.get("tool_calls")
        if isinstance(reasoning, str) and reasoning:
            out += self._text_delta("reasoning", reasoning)
        if isinstance(content, str) and content:
            out += self._text_delta("text", content)
        for call in tool_calls if isinstance(tool_calls, list) else ():
            if isinstance(call, dict):
                out += self._tool_call_delta(call)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._finish = reason
        return out

    def _text_delta(self, key: str, text: str) -> list[bytes]:
        out: list[bytes] = []
        opened = self._open
        if opened is None or opened.key != key:
            out += self._close("completed")
            item = message_item(new_id("msg"), "", "in_progress") if key == "text" else reasoning_item(new_id("rs"), "")
            opened = self._open_item(key, item, out)
        opened.text.append(text)
        where = {"item_id": opened.item["id"], "output_index": opened.index, "content_index": 0}
        if key == "text":
            return [*out, self._event("response.output_text.delta", **where, delta=text, logprobs=[])]
        return [*out, self._event("response.reasoning_text.delta", **where, delta=text)]

    def _tool_call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        key = f"tool{call.get('index', 0)}"
        opened = self._open
        if opened is None or opened.key != key:
            out += self._close("completed")
            call_id, name = call.get("id"), function.get("name")
            item = function_call_item(
                new_id("fc"), call_id if isinstance(call_id, str) else new_id("call"), name if isinstance(name, str) else "", "", "in_progress"
            )
            opened = self._open_item(key, item, out)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            opened.text.append(arguments)
            out.append(self._event("response.function_call_arguments.delta", item_id=opened.item["id"], output_index=opened.index, delta=arguments))
        return out

    def _open_item(self, key: str, item: dict[str, Any], out: list[bytes]) -> _OpenItem:
        """Open a new item, adding its `output_item.added` (a message or reasoning item empty
        of content, its part added next, as OpenAI streams them) to `out`."""
        opened = self._open = _OpenItem(len(self._done), item, key)
        added = {**item, "content": []} if "content" in item else item
        out.append(self._event("response.output_item.added", output_index=opened.index, item=added))
        if key in ("text", "reasoning"):
            part = item["content"][0]
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=opened.index, content_index=0, part=part))
        return opened

    def _close(self, status: str) -> list[bytes]:
        """The `.done` events of the open item, which joins the finished ones."""
        open_item, self._open = self._open, None
        if open_item is None:
            return []
        text, item, where = "".join(open_item.text), open_item.item, {"item_id": open_item.item["id"], "output_index": open_item.index}
        out: list[bytes] = []
        if open_item.key == "text":
            item = message_item(item["id"], text, status)
            out.append(self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=item["content"][0]))
        elif open_item.key == "reasoning":
            item = reasoning_item(item["id"], text)
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=item["content"][0]))
        else:
            item = {**item, "arguments": text, "status": status}
            out.append(self._event("response.function_call_arguments.done", **where, arguments=text))
        self._done.append(item)
        return [*out, self._event("response.output_item.done", output_index=open_item.index, item=item)]

    def close(self) -> None:
        self._inner.close()
        self._sync()
