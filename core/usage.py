"""Token usage normalised across vendors, and estimates for when a vendor gives none."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

# Rough but deterministic: ~4 bytes of UTF-8 per token for English text. Used for admission
# estimates, for the echo engine, and for usage a vendor did not report (marked `estimated`).
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_IMAGE = 85


@dataclass(slots=True)
class Usage:
    """Usage normalised across vendors: `prompt_tokens` counts every input token, cached
    reads (`cached_tokens`) and cache writes (`cache_write_tokens`) included;
    `completion_tokens` counts every output token, reasoning (`reasoning_tokens`) included."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # What the media endpoints sell, beside tokens: images generated, milliseconds of audio
    # heard (transcriptions, translations), characters read aloud (speech). Whole numbers,
    # so a price per image, minute or 1M characters prices them exactly.
    images: int = 0
    audio_ms: int = 0
    characters: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def tokens_for_bytes(size: int) -> int:
    return -(-size // BYTES_PER_TOKEN)


def estimate_media_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """Input size of an images, speech or moderations request: the image prompt; the text to
    read aloud and its voice `instructions`; the texts and images to moderate."""
    value = body.get("prompt" if endpoint.startswith("images/") else "input")
    items = value if isinstance(value, list) else [value]
    texts = sum(estimate_text_tokens(item) for item in items if isinstance(item, str))
    parts = _content_tokens([item for item in items if isinstance(item, dict)])  # moderation's text and image parts
    instructions = body.get("instructions")
    return texts + parts + (estimate_text_tokens(instructions) if isinstance(instructions, str) else 0)


def text_bytes(value: Any) -> int:
    """UTF-8 size of a string a vendor generated; 0 for anything else (an odd value never raises)."""
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def json_bytes(value: Any) -> int:
    """Size of a JSON value (tool definitions, tool calls, a tool call's input) as compact
    JSON: orjson writes it ten times faster than str() takes (a tool list: ~40 against
    ~480 µs), and one measure for request and reply estimates a tool input alike both ways."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return len(_json_text(value).encode("utf-8", "surrogatepass"))


def json_text(value: Any) -> str:
    """A JSON value as compact JSON text, as json_bytes measures it; "" if it is not JSON."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _json_text(value)


def _json_text(value: Any) -> str:
    """What orjson does not write (nested deeper than it writes, a lone surrogate read by
    the json module), written the same way by the json module."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ""


def estimate_text_tokens(text: str) -> int:
    return tokens_for_bytes(len(text.encode("utf-8", "surrogatepass"))) if text else 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt size of a chat (OpenAI or Anthropic format), Responses, completion or embedding
    request body. Everything the vendor reads counts: a system prompt or tool definitions can
    be most of a request, and admission reserves (and rate limits hold) on this number."""
    if is_responses_body(body):
        return estimate_responses_tokens(body)
    if "messages" in body:
        system = body.get("system")  # Anthropic's; OpenAI's is one of the messages
        total = estimate_messages_tokens(body.get("messages")) + (TOKENS_PER_MESSAGE + _content_tokens(system) if system else 0)
        for name in ("tools", "functions", "response_format"):
            if body.get(name):
                total += tokens_for_bytes(json_bytes(body[name]))
        return total
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list):
        return sum(estimate_text_tokens(p) if isinstance(p, str) else len(p) if isinstance(p, list) else 0 for p in prompt)
    return estimate_text_tokens(prompt) if isinstance(prompt, str) else 0


# Fields only a Responses request has: with one of them (or an `input` list of items) a body
# with `input` is a Responses request, not an embedding one.
_RESPONSES_FIELDS = frozenset(
    {"instructions", "tools", "text", "previous_response_id", "reasoning", "stream", "store", "max_output_tokens", "include", "background", "tool_choice"}
)


def is_responses_body(body: dict[str, Any]) -> bool:
    """Whether a body with `input` is OpenAI's Responses API rather than embeddings. A bare
    string `input` reads alike for both (counted as its text either way, bar a few tokens)."""
    items = body.get("input")
    if items is None or "messages" in body:
        return False
    return not _RESPONSES_FIELDS.isdisjoint(body) or (isinstance(items, list) and any(isinstance(item, dict) for item in items))


def estimate_responses_tokens(body: dict[str, Any]) -> int:
    """A Responses request: its `input` (text, or items: messages, function calls and their
    outputs, reasoning), `instructions`, `tools` and the `text.format` schema."""
    items = body.get("input")
    total = 3 + (TOKENS_PER_MESSAGE + estimate_text_tokens(items) if isinstance(items, str) else 0)
    for item in items if isinstance(items, list) else ():
        total += TOKENS_PER_MESSAGE + _item_tokens(item)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        total += TOKENS_PER_MESSAGE + estimate_text_tokens(instructions)
    text = body.get("text")
    for value in (body.get("tools"), text.get("format") if isinstance(text, dict) else None):
        if value:
            total += tokens_for_bytes(json_bytes(value))
    return total


def _item_tokens(item: Any) -> int:
    """One input item: a message by its content; anything else (a function call and its
    output, a reasoning item, a tool call's record) by its size as JSON, which holds its text."""
    if isinstance(item, str):
        return estimate_text_tokens(item)
    if not isinstance(item, dict):
        return 0
    if "content" in item and item.get("type", "message") == "message":
        return _content_tokens(item.get("content"))
    return tokens_for_bytes(json_bytes(item))


def estimate_messages_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 3  # every reply is primed with a few tokens
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE + estimate_text_tokens(str(message.get("name") or ""))
        total += _content_tokens(message.get("content"))
        if message.get("tool_calls"):
            total += tokens_for_bytes(json_bytes(message["tool_calls"]))
    return total


def message_text(content: Any) -> str:
    """The text of a chat message's content, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _content_tokens(content: Any) -> int:
    """A message's content (or Anthropic's system) in either format: a string or a list of parts."""
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if not isinstance(content, list):
        return 0
    text = message_text(content)
    return (estimate_text_tokens(text) if text else 0) + sum(_part_tokens(part) for part in content if isinstance(part, dict))


def _part_tokens(part: dict[str, Any]) -> int:
    """What a non-text part adds: images at a flat rate, Anthropic's tool calls and results
    (in the history sent back) by their size. Text parts are counted by the caller."""
    kind = part.get("type")
    if kind in ("image_url", "image", "input_image"):
        return TOKENS_PER_IMAGE
    if kind == "input_file":  # a Responses file part: its data (base64, 4 characters per 3 bytes), or a flat rate for a reference
        data = part.get("file_data")
        return tokens_for_bytes(len(data) * 3 // 4) if isinstance(data, str) else TOKENS_PER_IMAGE
    if kind == "tool_use":
        return estimate_text_tokens(str(part.get("name") or "")) + tokens_for_bytes(json_bytes(part.get("input") or {}))
    if kind == "tool_result":
        return _content_tokens(part.get("content"))
    if kind == "document":
        source = part.get("source")
        if isinstance(source, dict):
            return _content_tokens(source.get("data") if source.get("type") == "text" else source.get("content"))
    return 0


def reply_text(reply: Any) -> str:
    """The text a chat reply generated, tool call arguments included: OpenAI's `choices`
    (chat or completions), Anthropic's `content` blocks or a Responses `output`. For estimates only."""
    if not isinstance(reply, dict):
        return ""
    choices, blocks, output = reply.get("choices"), reply.get("content"), reply.get("output")
    texts = [_choice_text(c) for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    texts += [_block_text(b) for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []
    texts += [_output_item_text(i) for i in output if isinstance(i, dict)] if isinstance(output, list) else []
    return "".join(texts)


def _output_item_text(item: dict[str, Any]) -> str:
    """What one Responses output item generated: a message's text (and refusal), a function
    call's arguments, a reasoning item's summary; whatever the types of its fields."""
    kind = item.get("type")
    if kind == "function_call":
        arguments = item.get("arguments")
        return arguments if isinstance(arguments, str) else ""
    parts = item.get("content") if kind == "message" else item.get("summary") if kind == "reasoning" else None
    if not isinstance(parts, list):
        return ""
    texts = (part.get("text", part.get("refusal")) for part in parts if isinstance(part, dict))
    return "".join(text for text in texts if isinstance(text, str))


def _choice_text(choice: dict[str, Any]) -> str:
    """The text and tool-call arguments of one choice, whatever types its fields have."""
    message = choice.get("message")
    if isinstance(message, str):
        return message
    if not isinstance(message, dict):
        text = choice.get("text")  # legacy completions
        return text if isinstance(text, str) else ""
    calls, reasoning = message.get("tool_calls"), message.get("reasoning_content")  # DeepSeek's reasoning
    functions = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    arguments = "".join(f["arguments"] for f in functions if isinstance(f, dict) and isinstance(f.get("arguments"), str))
    return message_text(message.get("content")) + (reasoning if isinstance(reasoning, str) else "") + arguments


def _block_text(block: dict[str, Any]) -> str:
    """The text of an Anthropic content block (extended thinking included, a tool call's input
    as JSON), whatever its types."""
    if block.get("type") in ("text", "thinking"):
        text = block.get(block["type"])
        return text if isinstance(text, str) else ""
    if block.get("type") != "tool_use":
        return ""
    return json_text(block.get("input") or {})


def estimate_usage(request_body: dict[str, Any], reply: Any) -> Usage:
    """Usage for an answer whose vendor reported none: from the prompt and the reply text."""
    return Usage(prompt_tokens=estimate_prompt_tokens(request_body), completion_tokens=estimate_text_tokens(reply_text(reply)), estimated=True)


def usage_so_far(reported: Usage | None, request_body: dict[str, Any], completion_text_bytes: int) -> Usage:
    """Usage of a stream that ended without its final report (cut off, abandoned): what the
    vendor reported so far is kept (Anthropic's prompt counts from `message_start`); only
    what it did not say is estimated, the prompt from the request, the output from the text
    relayed."""
    base = reported or Usage()
    prompt = base if base.prompt_tokens else Usage(prompt_tokens=estimate_prompt_tokens(request_body))
    return Usage(
        prompt.prompt_tokens,
        max(base.completion_tokens, tokens_for_bytes(completion_text_bytes)),
        prompt.cached_tokens,
        estimated=True,
        cache_write_tokens=prompt.cache_write_tokens,
        reasoning_tokens=base.reasoning_tokens,
    )


def complete_usage(reported: Usage | None, estimate: Callable[[], Usage]) -> Usage:
    """The usage to bill: the vendor's as it reported it; the estimate where it reported
    none, or fills a count its report lacked (a usage marked estimated with that count 0)."""
    if reported is not None and not (reported.estimated and not (reported.prompt_tokens and reported.completion_tokens)):
        return reported
    guess = estimate()
    if reported is None:
        return guess
    return dataclasses.replace(
        reported, prompt_tokens=reported.prompt_tokens or guess.prompt_tokens, completion_tokens=reported.completion_tokens or guess.completion_tokens
    )


# The names of OpenAI's usage fields: (input, output, input details, output details).
CHAT_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
RESPONSES_USAGE_FIELDS = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")


def usage_from_responses(response: Any) -> Usage | None:
    """Read a Responses API response's `usage` (`input_tokens`, `output_tokens` and their
    details): the same counts as chat's under other names, read by the same rules."""
    return usage_from_openai(response, fields=RESPONSES_USAGE_FIELDS)


def usage_from_openai(data: Any, generates: bool = True, fields: tuple[str, str, str, str] = CHAT_USAGE_FIELDS) -> Usage | None:
    """Read OpenAI's `usage` object (chat, completions; embeddings, which generate nothing,
    with `generates` False). None when absent or when it gives neither count; a count it
    lacks is worked out from `total_tokens`, or else left 0 and marked estimated (see
    complete_usage): a partial report is never billed as zero."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt_name, completion_name, prompt_details, completion_details_name = fields
    prompt, completion = reported_count(usage.get(prompt_name)), reported_count(usage.get(completion_name))
    if not generates and completion is None:
        completion = 0
    if prompt is None and completion is None:
        return None
    total = reported_count(usage.get("total_tokens"))
    if total is not None and prompt is None:
        prompt = max(total - (completion or 0), 0)
    elif total is not None and completion is None:
        completion = max(total - (prompt or 0), 0)
    details = usage.get(prompt_details)
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    completion_details = usage.get(completion_details_name)
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    return Usage(
        prompt_tokens=prompt or 0,
        completion_tokens=completion or 0,
        cached_tokens=count(cached),
        estimated=prompt is None or completion is None,
        reasoning_tokens=count(reasoning),
    )


def count(value: Any) -> int:
    """A token count from vendor JSON: a non-negative int, anything else is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def reported_count(value: Any) -> int | None:
    """A token count the vendor reported (a non-negative int); None if it did not report one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
