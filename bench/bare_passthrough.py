"""The reference for the benchmark: the thinnest Starlette pass-through using the same HTTP
client as the gateway (one aiohttp session), with no auth, no billing, no parsing.

    UPSTREAM=http://127.0.0.1:9901 uvicorn bench.bare_passthrough:app
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9901")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app.state.http.close()


async def chat(request: Request) -> Response:
    body = await request.body()
    stream = b'"stream":true' in body.replace(b" ", b"")
    path = "sse" if stream else "json"  # the same nginx paths as the gateway's two bench providers
    response = await request.app.state.http.post(f"{UPSTREAM}/{path}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    if not stream:
        data = await response.read()
        response.release()
        return Response(data, response.status, media_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        finally:
            response.release()

    return StreamingResponse(relay(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)
