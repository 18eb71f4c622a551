"""Real servers for tests: the gateway and a fake upstream, each on uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class ServerThread:
    """Runs an ASGI app under uvicorn in a background thread on a free port."""

    def __init__(self, app: Any):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on", proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(serve())

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's event loop (fault injection into the running app)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


Handler = Callable[[dict[str, Any], Request], Awaitable[Response]]


@dataclass
class SeenRequest:
    provider: str
    endpoint: str
    body: dict[str, Any]
    headers: dict[str, str]
    path: str = ""
    query: str = ""


@dataclass
class FakeUpstream:
    """An OpenAI-compatible fake vendor. Each provider in a test config points at
    `{url}/{provider}/v1`; `script(provider, handler)` changes what that provider answers."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    seen: list[SeenRequest] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    server: ServerThread | None = None

    def base_url(self, provider: str) -> str:
        assert self.server is not None
        return f"{self.server.url}/{provider}/v1"

    def script(self, provider: str, handler: Handler) -> None:
        self.handlers[provider] = handler

    def providers_seen(self) -> list[str]:
        return [request.provider for request in self.seen]

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> Response:
            provider = request.path_params["provider"]
            endpoint_name = request.path_params["endpoint"]
            body = await form_body(request) if is_form(request) else json.loads(await request.body())
            self.seen.append(SeenRequest(provider, endpoint_name, body, dict(request.headers), request.url.path, request.url.query))
            handler = self.handlers.get(provider, openai_like)
            return await handler(body, request)

        # Vendors' URL shapes: OpenAI `/v1/...`, Azure `/openai/deployments/...`, Gemini `/v1beta/...`.
        return Starlette(routes=[Route("/{provider}/{endpoint:path}", endpoint, methods=["POST"])])


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def form_body(request: Request) -> dict[str, Any]:
    """A multipart form as the fake's `body`: text fields as strings (a repeated name as a list
    of them), each file as {"filename", "content_type", "content"}."""
    body: dict[str, Any] = {}
    async with request.form(max_part_size=64 * 1024 * 1024) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                item: Any = value
            else:
                item = {"filename": value.filename, "content_type": value.content_type, "content": await value.read()}
            if name in body:
                previous = body[name]
                body[name] = [*previous, item] if isinstance(previous, list) else [previous, item]
            else:
                body[name] = item
    return body


def completion_body(body: dict[str, Any], text: str = "Hello from upstream") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def stream_chunks(body: dict[str, Any], words: list[str]) -> list[bytes]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": body.get("model")}
    with_usage = (body.get("stream_options") or {}).get("include_usage")
    extra = {"usage": None} if with_usage else {}
    chunks = [sse({**base, **extra, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}) for w in words]
    chunks.append(sse({**base, **extra, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if with_usage:
        chunks.append(sse({**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(words), "total_tokens": 11 + len(words)}}))
    chunks.append(sse(b"[DONE]"))
    return chunks


async def openai_like(body: dict[str, Any], request: Request) -> Response:
    """The default fake answer: a normal completion, streamed when asked."""
    if body.get("stream"):
        chunks = stream_chunks(body, ["Hello", " from", " upstream"])

        async def gen():  # type: ignore[no-untyped-def]
            for chunk in chunks:
                yield chunk

        return StreamingResponse(gen(), media_type="text/event-stream")
    if request.url.path.endswith("/embeddings"):
        return JSONResponse(embedding_body(body))
    return JSONResponse(completion_body(body))


def embedding_body(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's embeddings answer: a `data` list (an answer without one is not an answer)."""
    vector = {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}
    return {"object": "list", "data": [vector], "model": body.get("model"), "usage": {"prompt_tokens": 5, "total_tokens": 5}}


def fail(status: int, body: Any = None) -> Handler:
    async def handler(_body: dict[str, Any], _request: Request) -> Response:
        if body is None:
            return Response(f"upstream says {status}", status_code=status, media_type="text/plain")
        return JSONResponse(body, status_code=status)

    return handler


def hang(seconds: float) -> Handler:
    async def handler(body: dict[str, Any], request: Request) -> Response:
        await asyncio.sleep(seconds)
        return await openai_like(body, request)

    return handler


def held_stream(release: threading.Event, words: list[str]) -> Handler:
    """Streams the first word at once and the rest only after `release` is set."""

    async def handler(body: dict[str, Any], request: Request) -> Response:
        chunks = stream_chunks(body, words)

        async def gen():  # type: ignore[no-untyped-def]
            yield chunks[0]
            while not release.is_set():
                await asyncio.sleep(0.01)
            for chunk in chunks[1:]:
                yield chunk

        return StreamingResponse(gen(), media_type="text/event-stream")

    return handler


@dataclass
class WebhookReceiver:
    """Collects webhook POSTs; answers HTTP 500 to the first `fail_first` of them, and each
    answer `answer_after` seconds after the POST arrived (a slow receiver)."""

    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    fail_first: int = 0
    answer_after: float = 0
    server: ServerThread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"{self.server.url}/hook"

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.attempts += 1
            if self.attempts <= self.fail_first:
                return Response("try later", status_code=500)
            self.received.append(json.loads(await request.body()))
            await asyncio.sleep(self.answer_after)
            return Response(status_code=204)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def wait_for(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} webhook calls, got {self.received}")
            time.sleep(0.02)
        return self.received


def streamed_text(chunks: Any) -> str:
    """The text an OpenAI chat stream delivered, from the SDK's chunks."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
