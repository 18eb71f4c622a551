"""A fake vendor that holds streams open, for bench/streams_bench.py: every POST is answered
with an OpenAI chat-completion stream of `--events` SSE events `--spacing-ms` apart (the last
carries the usage, then `data: [DONE]`), like a model producing tokens. GET /stats answers
how many streams started, completed and were cut off (the peer closed mid-stream), and the
peak of open streams (GET /stats?reset starts a new peak).

    python bench/stream_vendor.py --port 9950 --events 20 --spacing-ms 50

One asyncio protocol per connection and one timer per stream, written on the bare transport
(no HTTP framework): 20,000 open streams cost it a fraction of a core, so the process under
test, not the fake, is what saturates. Keep-alive; no pipelining (no client here pipelines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
from dataclasses import dataclass

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
END = b"0\r\n\r\n"
MAX_HEAD = 64 * 1024


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_events(events: int) -> list[bytes]:
    """`events` SSE events as chunks: content deltas, then one with finish_reason and usage and [DONE]."""
    chunk = '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}'
    out = [chunked(b"data: " + (chunk % n).encode() + b"\n\n") for n in range(events - 1)]
    last = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": events - 1, "total_tokens": 12 + events - 1},
    }
    out.append(chunked(b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n") + END)
    return out


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    cut_off: int = 0
    open_connections: int = 0
    peak_open_streams: int = 0
    open_streams: int = 0


class StreamProtocol(asyncio.Protocol):
    """One client connection: requests read one at a time, each answered by a timed stream."""

    def __init__(self, events: list[bytes], spacing: float, stats: Stats):
        self.events, self.spacing, self.stats = events, spacing, stats
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent = 0
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        if self.streaming:
            self.stats.cut_off += 1
            self._stream_ended()
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD and self.transport is not None:
                self.transport.close()
            return
        head = self.buffer[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return  # the body is still coming
        method = head.split(" ", 1)[0]
        target = head.split(" ", 2)[1] if head.count(" ") >= 2 else "/"
        self.buffer = self.buffer[end + 4 + length :]
        assert self.transport is not None
        if method == "GET" and target.startswith("/stats"):
            body = json.dumps(self.stats.__dict__).encode()
            if "reset" in target:  # a new run: its own peak
                self.stats.peak_open_streams = self.stats.open_streams
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return self._next_request()
        self.stats.started += 1
        self.stats.open_streams += 1
        self.stats.peak_open_streams = max(self.stats.peak_open_streams, self.stats.open_streams)
        self.streaming, self.sent = True, 0
        self.transport.write(HEAD)
        self.timer = asyncio.get_running_loop().call_later(self.spacing, self._send_next)

    def _send_next(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(self.events[self.sent])
        self.sent += 1
        if self.sent < len(self.events):
            self.timer = asyncio.get_running_loop().call_later(self.spacing, self._send_next)
            return
        self.stats.completed += 1
        self._stream_ended()
        self._next_request()

    def _stream_ended(self) -> None:
        self.streaming = False
        self.stats.open_streams -= 1


async def serve(host: str, port: int, events: int, spacing: float) -> None:
    stats, encoded = Stats(), stream_events(events)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StreamProtocol(encoded, spacing, stats), host, port, backlog=65535, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--spacing-ms", type=float, default=50)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]
    runner(serve(args.host, args.port, args.events, args.spacing_ms / 1000))


if __name__ == "__main__":
    main()
