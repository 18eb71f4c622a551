"""/v1 proxy endpoints: chat completions, completions, embeddings, models."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.proxy import MeteredStream, parse_proxy_request
from routes._http import authenticate, current_config, read_json
from routes._stream import ProxyStreamResponse


def _proxy(endpoint: str):  # type: ignore[no-untyped-def]
    async def handle(request: Request) -> Response | ProxyStreamResponse:
        config = current_config(request)
        key = authenticate(request, config)
        body = await read_json(request, config.preferences.max_request_body_bytes)
        proxy_request = parse_proxy_request(endpoint, body)
        result = await request.app.state.gateway.handle(config, key, proxy_request)
        headers = {"x-request-id": proxy_request.request_id, "x-tollgate-provider": result.route.provider.name}
        if isinstance(result, MeteredStream):
            return ProxyStreamResponse(result, {**headers, **result.headers})
        headers.update(result.headers)
        return Response(result.reply.body, status_code=result.reply.status, media_type=result.reply.content_type, headers=headers)

    handle.__name__ = endpoint.replace("/", "_")
    return handle


async def list_models(request: Request) -> Response:
    """The models this key may use, in OpenAI's list shape."""
    config = current_config(request)
    key = authenticate(request, config)
    created = int(config.loaded_at or time.time())
    data = []
    for name in config.public_models:
        allowed = [route for route in config.routes[name] if key.access.allows(route)]
        if allowed:
            data.append({"id": name, "object": "model", "created": created, "owned_by": allowed[0].provider.name})
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route("/v1/chat/completions", _proxy("chat/completions"), methods=["POST"]),
    Route("/v1/completions", _proxy("completions"), methods=["POST"]),
    Route("/v1/embeddings", _proxy("embeddings"), methods=["POST"]),
    Route("/v1/messages", _proxy("messages"), methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
