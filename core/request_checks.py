"""Checks of the client JSON the gateway reads itself, before anything reads it.

A body is parsed once, and whatever handles it later (the serialisers that send it on,
`str()` in the estimates) must be able to take it: its nesting is capped here, at parse.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.errors import GatewayError, bad_request

# orjson writes at most 254 levels, the translators add a few, and str() or json.dumps of a
# value overflow the stack near 1,000: a cap well below all of them, far above real requests.
MAX_JSON_DEPTH = 128


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
