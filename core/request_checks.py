"""Checks of the client JSON the gateway reads itself, before anything reads it.

The upstream judges what a request means; but the gateway reads parts of it on the way:
`max_tokens` for the reservation, `stream_options` to ask for usage, and, for vendors with
another format, the messages the translators rewrite. Each such part is checked here for
the shape its reader expects, so a malformed value is a 400 naming the parameter instead
of a crash in a translator. Whatever the gateway does not read passes untouched.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.errors import GatewayError, bad_request

# orjson writes at most 254 levels, the translators add a few, and str() or json.dumps of a
# value overflow the stack near 1,000: a cap well below all of them, far above real requests.
MAX_JSON_DEPTH = 128
MAX_OUTPUT_TOKENS = 2**31 - 1  # OpenAI's bound for max_tokens: a signed 32-bit integer
_LIMIT_FIELDS = {"chat/completions": ("max_tokens", "max_completion_tokens"), "completions": ("max_tokens",), "messages": ("max_tokens",)}


def check_nesting(value: Any, raw: bytes) -> None:
    """400 for a JSON document nested deeper than MAX_JSON_DEPTH. A document with fewer
    opening brackets than that cannot be (nearly every request): it is not walked."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(value):
        raise too_deeply_nested()


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and objects in `value` nest more than `limit` levels (no recursion:
    the value may be as deep as the parser allows)."""
    if not isinstance(value, (dict, list)):
        return False
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                pending.append((child, depth + 1))
    return False


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
    return None if too_deep(value) else value


def check_request(endpoint: str, body: dict[str, Any]) -> None:
    """The parts of a proxied request body the gateway reads, checked for their shape."""
    for name in _LIMIT_FIELDS.get(endpoint, ()):
        check_max_tokens(body, name)


def check_max_tokens(body: dict[str, Any], name: str) -> None:
    """A positive whole number that fits in 32 bits, as OpenAI requires (a bool is not one)."""
    value = body.get(name)
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_OUTPUT_TOKENS):
        message = f"Invalid '{name}': expected a whole number from 1 to {MAX_OUTPUT_TOKENS}, got {_shown(value)}."
        raise bad_request(message, "invalid_max_tokens", name)


def _shown(value: Any) -> str:
    """A value for an error message: numbers as they are, anything else by its JSON type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "null"
