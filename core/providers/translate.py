"""Pieces of the OpenAI chat format that every vendor translation needs."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from core.errors import GatewayError, bad_request
from core.providers.base import UpstreamCall, UpstreamFailure
from core.request_checks import REASONING_BUDGETS, json_in_text
from core.sse import encode_event
from core.usage import Usage


def not_supported(call: UpstreamCall) -> UpstreamFailure:
    """This vendor has no such endpoint: another provider of the model may."""
    error = GatewayError(400, "invalid_request_error", "endpoint_not_supported", f"Provider '{call.route.provider.name}' does not support /v1/{call.endpoint}.")
    return UpstreamFailure(error, retryable=True)


def thinking_budget(call: UpstreamCall) -> int | None:
    """The thinking tokens chat's `reasoning_effort` asks of a vendor that takes a budget
    (REASONING_BUDGETS); None when the request sets no effort, a 400 for one without a budget."""
    effort = call.body.get("reasoning_effort")
    if effort is None:
        return None
    budget = REASONING_BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is None:
        efforts = ", ".join(REASONING_BUDGETS)
        message = f"Provider '{call.route.provider.name}' takes a reasoning effort of {efforts}; got {json.dumps(effort)}."
        raise bad_request(message, "invalid_reasoning_effort", "reasoning_effort")
    return budget


def stop_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def arguments_of(tool_call: dict[str, Any]) -> Any:
    """The parsed arguments of an OpenAI tool call (vendors want objects, OpenAI sends JSON text)."""
    raw = (tool_call.get("function") or {}).get("arguments") or "{}"
    if not isinstance(raw, str):
        return raw
    parsed = json_in_text(raw)
    return {} if parsed is None else parsed


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:image/png;base64,...` URL."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, _, data = url.partition(";base64,")
    return head[5:] or "image/png", data


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object for a normalised Usage."""
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}
    if usage.cached_tokens or usage.cache_write_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def completion(call: UpstreamCall, message: dict[str, Any], finish_reason: str, usage: Usage, completion_id: str | None = None) -> bytes:
    body = {
        "id": completion_id or f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.route.public_name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_json(usage),
    }
    return json.dumps(body, ensure_ascii=False).encode()


class ChunkWriter:
    """Builds OpenAI `chat.completion.chunk` SSE events for one streamed answer."""

    def __init__(self, call: UpstreamCall, completion_id: str | None = None):
        self.call = call
        self.id = completion_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.call.route.public_name}
        body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if usage is not None:
            body["usage"] = usage_json(usage)
        return encode_event(json.dumps(body, ensure_ascii=False).encode())
