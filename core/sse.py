"""Server-sent events: split a byte stream into whole events without buffering the stream."""

from __future__ import annotations

import json
import re
from typing import Any

_EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE = b"[DONE]"


class SseSplitter:
    """Feed arbitrary byte chunks; get back complete events (each with its blank-line ending)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk if self._buffer else chunk
        if b"\r" not in data:  # the usual case: plain newlines, split in C
            *whole, self._buffer = data.split(b"\n\n")
            return [event + b"\n\n" for event in whole]
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._buffer = data[start:]
        return events

    def rest(self) -> bytes:
        """Whatever trailed the last complete event (a stream cut mid-event)."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None if it has none (comments, pings)."""
    if event.startswith(b"data:") and event.count(b"\n") == 2 and event.endswith(b"\n\n"):
        return event[5:-2].lstrip(b" ")  # the usual one-line event
    parts = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def chat_chunk(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an inner chat stream's event, for the translators that read it
    (/v1/messages and /v1/responses over chat); None for `[DONE]`, comments, data that is
    not an object, and error events (the inner stream's error is taken over at its end)."""
    raw = event_data(event)
    if raw is None or raw == DONE:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and not data.get("error") else None
