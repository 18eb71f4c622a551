"""The streaming response for proxied SSE: passes chunks through and settles once at the end."""

from __future__ import annotations

import anyio
from starlette.types import Message, Receive, Scope, Send

from core.proxy import MeteredStream


class ProxyStreamResponse:
    """ASGI response that relays a MeteredStream chunk by chunk.

    A client disconnect (seen on `receive`, or as a failed send) cancels the upstream read at
    once, and `finish` settles with what was streamed. Starlette's StreamingResponse would
    leave the upstream generator to the garbage collector.
    """

    def __init__(self, stream: MeteredStream, headers: dict[str, str]):
        self.stream = stream
        self.headers = [(b"content-type", stream.content_type.encode()), (b"cache-control", b"no-cache")]
        self.headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        delivered = False  # once the whole stream is sent, a disconnect is just the client leaving
        chunks = self.stream.__aiter__()
        try:
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    nonlocal disconnected
                    message: Message = {"type": ""}
                    while message["type"] != "http.disconnect":
                        message = await receive()
                    disconnected = True
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                delivered = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:
            disconnected = True
        finally:
            self.stream.finish(disconnected and not delivered)
            with anyio.CancelScope(shield=True):
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
