"""Checks of the client JSON the gateway reads itself, before anything reads it.

The upstream judges what a request means; but the gateway reads parts of it on the way:
the output-token limit for the reservation, `stream_options` to ask for usage, and, for vendors with
another format, the messages the translators rewrite. Each such part is checked here for
the shape its reader expects, so a malformed value is a 400 naming the parameter instead
of a crash in a translator. Whatever the gateway does not read passes untouched.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.errors import GatewayError, bad_request
from core.usage import Usage

# orjson, which writes what the gateway sends on, reads 1,024 levels but writes at most 254:
# a body nested deeper could not be forwarded, so it is refused when it is read.
MAX_JSON_DEPTH = 254
MAX_OUTPUT_TOKENS = 2**31 - 1  # OpenAI's bound for max_tokens: a signed 32-bit integer
_LIMIT_FIELDS = {
    "chat/completions": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "messages": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
# Thinking tokens per OpenAI reasoning effort, for vendors that take a budget instead
# (Anthropic's `thinking.budget_tokens`, Gemini's `thinkingBudget`): Google's own mapping for
# its OpenAI-compatible API (none 0, low 1K, medium 8K, high 24K). `minimal` is `low`:
# Anthropic thinks no less than 1,024 tokens.
REASONING_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}


def check_nesting(value: Any, raw: bytes) -> None:
    """400 for a JSON document nested deeper than orjson writes. Found by writing it, which
    costs less than counting its brackets (41 against 78 µs for a 97 KB body): walking a
    tool-using request's hundreds of brackets in Python cost more than all its other checks.
    A document too short to hold MAX_JSON_DEPTH pairs of brackets is not written."""
    if len(raw) > 2 * MAX_JSON_DEPTH and not writable(value):
        raise too_deeply_nested()


def writable(value: Any) -> bool:
    """Whether orjson writes `value`: for a value orjson read, whether it nests at most
    MAX_JSON_DEPTH levels (every other value orjson reads it also writes)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def too_deeply_nested() -> GatewayError:
    return bad_request(f"The request nests lists and objects more than {MAX_JSON_DEPTH} levels deep.", "too_deeply_nested")


def json_in_text(text: str) -> Any:
    """A JSON value a client sent inside a string (tool call arguments, tool results), for a
    vendor that wants it parsed; None if it is not JSON the gateway can carry: read as the
    body is (no lone surrogates) and nested no deeper than the body may be."""
    try:
        value = orjson.loads(text)
    except ValueError:
        return None
    return value if len(text) <= 2 * MAX_JSON_DEPTH or writable(value) else None


def check_request(endpoint: str, body: dict[str, Any]) -> None:
    """The parts of a proxied request body the gateway reads, checked for their shape."""
    for name in _LIMIT_FIELDS.get(endpoint, ()):
        check_max_tokens(body, name)
    if endpoint in ("chat/completions", "completions"):
        check_stream_options(body)
    if endpoint == "chat/completions":
        check_chat(body)
    elif endpoint == "completions":
        check_prompt(body)
    elif endpoint == "messages":
        check_messages(body)
    elif endpoint == "responses":
        check_responses(body)
    elif endpoint in _MEDIA_CHECKS:
        _MEDIA_CHECKS[endpoint](body)


MAX_IMAGES = 10  # OpenAI's bound for `n` on images/generations


def requested_units(endpoint: str, body: dict[str, Any]) -> Usage | None:
    """What a media request asks for at most, which admission reserves for (checked first by
    check_request): `n` images, the characters of the text to read aloud."""
    if endpoint == "images/generations":
        return Usage(images=body.get("n") or 1)
    if endpoint == "audio/speech":
        return Usage(characters=len(body["input"]))
    return None


def check_image_generation(body: dict[str, Any]) -> None:
    """`n` is what the reservation counts on: a whole number of images OpenAI would make."""
    _check_string(body, "prompt")
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= MAX_IMAGES):
        raise bad_request(f"Invalid 'n': expected a whole number from 1 to {MAX_IMAGES}, got {_shown(n)}.", "invalid_n", "n")


def check_speech(body: dict[str, Any]) -> None:
    """The text to read aloud: its characters are what speech is billed by."""
    _check_string(body, "input")


def check_moderation(body: dict[str, Any]) -> None:
    """Text, or a list of texts or of text and image parts: what OpenAI moderates."""
    value = body["input"]
    if not isinstance(value, (str, list)):
        raise bad_request(f"Invalid 'input': expected a string or a list, got {_shown(value)}.", "invalid_input", "input")


def _check_string(body: dict[str, Any], name: str) -> None:
    value = body[name]
    if not isinstance(value, str):
        raise bad_request(f"Invalid '{name}': expected a string, got {_shown(value)}.", f"invalid_{name}", name)


_MEDIA_CHECKS = {"images/generations": check_image_generation, "audio/speech": check_speech, "moderations": check_moderation}


def output_token_limit(endpoint: str, body: dict[str, Any]) -> int | None:
    """The most output tokens a request lets the model write; None if it sets no limit. One
    answer for the reservation (which reserves up to the key's max_reserve_completion_tokens
    of it) and for the translators that send the limit on: messages and completions read
    `max_tokens` alone (their vendors know no other), chat the larger of `max_tokens` and
    `max_completion_tokens`."""
    limit = None
    for name in _LIMIT_FIELDS.get(endpoint, ()):
        value = body.get(name)
        if type(value) is int and value > 0 and (limit is None or value > limit):
            limit = value
    return limit


def reasoning_effort(endpoint: str, body: dict[str, Any]) -> Any:
    """The reasoning effort a request asks for, as sent: chat's `reasoning_effort`, the
    Responses API's `reasoning.effort`; None if it asks for none."""
    if endpoint == "responses":
        reasoning = body.get("reasoning")
        return reasoning.get("effort") if isinstance(reasoning, dict) else None
    return body.get("reasoning_effort") if endpoint == "chat/completions" else None


def reasoning_budget(endpoint: str, body: dict[str, Any]) -> int:
    """The thinking tokens a translating adapter adds to the output limit of a request that
    sets none (see anthropic.with_thinking), which admission reserves on top of its default;
    0 for a request without a known effort."""
    effort = reasoning_effort(endpoint, body)
    return REASONING_BUDGETS.get(effort, 0) if isinstance(effort, str) else 0


def check_max_tokens(body: dict[str, Any], name: str) -> None:
    """A positive whole number that fits in 32 bits, as OpenAI requires (a bool is not one)."""
    value = body.get(name)
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_OUTPUT_TOKENS):
        message = f"Invalid '{name}': expected a whole number from 1 to {MAX_OUTPUT_TOKENS}, got {_shown(value)}."
        raise bad_request(message, "invalid_max_tokens", name)


def check_stream_options(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"Invalid 'stream_options': expected an object, got {_shown(options)}.", "invalid_stream_options", "stream_options")


def check_prompt(body: dict[str, Any]) -> None:
    """A completion's prompt is text or a list (of texts or tokens), as the echo engine reads it."""
    prompt = body["prompt"]
    if not isinstance(prompt, (str, list)):
        raise bad_request(f"Invalid 'prompt': expected a string or a list, got {_shown(prompt)}.", "invalid_prompt", "prompt")


def check_responses(body: dict[str, Any]) -> None:
    """A Responses request's `input` is text or a list of items, `previous_response_id` a
    string (the gateway routes by it) and `tools` a list: what the prompt estimate, routing and
    the translators read. Items themselves are the upstream's to judge."""
    items = body["input"]
    if not isinstance(items, (str, list)):
        raise bad_request(f"Invalid 'input': expected a string or a list of items, got {_shown(items)}.", "invalid_input", "input")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise bad_request(f"Invalid 'previous_response_id': expected a string, got {_shown(previous)}.", "invalid_previous_response_id", "previous_response_id")
    _check_list(body, "tools", "tools", "invalid_tools")


def check_chat(body: dict[str, Any]) -> None:
    """What the Anthropic and Gemini translators read of an OpenAI chat request. Checked
    whatever the provider: the same request may fail over to one that translates."""
    _check_list(body, "tools", "tools", "invalid_tools")
    for i, message in enumerate(body["messages"]):
        if isinstance(message, dict):
            _check_chat_message(message, f"messages[{i}]")


def _check_chat_message(message: dict[str, Any], where: str) -> None:
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict):
                _check_chat_part(part, f"{where}.content[{j}]")
    tool_calls = _check_list(message, "tool_calls", f"{where}.tool_calls")
    for j, call in enumerate(tool_calls):
        if isinstance(call, dict) and call.get("function") is not None and not isinstance(call["function"], dict):
            raise invalid_content(f"{where}.tool_calls[{j}].function", "an object", call["function"])


def _check_chat_part(part: dict[str, Any], where: str) -> None:
    if part.get("type") == "text":
        _check_text(part, where)
    elif part.get("type") == "image_url":
        image = part.get("image_url")
        if image is not None and not isinstance(image, dict):
            raise invalid_content(f"{where}.image_url", "an object", image)
        if image is not None and not isinstance(image.get("url", ""), str):
            raise invalid_content(f"{where}.image_url.url", "a string", image["url"])


def check_messages(body: dict[str, Any]) -> None:
    """What the translator to the OpenAI chat format reads of an Anthropic Messages request."""
    system = body.get("system")
    if isinstance(system, list):
        _check_text_blocks(system, "system")
    elif system is not None and not isinstance(system, str):
        raise invalid_content("system", "a string or a list of text blocks", system)
    _check_list(body, "tools", "tools", "invalid_tools")
    for i, message in enumerate(body["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, block in enumerate(content):
                if isinstance(block, dict):
                    _check_block(block, f"messages[{i}].content[{j}]")


def _check_block(block: dict[str, Any], where: str) -> None:
    kind = block.get("type")
    if kind == "text":
        _check_text(block, where)
    elif kind == "image":
        source = block.get("source")
        if source is not None and not isinstance(source, dict):
            raise invalid_content(f"{where}.source", "an object", source)
        for name in ("url", "data", "media_type"):
            if source is not None and not isinstance(source.get(name, ""), str):
                raise invalid_content(f"{where}.source.{name}", "a string", source[name])
    elif kind == "tool_result":
        inner = block.get("content")
        if isinstance(inner, list):
            _check_text_blocks(inner, f"{where}.content")
        elif inner is not None and not isinstance(inner, str):
            raise invalid_content(f"{where}.content", "a string or a list of blocks", inner)


def _check_text_blocks(blocks: list[Any], where: str) -> None:
    for i, block in enumerate(blocks):
        if isinstance(block, dict):
            _check_text(block, f"{where}[{i}]")


def _check_text(part: dict[str, Any], where: str) -> None:
    if not isinstance(part.get("text", ""), str):
        raise invalid_content(f"{where}.text", "a string", part["text"])


def _check_list(body: dict[str, Any], name: str, where: str, code: str = "invalid_content") -> list[Any]:
    """`body[name]` if it is a list; [] if absent or null; a 400 otherwise."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(f"Invalid '{where}': expected a list, got {_shown(value)}.", code, where)
    return value


def invalid_content(where: str, expected: str, value: Any) -> GatewayError:
    return bad_request(f"Invalid '{where}': expected {expected}, got {_shown(value)}.", "invalid_content", where)


def _shown(value: Any) -> str:
    """A value for an error message: numbers as they are, anything else by its JSON type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "null"
