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
            if is_form(request):
                body = await form_body(request)
            else:
                raw = await request.body()
                body = json.loads(raw) if raw else {}  # a GET or DELETE (stored responses) has none
            self.seen.append(SeenRequest(provider, endpoint_name, body, dict(request.headers), request.url.path, request.url.query))
            handler = self.handlers.get(provider, openai_like)
            return await handler(body, request)

        # Vendors' URL shapes: OpenAI `/v1/...`, Azure `/openai/deployments/...`, Gemini `/v1beta/...`.
        return Starlette(routes=[Route("/{provider}/{endpoint:path}", endpoint, methods=["POST", "GET", "DELETE"])])


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


def model_list(vendor: str, models: list[str], then: Handler = openai_like, page_size: int = 2) -> Handler:
    """Answers GET `…/models` as `vendor` lists its models (`openai`: `data[].id`; `anthropic`:
    pages of `page_size` with `has_more`/`last_id`, read from `after_id`; `gemini`: `models[].name`
    with their `supportedGenerationMethods`, paged by `pageToken`); everything else goes to `then`.
    A Gemini name ending in `-aqa` is listed with only `generateAnswer` (not callable)."""

    async def handler(body: dict[str, Any], request: Request) -> Response:
        if request.method != "GET" or not request.url.path.endswith("/models"):
            return await then(body, request)
        if vendor == "openai":
            return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "fake"} for name in models]})
        cursor = request.query_params.get("after_id" if vendor == "anthropic" else "pageToken")
        start = models.index(cursor) + 1 if vendor == "anthropic" and cursor else int(cursor or 0)
        page = models[start : start + page_size]
        more = start + page_size < len(models)
        if vendor == "anthropic":
            data = [{"type": "model", "id": name, "display_name": name} for name in page]
            return JSONResponse({"data": data, "has_more": more, "first_id": page[0] if page else None, "last_id": page[-1] if page else None})
        entries = [
            {"name": f"models/{name}", "supportedGenerationMethods": ["generateAnswer"] if name.endswith("-aqa") else ["generateContent"]} for name in page
        ]
        return JSONResponse({"models": entries, **({"nextPageToken": str(start + page_size)} if more else {})})

    return handler


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


RESPONSES_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 100},
    "total_tokens": 1300,
}


@dataclass
class ResponsesVendor:
    """OpenAI's Responses API, faked: creates (JSON or SSE with `event:` lines), and the
    stored-response calls on what it created (retrieve, delete, cancel, input_items).
    `usage` None leaves it out; `cut_after` ends a stream after that many text deltas."""

    usage: dict[str, Any] | None = field(default_factory=lambda: dict(RESPONSES_USAGE))
    words: tuple[str, ...] = ("Hello", " from", " responses")
    cut_after: int | None = None
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    created: int = 0

    async def __call__(self, body: dict[str, Any], request: Request) -> Response:
        path = request.url.path
        tail = path.split("/responses", 1)[1].strip("/") if "/responses" in path else ""
        if not tail:
            return self._create(body)
        response_id, _, action = tail.partition("/")
        found = self.stored.get(response_id)
        if found is None:
            return JSONResponse(
                {"error": {"message": f"Response with id '{response_id}' not found.", "type": "invalid_request_error", "param": None, "code": None}}, 404
            )
        if request.method == "DELETE":
            del self.stored[response_id]
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        if action == "cancel":
            return JSONResponse({**found, "status": "cancelled"})
        if action == "input_items":
            items = self.inputs[response_id]
            items = (
                [{"type": "message", "role": "user", "id": "msg_in", "content": [{"type": "input_text", "text": items}]}] if isinstance(items, str) else items
            )
            return JSONResponse({"object": "list", "data": items, "first_id": "msg_in", "last_id": "msg_in", "has_more": False, "query": request.url.query})
        return JSONResponse(found)

    def _response(self, body: dict[str, Any]) -> dict[str, Any]:
        self.created += 1
        message = {"type": "message", "id": f"msg_{self.created}", "status": "completed", "role": "assistant"}
        message["content"] = [{"type": "output_text", "text": "".join(self.words), "annotations": []}]
        response = {"id": f"resp_fake{self.created}", "object": "response", "created_at": 1, "status": "completed", "model": body.get("model")}
        response.update(output=[message], previous_response_id=body.get("previous_response_id"), store=body.get("store", True))
        if self.usage is not None:
            response["usage"] = self.usage
        if body.get("store", True):
            self.stored[response["id"]] = response
            self.inputs[response["id"]] = body.get("input")
        return response

    def _create(self, body: dict[str, Any]) -> Response:
        response = self._response(body)
        if not body.get("stream"):
            return JSONResponse(response)
        events = responses_events(response, self.words, self.cut_after)

        async def gen():  # type: ignore[no-untyped-def]
            for event in events:
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream")


def responses_event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}).encode() + b"\n\n"


def responses_events(response: dict[str, Any], words: tuple[str, ...], cut_after: int | None = None) -> list[bytes]:
    """A Responses stream: created, a text delta per word, completed (with the usage), or cut
    off (no terminal event) after `cut_after` deltas."""
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [responses_event("response.created", {"sequence_number": 0, "response": started})]
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    for number, word in enumerate(words[:cut_after] if cut_after is not None else words):
        events.append(responses_event("response.output_text.delta", {"sequence_number": number + 1, **where, "delta": word}))
    if cut_after is None:
        events.append(responses_event("response.completed", {"sequence_number": len(words) + 1, "response": response}))
    return events


# --- the media endpoints and moderations (test/test_media.py) --------------------------------

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR4nGNgAAIAAAUAAXpeqz8AAAAASUVORK5CYII="


def images_like(usage: dict[str, Any] | None = None) -> Handler:
    """OpenAI's images answer: `n` images in `data`; gpt-image-1's token `usage` when given."""

    async def handler(body: dict[str, Any], _request: Request) -> Response:
        answer: dict[str, Any] = {"created": 1, "data": [{"b64_json": PNG_B64} for _ in range(body.get("n") or 1)]}
        if usage is not None:
            answer["usage"] = usage
        return JSONResponse(answer)

    return handler


async def moderation_like(body: dict[str, Any], _request: Request) -> Response:
    """OpenAI's moderation answer, nothing flagged, no usage (OpenAI reports none)."""
    result = {"flagged": False, "categories": {"hate": False}, "category_scores": {"hate": 0.001}}
    return JSONResponse({"id": "modr-fake", "model": body.get("model"), "results": [result]})


def speech_like(chunks: list[bytes], between: threading.Event | None = None, fail_after: bool = False) -> Handler:
    """Raw audio in `chunks`; after the first, waits for `between` (so a test can see the first
    arrive before the upstream has finished); `fail_after` breaks the connection at the end."""

    async def handler(_body: dict[str, Any], _request: Request) -> Response:
        async def gen():  # type: ignore[no-untyped-def]
            yield chunks[0]
            while between is not None and not between.is_set():
                await asyncio.sleep(0.01)
            for chunk in chunks[1:]:
                yield chunk
            if fail_after:
                raise RuntimeError("upstream died mid-audio")

        return StreamingResponse(gen(), media_type="audio/mpeg")

    return handler


def image_stream_like(usage: dict[str, Any] | None, between: threading.Event | None = None) -> Handler:
    """A GPT image model's stream: a partial image, then (after `between`, when given) the
    completed image with its token `usage`, as OpenAI sends them (named events, no [DONE])."""

    def event(payload: dict[str, Any]) -> bytes:
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

    async def handler(_body: dict[str, Any], _request: Request) -> Response:
        base = {"b64_json": PNG_B64, "created_at": 1, "output_format": "png", "size": "1024x1024", "quality": "low", "background": "opaque"}

        async def gen():  # type: ignore[no-untyped-def]
            yield event({**base, "type": "image_generation.partial_image", "partial_image_index": 0})
            while between is not None and not between.is_set():
                await asyncio.sleep(0.01)
            yield event({**base, "type": "image_generation.completed", **({"usage": usage} if usage else {})})

        return StreamingResponse(gen(), media_type="text/event-stream")

    return handler
