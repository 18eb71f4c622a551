"""Stored responses of OpenAI's Responses API: retrieve, delete, cancel, list input items.

Each call goes to the provider that holds the response, with that provider's upstream key,
and only the key that made the response may make it: another key, or an unknown id, gets
404 `response_not_found`. They are not billed (no reservation, no ledger row, no limit
used): what they return was paid for when it was made. (Creating one is POST /v1/responses,
a proxied endpoint: routes/proxy.py.)
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from core.config import Config, ModelRoute
from core.errors import GatewayError, bad_request
from core.providers.responses_native import call_stored
from core.stored_responses import StoredResponses, response_not_found
from core.upstream_gate import UpstreamBusy
from routes._http import authenticate, current_config
from routes.proxy import API_PREFIXES


async def retrieve(request: Request) -> Response:
    return await _forward(request, "GET", "")


async def delete(request: Request) -> Response:
    return await _forward(request, "DELETE", "")


async def cancel(request: Request) -> Response:
    return await _forward(request, "POST", "/cancel")


async def input_items(request: Request) -> Response:
    return await _forward(request, "GET", "/input_items")


async def _forward(request: Request, method: str, suffix: str) -> Response:
    """Check the caller owns the response, then relay the call to the provider holding it."""
    config = current_config(request)
    key = authenticate(request, config)
    if method == "GET" and not suffix and request.query_params.get("stream", "").lower() == "true":
        message = "Streaming a stored response again is not supported by this gateway: retrieve it without stream=true."
        raise bad_request(message, "stream_not_supported", "stream")
    state = request.app.state
    stored_responses: StoredResponses = state.stored_responses
    response_id = request.path_params["response_id"]
    stored = await stored_responses.owned(response_id, key)
    route = _route_of(config, stored.provider)
    if route is None:  # the provider is no longer configured: nothing can reach the response
        raise response_not_found(response_id)
    gateway = state.gateway
    upstream_key = gateway.scheduler.next_upstream_key(route.provider)
    path = quote(response_id, safe="") + suffix
    try:
        async with gateway.gate.slot(route.provider):  # the call counts against the provider's max_connections
            reply = await call_stored(gateway.http, route, upstream_key, method, path, request.url.query, config.preferences.max_response_body_bytes)
    except UpstreamBusy as busy:
        raise busy.error from None  # only this provider holds the response: no other to try
    return Response(reply.body, reply.status, media_type=reply.content_type)


async def refuse_websocket(websocket: WebSocket) -> None:
    """Codex CLI opens a WebSocket on /v1/responses before it uses HTTPS (when its provider
    has `supports_websockets`, as OpenAI's own does). The gateway serves the Responses API over
    HTTPS only, and says so with 426 Upgrade Required, which Codex takes as "use HTTPS" at
    once; the 403 a server without the route answers makes it retry five times first (~7 s).
    The body is OpenAI's error shape, for a person reading it."""
    error = GatewayError(426, "invalid_request_error", "websocket_not_supported", "This gateway serves the Responses API over HTTPS only: POST /v1/responses.")
    try:
        await websocket.send_denial_response(JSONResponse(error.body(), error.status))
    except RuntimeError:  # a server without the ASGI denial-response extension: a plain refusal
        await websocket.close()


def _route_of(config: Config, provider: str) -> ModelRoute | None:
    """A route of the provider (for its URL, key and timeout), the most patient one."""
    routes = [route for routes in config.routes.values() for route in routes if route.provider.name == provider]
    return max(routes, key=lambda route: route.timeout) if routes else None


routes = [
    route
    for prefix in API_PREFIXES
    for route in (
        Route(f"{prefix}/responses/{{response_id}}", retrieve, methods=["GET"]),
        Route(f"{prefix}/responses/{{response_id}}", delete, methods=["DELETE"]),
        Route(f"{prefix}/responses/{{response_id}}/cancel", cancel, methods=["POST"]),
        Route(f"{prefix}/responses/{{response_id}}/input_items", input_items, methods=["GET"]),
        WebSocketRoute(f"{prefix}/responses", refuse_websocket),
    )
]
