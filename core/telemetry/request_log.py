"""One log line per proxied request, and the log formats (`--log-format text|json`).

The line is written at `info` by the `tollgate.requests` logger, when the request has been
answered: time, request id, key name (never the secret), model, provider, status, tokens,
cost, duration, failovers. With `--log-format json` every log line is one JSON object, the
request's fields at its top level, for a log shipper to index without parsing text.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
from datetime import UTC, datetime
from typing import Any

import orjson

from core.pricing import format_usd
from core.telemetry.facts import RequestFacts

log = logging.getLogger("tollgate.requests")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class RequestLine:
    """The request's fields; rendered as `key=value` text only if a text handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields

    def __str__(self) -> str:
        return " ".join([f"{name}={_text(value) if value.__class__ is str else value}" for name, value in self.fields.items()])


def _text(value: str) -> str:
    """A value as it is, or JSON-quoted when it would not read back as one word (empty, spaces, quotes)."""
    return value if value and " " not in value and '"' not in value else orjson.dumps(value).decode()


def log_request(facts: RequestFacts) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    record = facts.settled
    fields: dict[str, Any] = {
        "request_id": facts.request_id,
        "endpoint": facts.endpoint,
        "key": facts.key_name,
        "model": facts.model,
        "provider": facts.provider,
        "status": facts.status,
        "stream": facts.stream,
        "prompt_tokens": record.prompt_tokens if record is not None else 0,
        "completion_tokens": record.completion_tokens if record is not None else 0,
        "cost_usd": format_usd(record.cost_nanos) if record is not None else "0",
        "duration_ms": round((facts.ended - facts.started) * 1000, 1),
        "failovers": facts.failovers,
    }
    if facts.first_byte is not None:
        fields["first_byte_ms"] = round((facts.first_byte - facts.started) * 1000, 1)
    if facts.error_code:
        fields["error"] = facts.error_code
    if record is not None and record.status != "ok":
        fields["outcome"] = record.status  # estimated, error, client_disconnected
    log.info("%s", RequestLine(fields))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message; a request
    line's fields at the top level instead of its message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        line = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else None
        if isinstance(line, RequestLine):
            entry["message"] = "request"
            entry.update(line.fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's level and format, for the gateway and uvicorn's own lines alike.

    Lines are written by a thread of their own (the logging cookbook's QueueHandler and
    QueueListener): with a line per request, a stderr that blocks (a full pipe to a slow log
    collector) would otherwise stop the event loop and every request with it. The event loop
    only makes the record and queues it; formatting and writing happen on the thread.

    A log line costs less without what no format here shows: the caller's file and line (a
    stack walk per line), thread and process (the logging HOWTO's "Optimization" section)."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _listener
    _stop_writing()
    writer = logging.StreamHandler()
    writer.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(lines, writer)
    _listener.start()
    atexit.register(_stop_writing)  # the lines still queued are written before the process exits
    root = logging.getLogger()
    root.handlers[:] = [_RecordQueue(lines)]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.error").addFilter(_denial_is_no_error)  # once: the same filter is not added twice


# uvicorn's WebSocket implementations log this after every handshake refused with an HTTP
# response (the ASGI denial-response extension) though the client got the response intact. The
# gateway's only WebSocket route refuses that way (routes/responses.refuse_websocket: Codex
# CLI's attempt, answered 426 so it uses HTTPS), so the line would be a false error per session.
_FALSE_HANDSHAKE_ERROR = "ASGI callable returned without completing handshake."


def _denial_is_no_error(record: logging.LogRecord) -> bool:
    return record.msg != _FALSE_HANDSHAKE_ERROR


_listener: logging.handlers.QueueListener | None = None


def _stop_writing() -> None:
    """Write the lines still queued and stop the writing thread (once, however often called)."""
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()


class _RecordQueue(logging.handlers.QueueHandler):
    """Queues the record as it is: the listener is in this process, so nothing needs to be
    made picklable first (QueueHandler.prepare would format the message here, on the loop)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record
