"""Fake vendors strict enough for real coding agents (test/test_coding_agents.py).

`AnthropicMessagesVendor` speaks Anthropic's Messages API as Claude Code meets it: streamed
and plain messages with thinking blocks and cache counts, `/messages/count_tokens`, and the
vendor's refusal of a beta-only body field sent without its `anthropic-beta` header (the
400 "Extra inputs are not permitted" Claude Code dies of when a gateway drops the header).
`CodexResponsesVendor` speaks OpenAI's Responses API with the event sequence OpenAI streams
(created, in_progress, a reasoning item, a message item with its part and deltas, done
events, completed with the usage), which Codex CLI parses event by event.

Each vendor's usage is fixed, so a test knows the exact charge.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

# Body fields Anthropic accepts only under a beta (the beta name's prefix, dated suffix aside).
BETA_ONLY_FIELDS = {"context_management": "context-management-", "container": "code-execution-", "mcp_servers": "mcp-client-"}

ANTHROPIC_USAGE = {"input_tokens": 1200, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 20000, "output_tokens": 90}


def anthropic_error(status: int, kind: str, message: str) -> Response:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status)


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def betas_of(request: Request) -> list[str]:
    header = request.headers.get("anthropic-beta", "")
    return [beta.strip() for beta in header.split(",") if beta.strip()]


@dataclass
class AnthropicMessagesVendor:
    """`reply` is the text every message answers; `counted` the input_tokens count_tokens gives."""

    reply: str = "PONG from the fake Anthropic vendor"
    thinking: str = "The user wants a pong."
    usage: dict[str, int] = field(default_factory=lambda: dict(ANTHROPIC_USAGE))
    counted: int = 4321
    messages: list[dict[str, Any]] = field(default_factory=list)
    counts: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def __call__(self, body: dict[str, Any], request: Request) -> Response:
        path = request.url.path
        if request.headers.get("x-api-key") != "vendor-anthropic-key":
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        refusal = self._beta_refusal(body, request)
        if refusal is not None:
            self.refused.append(refusal)
            return anthropic_error(400, "invalid_request_error", refusal)
        if path.endswith("/messages/count_tokens"):
            self.counts.append(body)
            return JSONResponse({"input_tokens": self.counted})
        if not path.endswith("/messages"):
            return anthropic_error(404, "not_found_error", f"Not found: {path}")
        self.messages.append(body)
        thinks = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") in ("enabled", "adaptive")
        if body.get("stream"):
            return StreamingResponse(self._events(body, thinks), media_type="text/event-stream")
        return JSONResponse(self._message(body, thinks))

    @staticmethod
    def _beta_refusal(body: dict[str, Any], request: Request) -> str | None:
        betas = betas_of(request)
        for name, prefix in BETA_ONLY_FIELDS.items():
            if name in body and not any(beta.startswith(prefix) for beta in betas):
                return f"{name}: Extra inputs are not permitted"
        return None

    def _content(self, thinks: bool) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "thinking", "thinking": self.thinking, "signature": "c2lnbmVk"}] if thinks else []
        return [*content, {"type": "text", "text": self.reply}]

    def _message(self, body: dict[str, Any], thinks: bool) -> dict[str, Any]:
        return {
            "id": f"msg_fake{len(self.messages)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": self._content(thinks),
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.usage,
        }

    async def _events(self, body: dict[str, Any], thinks: bool) -> AsyncIterator[bytes]:
        start_usage = {**self.usage, "output_tokens": 1}
        message = {**self._message(body, thinks), "content": [], "stop_reason": None, "usage": start_usage}
        yield sse_event("message_start", {"type": "message_start", "message": message})
        for index, block in enumerate(self._content(thinks)):
            if block["type"] == "thinking":
                yield sse_event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
                )
                yield sse_event(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": block["thinking"]}}
                )
                yield sse_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": block["signature"]}},
                )
            else:
                yield sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
                for word in block["text"].split(" "):
                    piece = word if word == block["text"].split(" ")[0] else f" {word}"
                    yield sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}})
            yield sse_event("content_block_stop", {"type": "content_block_stop", "index": index})
        delta_usage = {"output_tokens": self.usage["output_tokens"]}
        yield sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": delta_usage})
        yield sse_event("message_stop", {"type": "message_stop"})


CODEX_USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 3000},
    "output_tokens": 400,
    "output_tokens_details": {"reasoning_tokens": 300},
    "total_tokens": 5400,
}


@dataclass
class CodexResponsesVendor:
    """OpenAI's Responses API as Codex CLI streams it; refuses anything but a streamed create."""

    reply: str = "PONG from the fake Responses vendor"
    usage: dict[str, Any] = field(default_factory=lambda: dict(CODEX_USAGE))
    creates: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, body: dict[str, Any], request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer vendor-openai-key":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        if not request.url.path.endswith("/responses"):
            return JSONResponse({"error": {"message": "Not found", "type": "invalid_request_error"}}, 404)
        self.creates.append(body)
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        number = iter(range(1000))
        created = len(self.creates)
        base = {"id": f"resp_codex{created}", "object": "response", "created_at": 1764201600, "model": body.get("model"), "store": body.get("store", True)}

        def event(kind: str, **data: Any) -> bytes:
            return sse_event(kind, {"type": kind, "sequence_number": next(number), **data})

        yield event("response.created", response={**base, "status": "in_progress", "output": [], "usage": None})
        yield event("response.in_progress", response={**base, "status": "in_progress", "output": [], "usage": None})
        reasoning = {"id": f"rs_{created}", "type": "reasoning", "summary": [], "encrypted_content": "ZW5jcnlwdGVk"}
        yield event("response.output_item.added", output_index=0, item={**reasoning, "encrypted_content": None})
        yield event("response.output_item.done", output_index=0, item=reasoning)
        item_id = f"msg_{created}"
        yield event(
            "response.output_item.added", output_index=1, item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", item_id=item_id, output_index=1, content_index=0, part=part)
        words = self.reply.split(" ")
        for position, word in enumerate(words):
            yield event(
                "response.output_text.delta", item_id=item_id, output_index=1, content_index=0, delta=word if position == 0 else f" {word}", logprobs=[]
            )
        yield event("response.output_text.done", item_id=item_id, output_index=1, content_index=0, text=self.reply, logprobs=[])
        done_part = {**part, "text": self.reply}
        yield event("response.content_part.done", item_id=item_id, output_index=1, content_index=0, part=done_part)
        message = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [done_part]}
        yield event("response.output_item.done", output_index=1, item=message)
        yield event("response.completed", response={**base, "status": "completed", "output": [reasoning, message], "usage": self.usage})
