"""The streaming response for proxied streams (SSE, or speech's raw audio): passes chunks through and settles once at the end."""

from __future__ import annotations

import asyncio
import time

from starlette.types import Message, Receive, Scope, Send

from core.proxy import CompletedCall, MeteredStream
from core.telemetry.facts import ERROR, RequestFacts


class ProxyStreamResponse:
    """ASGI response that relays a MeteredStream chunk by chunk.

    A client disconnect (seen on `receive`, or as a failed send) cancels the upstream read at
    once, and `finish` settles with what was streamed. Starlette's StreamingResponse would
    leave the upstream generator to the garbage collector. The disconnect watcher is one
    plain task that cancels the relaying task: an anyio task group per stream cost more than
    the relaying itself (bench/run.py).

    A client that hangs up once it has the stream's end marker has had everything, so that
    is a finished stream, not a disconnect: the openai SDK hangs up right after `[DONE]`,
    often while the relay still awaits the upstream's own end of stream.
    """

    __slots__ = ("_loop", "_relaying", "disconnected", "facts", "headers", "stream")

    def __init__(self, stream: MeteredStream, headers: dict[str, str], loop: asyncio.AbstractEventLoop, facts: RequestFacts):
        """`loop` is the one this response runs on: asyncio's own lookup of the running loop
        makes a getpid() syscall per call in Python 3.11 (py-spy: ~6% of a streamed request)."""
        self.stream = stream
        self.facts = facts  # learns when the first chunk went out
        self._loop = loop
        self.headers = [(b"content-type", stream.content_type.encode()), (b"cache-control", b"no-cache")]
        self.headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        self.disconnected = False
        self._relaying: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delivered = False  # once the end marker is sent, a disconnect is just the client leaving
        upstream = self.stream.upstream
        chunks = self.stream.__aiter__()
        self._relaying = asyncio.current_task(self._loop)
        watcher = self._loop.create_task(self._watch_disconnect(receive))
        report_every = self.stream.report_every  # fleet mode: progress reports of long streams
        next_report = self._loop.time() + report_every if report_every is not None else None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            sent, limit = 0, self.stream.max_bytes
            async for chunk in chunks:
                if not sent:
                    self.facts.first_byte = time.perf_counter()
                sent += len(chunk)
                if sent > limit:
                    await send({"type": "http.response.body", "body": self.stream.cut_off(), "more_body": True})
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                delivered = upstream.complete
                if next_report is not None and report_every is not None and self._loop.time() >= next_report:
                    self.stream.report_progress()
                    next_report = self._loop.time() + report_every
            delivered = True
            await self._end_body(send)
        except asyncio.CancelledError:
            if not self.disconnected:
                raise  # cancelled from outside (shutdown): not ours to swallow
            self._uncancel()
        except OSError:
            self.disconnected = True
        except Exception:  # reading or translating the upstream raised: the client's last event says so, billed as a cut stream
            self._relaying = None  # a disconnect now shows as a failed send, not a cancellation
            await self._end_with(send, self.stream.unreadable())
        finally:
            self._relaying = None  # from here on a disconnect cancels nothing
            watcher.cancel()
            self.stream.finish(self.disconnected and not delivered)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())

    async def _end_with(self, send: Send, event: bytes) -> None:
        """Send the stream's last event and end the body (the client may be gone by now)."""
        try:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await self._end_body(send)
        except OSError:
            self.disconnected = True

    async def _end_body(self, send: Send) -> None:
        """End the body, unless the stream was binary and failed: then it is left unended and
        the server closes the connection, so the client sees its audio cut short."""
        if not self.stream.aborted:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive) -> None:
        message: Message = {"type": ""}
        while message["type"] != "http.disconnect":
            message = await receive()
        self.disconnected = True
        if self._relaying is not None:
            self._relaying.cancel()

    def _uncancel(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


async def send_answer(request_id: str, result: CompletedCall | MeteredStream, scope: Scope, receive: Receive, send: Send, facts: RequestFacts) -> None:
    """A proxied request's answer: the stream relayed, or the reply in one body, with the
    request id, the provider and the billing headers."""
    headers = {"x-request-id": request_id, "x-tollgate-provider": result.route.provider.name, **result.headers}
    if isinstance(result, MeteredStream):
        facts.status = 200
        await ProxyStreamResponse(result, headers, scope["app"].state.gateway.loop, facts)(scope, receive, send)
        if facts.attempts:  # the answering attempt lasted as long as its stream
            facts.attempts[-1].ended = time.perf_counter()
            if result.upstream.error is not None:  # the provider failed mid-stream
                facts.attempts[-1].outcome = ERROR
                facts.error_code = result.upstream.error.code
        return
    reply = result.reply
    facts.status = reply.status
    raw_headers = [(b"content-type", reply.content_type.encode("latin-1")), (b"content-length", str(len(reply.body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": reply.body})
