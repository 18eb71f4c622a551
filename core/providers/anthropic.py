"""Anthropic's Messages API behind the OpenAI chat format, streams included.

Usage: Anthropic's `input_tokens` excludes cached tokens, so the normalised prompt is
input + cache reads + cache writes; `cached_tokens` are the reads, `cache_write_tokens`
the writes (`cache_creation_input_tokens`). Anthropic counts thinking in `output_tokens`
without a count of its own, so it bills at the output price (Anthropic's own price for it).

Reasoning: chat's `reasoning_effort` turns on extended thinking (see with_thinking); the
`thinking` blocks come back as chat's `reasoning_content` (a stream's `thinking_delta` as
`delta.reasoning_content`); signatures and `redacted_thinking` blocks are dropped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from core.config import ModelRoute
from core.errors import bad_gateway, bad_request
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamStream, final_body, translate_batch
from core.providers.client_headers import with_anthropic_betas
from core.providers.http import open_stream, post_json, vendor_error
from core.providers.translate import ChunkWriter, arguments_of, completion, not_supported, split_data_url, stop_list, thinking_budget
from core.request_checks import output_token_limit
from core.sse import SseSplitter, encode_event
from core.usage import Usage, complete_usage, count, estimate_usage, reported_count, text_bytes

ANTHROPIC_VERSION = "2023-06-01"
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}


class AnthropicAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        if call.endpoint != "chat/completions":
            raise not_supported(call)
        route = call.route
        headers = anthropic_headers(call)
        payload = json.dumps(final_body(call, to_anthropic(call)), ensure_ascii=False).encode()
        url = f"{route.provider.base_url}/messages"
        if call.stream:
            return AnthropicStream(await open_stream(http, url, headers, payload, call), call)
        _, data = await post_json(http, url, headers, payload, call)
        message, finish_reason, reported = from_anthropic(data)
        usage = complete_usage(reported, lambda: estimate_usage(call.body, {"choices": [{"message": message}]}))
        return Reply(200, completion(call, message, finish_reason, usage, data.get("id") if isinstance(data, dict) else None), usage)


def anthropic_headers(call: UpstreamCall) -> dict[str, str]:
    """What every call to an Anthropic provider sends: its key and API version, the provider's
    own headers, and the client's betas merged into the provider's (client_headers.py)."""
    provider = call.route.provider
    headers = {"x-api-key": call.upstream_key, "anthropic-version": provider.api_version or ANTHROPIC_VERSION, "Content-Type": JSON_CONTENT_TYPE}
    return {**headers, **with_anthropic_betas(provider.headers, call.forwarded)}


def to_anthropic(call: UpstreamCall) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request."""
    body = call.body
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
            continue
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or ""), "content": _text_of(message.get("content"))}
            _append(messages, "user", [block])
            continue
        blocks = _blocks(message.get("content"))
        if role == "assistant":
            for tool_call in message.get("tool_calls") or []:
                if isinstance(tool_call, dict):
                    blocks.append(
                        {"type": "tool_use", "id": tool_call.get("id"), "name": (tool_call.get("function") or {}).get("name"), "input": arguments_of(tool_call)}
                    )
        _append(messages, "assistant" if role == "assistant" else "user", blocks)
    out: dict[str, Any] = {"model": call.route.upstream_name, "messages": messages}
    out["max_tokens"] = output_token_limit(call.endpoint, body) or call.route.provider.default_max_tokens
    if system:
        out["system"] = "\n\n".join(part for part in system if part)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if stop_list(body.get("stop")):
        out["stop_sequences"] = stop_list(body.get("stop"))
    tools: list[dict[str, Any]] = [t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if tools:
        out["tools"] = [
            {"name": f.get("name"), "description": f.get("description", ""), "input_schema": f.get("parameters") or {"type": "object"}} for f in tools
        ]
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
    if call.stream:
        out["stream"] = True
    with_thinking(out, call)
    return out


MIN_THINKING_BUDGET = 1024  # Anthropic's smallest `budget_tokens`
FORCED_TOOL_CHOICES = ("any", "tool")


def with_thinking(out: dict[str, Any], call: UpstreamCall) -> None:
    """Anthropic's extended thinking for chat's `reasoning_effort` (budgets: REASONING_BUDGETS).

    Anthropic's `max_tokens` bounds thinking and answer together, as OpenAI's output limit
    bounds reasoning and answer, and the budget must stay below it. A client's own limit,
    which admission reserved for (up to max_reserve_completion_tokens), is sent unchanged with the budget capped below it (a 400 if that
    leaves less than Anthropic's 1,024). Without one, `max_tokens` is the provider's
    `default_max_tokens` plus the budget, so the answer keeps its usual room; admission
    reserves the budget on top of its default too (request_checks.reasoning_budget).

    A request that continues a tool call (its last assistant turn calls tools) is sent
    without thinking: Anthropic would want that turn's signed thinking blocks back, and the
    chat format has no place for their signatures. A thinking+tools conversation through chat
    thinks on the turns that start from a user message only.
    """
    budget = thinking_budget(call)
    if not budget or _continues_tool_call(call.body):
        return
    limit = output_token_limit(call.endpoint, call.body)
    if limit is None:
        out["max_tokens"] = call.route.provider.default_max_tokens + budget
    elif limit <= MIN_THINKING_BUDGET:
        message = (
            f"Provider '{call.route.provider.name}' thinks at least {MIN_THINKING_BUDGET} tokens: "
            f"with reasoning_effort, the output limit must be above that (it is {limit})."
        )
        raise bad_request(message, "invalid_max_tokens", "max_tokens")
    else:
        budget = min(budget, limit - 1)
    _check_thinking_sampling(out, call.route.provider.name)
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}


def _continues_tool_call(body: dict[str, Any]) -> bool:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return bool(message.get("tool_calls"))
    return False


def _check_thinking_sampling(out: dict[str, Any], provider: str) -> None:
    """Anthropic refuses, with thinking, a temperature other than 1, any top_k, a top_p under
    0.95 and forced tool use: a 400 naming the parameter, as OpenAI's reasoning models answer."""
    top_p, choice = out.get("top_p"), out.get("tool_choice") or {}
    refused = (
        "temperature" if out.get("temperature") not in (None, 1) else
        "top_k" if out.get("top_k") is not None else
        "top_p" if isinstance(top_p, (int, float)) and top_p < 0.95 else
        "tool_choice" if choice.get("type") in FORCED_TOOL_CHOICES else None
    )  # fmt: skip
    if refused is not None:
        message = f"Provider '{provider}' cannot use '{refused}' with reasoning_effort (Anthropic's extended thinking): leave it unset."
        raise bad_request(message, "unsupported_parameter", refused)


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name")}
    return {"type": "auto"} if choice == "auto" else None


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Anthropic wants user and assistant turns to alternate: merge consecutive ones."""
    if not blocks:
        blocks = [{"type": "text", "text": ""}]
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            inline = split_data_url(url)
            source = {"type": "base64", "media_type": inline[0], "data": inline[1]} if inline else {"type": "url", "url": url}
            blocks.append({"type": "image", "source": source})
    return blocks


def usage_from_anthropic(raw: Any) -> Usage | None:
    """Anthropic's `usage` normalised; None when it gives neither `input_tokens` nor
    `output_tokens`, and a count it lacks left 0 and marked estimated (see complete_usage)."""
    raw = raw if isinstance(raw, dict) else {}
    read, written = count(raw.get("cache_read_input_tokens")), count(raw.get("cache_creation_input_tokens"))
    uncached, output = reported_count(raw.get("input_tokens")), reported_count(raw.get("output_tokens"))
    if uncached is None and output is None:
        return None
    return Usage(
        prompt_tokens=(uncached or 0) + read + written,
        completion_tokens=output or 0,
        cached_tokens=read,
        estimated=uncached is None or output is None,
        cache_write_tokens=written,
    )


# The fields of a `content_block_delta` that carry generated output, billed as output tokens:
# text, extended thinking, a tool call's input. (A citations_delta's cited_text quotes the
# input and does not count as output; a signature_delta is no text either.)
GENERATED_DELTA_FIELDS = ("text", "thinking", "partial_json")


def delta_text_bytes(delta: Any) -> int:
    """Bytes of output in one content_block_delta, for a stream cut off before its final usage."""
    if not isinstance(delta, dict):
        return 0
    size = 0
    for name in GENERATED_DELTA_FIELDS:
        value = delta.get(name)
        if value is not None:
            size += text_bytes(value)
    return size


class StreamUsage:
    """Anthropic's usage as a stream reports it: `message_start` gives the prompt counts (and
    a first output count), `message_delta` the final cumulative counts, overriding the start's."""

    __slots__ = ("counts", "final")

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}
        self.final = False  # the vendor has given its final output count

    def start(self, message: Any) -> Usage | None:
        raw = message.get("usage") if isinstance(message, dict) else None
        self.counts = dict(raw) if isinstance(raw, dict) else {}
        return usage_from_anthropic(self.counts)

    def delta(self, raw: Any) -> Usage | None:
        if isinstance(raw, dict):
            self.counts.update((name, value) for name, value in raw.items() if value is not None)
            self.final = self.final or raw.get("output_tokens") is not None
        return usage_from_anthropic(self.counts)


def from_anthropic(data: Any) -> tuple[dict[str, Any], str, Usage | None]:
    """(OpenAI message, finish_reason, usage) of an Anthropic Messages response; usage is
    None when the response reports none (it is then estimated, not billed as zero)."""
    if not isinstance(data, dict):
        data = {}
    text, thinking, tool_calls = [], [], []
    for block in data.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "thinking":  # its signature has no place in chat (see with_thinking)
            thinking.append(str(block.get("thinking", "")))
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}}
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not tool_calls else None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = usage_from_anthropic(data["usage"]) if isinstance(data.get("usage"), dict) else None
    return message, FINISH_REASONS.get(str(data.get("stop_reason")), "stop"), usage


class AnthropicStream(UpstreamStream):
    """Anthropic's stream events as OpenAI chunks (`message_start` … `message_stop`)."""

    def __init__(self, response: aiohttp.ClientResponse, call: UpstreamCall):
        super().__init__()
        self._response = response
        self._call = call
        self._route: ModelRoute = call.route
        self._writer = ChunkWriter(call)
        self._usage = StreamUsage()
        self._tool_index: dict[int, int] = {}
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        stopped = False
        try:
            async for chunk in self._response.content.iter_any():
                out, unreadable = translate_batch(splitter.feed(chunk), self._translate)
                stopped = self._finished  # set once, by message_stop or an error event
                if out:
                    yield b"".join(out)
                if unreadable is not None:
                    raise unreadable
                if stopped:
                    break
        except TimeoutError:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' stopped sending.", "upstream_timeout")
        except aiohttp.ClientError:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if self.error is None and not stopped:
            self.error = bad_gateway(f"Provider '{self._route.provider.name}' ended the stream before message_stop.", "upstream_stream_broken")
        if self.error is not None:
            yield encode_event(json.dumps(self.error.body()).encode())
        else:
            self.complete = True
            yield b"data: [DONE]\n\n"

    def _translate(self, event: bytes) -> list[bytes]:
        kind, data = _event(event)
        if data is None:
            return []
        if kind == "message_start":
            self.partial_usage = self._usage.start(data.get("message"))
            return [self._writer.chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tool_index.setdefault(int(data.get("index", 0)), len(self._tool_index))
                call = {"index": index, "id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": ""}}
                return [self._writer.chunk({"tool_calls": [call]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            self.completion_text_bytes += delta_text_bytes(delta)  # thinking too: it is billed as output
            if delta.get("type") == "text_delta":
                return [self._writer.chunk({"content": str(delta.get("text", ""))})]
            if delta.get("type") == "thinking_delta":
                return [self._writer.chunk({"reasoning_content": str(delta.get("thinking", ""))})]
            if delta.get("type") == "input_json_delta":
                partial = str(delta.get("partial_json", ""))
                index = self._tool_index.get(int(data.get("index", 0)), 0)
                return [self._writer.chunk({"tool_calls": [{"index": index, "function": {"arguments": partial}}]})]
            return []
        if kind == "message_delta":
            self.partial_usage = self._usage.delta(data.get("usage"))
            if self._usage.final:
                self.usage = self.partial_usage
            reason = FINISH_REASONS.get(str((data.get("delta") or {}).get("stop_reason")), "stop")
            return [self._writer.chunk({}, reason)]
        if kind == "message_stop":
            self._finished = True
            self.usage = self.partial_usage  # None without a message_start: billing estimates it
            return [self._writer.chunk(None, usage=self.usage)] if self._call.client_wants_usage and self.usage else []
        if kind == "error":
            passed = vendor_error(json.dumps(data).encode())
            self.error = bad_gateway(passed[0] if passed else "The provider reported an error mid-stream.", "upstream_stream_error")
            self._finished = True
        return []

    def close(self) -> None:
        if self._finished:
            self._response.release()
        else:
            self._response.close()


def _event(event: bytes) -> tuple[str | None, dict[str, Any] | None]:
    kind, data = None, []
    for line in event.splitlines():
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data.append(line[5:].strip())
    if not data:
        return kind, None
    try:
        parsed = json.loads(b"\n".join(data))
    except ValueError:
        return kind, None
    if not isinstance(parsed, dict):
        return kind, None
    return kind or parsed.get("type"), parsed
