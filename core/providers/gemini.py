"""Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`) behind the OpenAI chat
format.

Usage: `promptTokenCount` already includes `cachedContentTokenCount`; thinking tokens
(`thoughtsTokenCount`) are output the model is billed for, so the normalised completion is
candidates + thoughts, with the thoughts as `reasoning_tokens`.

Reasoning: chat's `reasoning_effort` is sent as `thinkingConfig.thinkingBudget` (the tokens
of request_checks.REASONING_BUDGETS; `none` is 0, thinking off) with `includeThoughts`, and
the thought parts come back as chat's `reasoning_content`. Thought signatures are not kept.
"""

from __future__ import annotations

import json
import mimetypes
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from core.errors import bad_gateway
from core.providers.base import JSON_CONTENT_TYPE, Reply, UpstreamCall, UpstreamStream, final_body, translate_batch
from core.providers.http import open_stream, post_json
from core.providers.translate import ChunkWriter, arguments_of, completion, not_supported, split_data_url, stop_list, thinking_budget
from core.request_checks import json_in_text, output_token_limit
from core.sse import SseSplitter, encode_event, event_data
from core.usage import Usage, count, estimate_usage

FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_GENERATION = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}


class GeminiAdapter:
    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        if call.endpoint != "chat/completions":
            raise not_supported(call)
        route = call.route
        model = quote(route.upstream_name, safe="")
        headers = {"x-goog-api-key": call.upstream_key, "Content-Type": JSON_CONTENT_TYPE, **route.provider.headers}
        payload = json.dumps(final_body(call, to_gemini(call)), ensure_ascii=False).encode()
        if call.stream:
            url = f"{route.provider.base_url}/models/{model}:streamGenerateContent?alt=sse"
            return GeminiStream(await open_stream(http, url, headers, payload, call), call)
        _, data = await post_json(http, f"{route.provider.base_url}/models/{model}:generateContent", headers, payload, call)
        message, finish_reason, reported = from_gemini(data)
        usage = reported or estimate_usage(call.body, {"choices": [{"message": message}]})
        return Reply(200, completion(call, message, finish_reason, usage, data.get("responseId") if isinstance(data, dict) else None), usage)


def to_gemini(call: UpstreamCall) -> dict[str, Any]:
    """An OpenAI chat request as a Gemini generateContent request."""
    body = call.body
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # OpenAI tool call id -> function name (Gemini answers by name)
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content")))
        elif role == "tool":
            name = tool_names.get(str(message.get("tool_call_id")), "tool")
            _add(contents, "user", [{"functionResponse": {"name": name, "response": _tool_response(message.get("content"))}}])
        elif role == "assistant":
            parts = _parts(message.get("content"))
            for tool_call in message.get("tool_calls") or []:
                if isinstance(tool_call, dict):
                    name = str((tool_call.get("function") or {}).get("name"))
                    tool_names[str(tool_call.get("id"))] = name
                    parts.append({"functionCall": {"name": name, "args": arguments_of(tool_call)}})
            _add(contents, "model", parts)
        else:
            _add(contents, "user", _parts(message.get("content")))
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": "\n\n".join(s for s in system if s)}]}
    generation = {target: body[source] for source, target in _GENERATION.items() if body.get(source) is not None}
    limit = output_token_limit(call.endpoint, body)
    if limit is not None:
        generation["maxOutputTokens"] = limit
    if stop_list(body.get("stop")):
        generation["stopSequences"] = stop_list(body.get("stop"))
    budget = thinking_budget(call)
    if budget is not None:  # its thoughts count in maxOutputTokens, as OpenAI's reasoning in its limit
        generation["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}
    if generation:
        out["generationConfig"] = generation
    functions = [t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if functions:
        out["tools"] = [{"functionDeclarations": [{k: v for k, v in f.items() if k in ("name", "description", "parameters")} for f in functions]}]
        mode = _tool_mode(body.get("tool_choice"))
        if mode is not None:
            out["toolConfig"] = {"functionCallingConfig": mode}
    return out


def _tool_mode(choice: Any) -> dict[str, Any] | None:
    if choice == "required":
        return {"mode": "ANY"}
    if choice == "none":
        return {"mode": "NONE"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name")]}
    return {"mode": "AUTO"} if choice == "auto" else None


def _add(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if not parts:
        parts = [{"text": ""}]
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text") if isinstance(content, list) else ""


def _tool_response(content: Any) -> dict[str, Any]:
    text = _text(content)
    parsed = json_in_text(text)
    return parsed if isinstance(parsed, dict) else {"content": text}


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            parts.append({"text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            inline = split_data_url(url)
            if inline:
                parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
            else:
                parts.append({"fileData": {"mimeType": mimetypes.guess_type(url)[0] or "image/jpeg", "fileUri": url}})
    return parts


def usage_from_gemini(metadata: Any) -> Usage | None:
    if not isinstance(metadata, dict):
        return None
    if all(metadata.get(name) is None for name in ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount")):
        return None  # no count at all (`{}` or only a total): estimated, never billed as zero
    thoughts = count(metadata.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=count(metadata.get("promptTokenCount")),
        completion_tokens=count(metadata.get("candidatesTokenCount")) + thoughts,
        cached_tokens=count(metadata.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _finish(reason: Any, has_calls: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FILTERED:
        return "content_filter"
    return "tool_calls" if has_calls else "stop"


@dataclass(slots=True)
class CandidateParts:
    """What the first candidate of a Gemini answer (or stream chunk) says."""

    texts: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)  # parts marked `thought`: chat's reasoning_content
    calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: Any = None


def _candidate_parts(data: dict[str, Any]) -> CandidateParts:
    candidates = data.get("candidates") or []
    first = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
    found = CandidateParts(finish_reason=first.get("finishReason"))
    for part in (first.get("content") or {}).get("parts") or []:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            (found.thoughts if part.get("thought") else found.texts).append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            found.calls.append(part["functionCall"])
    return found


def _tool_calls(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "index": start + i,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.get("name"), "arguments": json.dumps(c.get("args") or {})},
        }
        for i, c in enumerate(calls)
    ]


def from_gemini(data: Any) -> tuple[dict[str, Any], str, Usage | None]:
    """(OpenAI message, finish_reason, usage) of a Gemini response; usage is None when the
    response reports none (it is then estimated, not billed as zero)."""
    if not isinstance(data, dict):
        data = {}
    parts = _candidate_parts(data)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts.texts) if parts.texts or not parts.calls else None}
    if parts.thoughts:
        message["reasoning_content"] = "".join(parts.thoughts)
    if parts.calls:
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in _tool_calls(parts.calls)]
    return message, _finish(parts.finish_reason, bool(parts.calls)), usage_from_gemini(data.get("usageMetadata"))


class GeminiStream(UpstreamStream):
    """Gemini's SSE chunks (each a partial response) as OpenAI chunks. The stream has no
    end marker: it is complete when a chunk carries a finish reason."""

    def __init__(self, response: aiohttp.ClientResponse, call: UpstreamCall):
        super().__init__()
        self._response = response
        self._call = call
        self._writer = ChunkWriter(call)
        self._finish: str | None = None
        self._calls = 0
        self._started = False
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        name = self._call.route.provider.name
        try:
            async for chunk in self._response.content.iter_any():
                out, unreadable = translate_batch(splitter.feed(chunk), self._translate)
                if out:
                    yield b"".join(out)
                if unreadable is not None:
                    raise unreadable
            self._ended = True
        except TimeoutError:
            self.error = bad_gateway(f"Provider '{name}' stopped sending.", "upstream_timeout")
        except aiohttp.ClientError:
            self.error = bad_gateway(f"Provider '{name}' broke off the stream.", "upstream_stream_broken")
        finally:
            self.close()
        if self.error is None and self._finish is None:
            self.error = bad_gateway(f"Provider '{name}' ended the stream without a finish reason.", "upstream_stream_broken")
        if self.error is not None:
            yield encode_event(json.dumps(self.error.body()).encode())
            return
        self.usage = self.partial_usage
        tail = [self._writer.chunk({}, self._finish)]
        if self._call.client_wants_usage and self.usage is not None:
            tail.append(self._writer.chunk(None, usage=self.usage))
        self.complete = True
        yield b"".join(tail) + b"data: [DONE]\n\n"

    def _translate(self, event: bytes) -> list[bytes]:
        raw = event_data(event)
        if raw is None:
            return []
        try:
            data = json.loads(raw)
        except ValueError:
            return []
        if not isinstance(data, dict):
            return []
        usage = usage_from_gemini(data.get("usageMetadata"))
        if usage is not None:
            self.partial_usage = usage  # each chunk reports the counts so far
        parts = _candidate_parts(data)
        out = []
        if not self._started:
            self._started = True
            out.append(self._writer.chunk({"role": "assistant", "content": ""}))
        for name, pieces in (("reasoning_content", parts.thoughts), ("content", parts.texts)):
            text = "".join(pieces)
            if text:
                self.completion_text_bytes += len(text.encode())  # thoughts too: billed as output
                out.append(self._writer.chunk({name: text}))
        if parts.calls:
            out.append(self._writer.chunk({"tool_calls": _tool_calls(parts.calls, self._calls)}))
            self._calls += len(parts.calls)
        if parts.finish_reason:
            self._finish = _finish(parts.finish_reason, self._calls > 0)
        return out

    def close(self) -> None:
        if self._ended:
            self._response.release()
        else:
            self._response.close()
