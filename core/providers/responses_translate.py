"""`POST /v1/responses` served by providers that do not speak OpenAI's Responses API.

The Responses request is translated to the OpenAI chat format and sent through the
provider's chat adapter (Anthropic's, Gemini's), which translates it on to its vendor; the
chat answer comes back as a Response object, a chat stream as Responses events (see
responses_events.py). Usage is the chat adapter's, read from the vendor.

What does not translate is refused with a clear 400, never silently dropped: tools other
than functions (`web_search`, `file_search`, …), file inputs, and anything that needs a
stored response (`previous_response_id`, `conversation`, `prompt`, `background`), since a
translated provider stores nothing: `store` is answered false. `reasoning.effort` is sent
on as chat's `reasoning_effort`, which the Anthropic and Gemini chat adapters turn into
their thinking budgets; the thinking they return as `reasoning_content` becomes a reasoning item.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiohttp

from core.errors import GatewayError, bad_request
from core.providers.base import Adapter, Reply, UpstreamCall, UpstreamStream
from core.providers.responses_events import (
    ResponseEvents,
    ResponseFrame,
    function_call_item,
    message_item,
    new_id,
    reasoning_item,
    status_of,
)
from core.request_checks import output_token_limit
from core.usage import Usage, complete_usage, estimate_usage, message_text

# Request fields that need a response stored by the provider: refused, not ignored.
STORED_STATE_FIELDS = ("previous_response_id", "conversation", "prompt", "background")
# Sampling fields chat knows by the same name.
_SAME_NAME = ("temperature", "top_p", "parallel_tool_calls", "user")


def unsupported(message: str, code: str, param: str) -> GatewayError:
    return bad_request(message, code, param)


def to_chat(body: dict[str, Any], provider: str, stream: bool) -> dict[str, Any]:
    """A Responses request as an OpenAI chat request, or a 400 saying what cannot be."""
    for name in STORED_STATE_FIELDS:
        if body.get(name):
            message = f"Provider '{provider}' stores no responses: '{name}' cannot be used with it. Send the whole conversation in 'input'."
            raise unsupported(message, "unsupported_parameter", name)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            _add_item(messages, item, provider)
    else:
        raise bad_request("The 'input' field must be a string or a list of input items.", "invalid_input", "input")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    limit = output_token_limit("responses", body)
    if limit is not None:
        out["max_tokens"] = limit
    out.update((name, body[name]) for name in _SAME_NAME if body.get(name) is not None)
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    out.update(_tools(body, provider))
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _add_item(messages: list[dict[str, Any]], item: Any, provider: str) -> None:
    """One input item as chat messages: a message, a function call (joined to the assistant
    turn before it, as chat holds parallel calls) or a function call's output."""
    if not isinstance(item, dict):
        raise bad_request("Each item of 'input' must be an object.", "invalid_input", "input")
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        messages.append(_message(item, provider))
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
        if messages and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else message_text(_user_parts(output, provider)) if isinstance(output, list) else ""
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    elif kind != "reasoning":  # reasoning from an earlier turn: the vendor cannot read it back
        message = f"Provider '{provider}' cannot take input items of type '{kind}': only messages, function calls and their outputs translate."
        raise unsupported(message, "unsupported_input", "input")


def _message(item: dict[str, Any], provider: str) -> dict[str, Any]:
    role, content = item.get("role"), item.get("content")
    if role in ("system", "developer"):
        return {"role": "system", "content": content if isinstance(content, str) else message_text(_user_parts(content, provider))}
    if role == "assistant":  # history: output_text (and refusal) parts
        if isinstance(content, str):
            return {"role": "assistant", "content": content}
        parts = content if isinstance(content, list) else []
        texts = [p.get("text") or p.get("refusal") or "" for p in parts if isinstance(p, dict)]
        return {"role": "assistant", "content": "".join(t for t in texts if isinstance(t, str))}
    return {"role": "user", "content": content if isinstance(content, str) else _user_parts(content, provider)}


def _user_parts(content: Any, provider: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"], **({"detail": part["detail"]} if isinstance(part.get("detail"), str) else {})}
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_image":
            message = f"Provider '{provider}' cannot read uploaded files: send the image as 'image_url' (a URL or a data: URL), not 'file_id'."
            raise unsupported(message, "unsupported_input", "input")
        else:
            raise unsupported(f"Provider '{provider}' cannot take '{kind}' content: only text and images translate.", "unsupported_input", "input")
    return parts


def _tools(body: dict[str, Any], provider: str) -> dict[str, Any]:
    """Chat's `tools` and `tool_choice` for the Responses ones: function tools only."""
    functions: list[dict[str, Any]] = []
    for tool in body.get("tools") or []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            message = f"Provider '{provider}' cannot run '{kind}' tools: only function tools translate to it."
            raise unsupported(message, "unsupported_tool", "tools")
        functions.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}})
    choice = body.get("tool_choice")
    if not functions or choice is None:
        return {"tools": functions} if functions else {}
    if isinstance(choice, str):
        return {"tools": functions, "tool_choice": choice}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        return {"tools": functions, "tool_choice": {"type": "function", "function": {"name": choice.get("name")}}}
    if kind == "allowed_tools":  # a subset of the tools, chosen among freely or of necessity
        listed = choice.get("tools") or []
        if not isinstance(listed, list):
            raise bad_request("Invalid 'tool_choice.tools': expected a list of tools.", "invalid_tool_choice", "tool_choice")
        allowed = {t.get("name") for t in listed if isinstance(t, dict)}
        return {"tools": [f for f in functions if f["function"].get("name") in allowed], "tool_choice": choice.get("mode") or "auto"}
    raise unsupported(f"Provider '{provider}' cannot be made to use a '{kind}' tool: only function tools translate to it.", "unsupported_tool", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    """Chat's `response_format` for the Responses `text.format`."""
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}}
    return None


def from_chat(data: Any, frame: ResponseFrame, usage: Usage) -> dict[str, Any]:
    """A chat completion as a Response object."""
    choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    message = message if isinstance(message, dict) else {}
    status, incomplete = status_of(choice.get("finish_reason"))
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        output.append(reasoning_item(new_id("rs"), reasoning))
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    text = message_text(message.get("content"))
    if text or not calls:
        output.append(message_item(new_id("msg"), text, status))
    for call in calls:
        function = call.get("function") or {}
        call_id = str(call.get("id") or new_id("call"))
        output.append(function_call_item(new_id("fc"), call_id, str(function.get("name") or ""), str(function.get("arguments") or "{}"), "completed"))
    return frame.response(status, output, usage, incomplete_details=incomplete)


class TranslatedResponsesAdapter:
    """Serves `/v1/responses` through a provider's chat adapter."""

    def __init__(self, inner: Adapter):
        self.inner = inner

    async def send(self, call: UpstreamCall, http: aiohttp.ClientSession) -> Reply | UpstreamStream:
        chat_body = to_chat(call.body, call.route.provider.name, call.stream)
        answer = await self.inner.send(dataclasses.replace(call, endpoint="chat/completions", body=chat_body), http)
        frame = ResponseFrame.of(call.body, call.route.public_name)
        if isinstance(answer, UpstreamStream):
            return ResponseEvents(answer, frame, chat_body)
        data = json.loads(answer.body)
        # Estimated here, where the chat reply is still at hand, and shown to the client too.
        usage = complete_usage(answer.usage, lambda: estimate_usage(chat_body, data))
        return Reply(200, json.dumps(from_chat(data, frame, usage), ensure_ascii=False).encode(), usage)
