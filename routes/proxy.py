"""/v1 proxy endpoints: chat completions, completions, embeddings, messages, models; and the
free Anthropic token count.

The proxied endpoints are plain ASGI apps (routes/_proxied.py: why, and their shared frame).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.config import ApiKey, Config
from core.errors import GatewayError, not_found
from core.providers.client_headers import forwarded_headers
from core.providers.messages import anthropic_error_body
from core.proxy import ENDPOINTS, ProxyRequest, parse_proxy_request
from routes._http import authenticate, current_config, parse_json, read_json, receive_body
from routes._proxied import ProxiedEndpoint
from routes.uploads import UPLOAD_ENDPOINTS_BY_NAME, UploadEndpoint

log = logging.getLogger("tollgate.proxy")


class ProxyEndpoint(ProxiedEndpoint):
    """One proxied JSON endpoint: the body is read whole, then checked."""

    async def read_request(self, receive: Receive, headers: dict[str, str], config: Config) -> ProxyRequest:
        body = parse_json(await receive_body(receive, headers.get("content-length"), config.preferences.max_request_body_bytes))
        return parse_proxy_request(self.endpoint, body)

    async def send_error(self, error: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
        await self.error_response(error)(scope, receive, send)

    def error_response(self, error: GatewayError) -> Response:
        """OpenAI's error shape; Anthropic's on /v1/messages, whose clients expect it."""
        body: dict[str, Any] = anthropic_error_body(error) if self.endpoint == "messages" else error.body()
        return Response(orjson.dumps(body), status_code=error.status, headers=error.headers, media_type="application/json")


async def list_models(request: Request) -> Response:
    """The models this key may use, in OpenAI's list shape."""
    config = current_config(request)
    key = authenticate(request, config)
    models = (_model_object(config, key, name) for name in config.public_models)
    return JSONResponse({"object": "list", "data": [model for model in models if model is not None]})


async def retrieve_model(request: Request) -> Response:
    """One model (a public name or `provider/model`) as OpenAI's model object; 404 for one the
    key may not use, as OpenAI answers, so a key learns nothing of models beyond its reach."""
    config = current_config(request)
    key = authenticate(request, config)
    name = request.path_params["model_id"]
    model = _model_object(config, key, name)
    if model is None:
        raise not_found(f"The model '{name}' does not exist or this API key may not use it.", "model_not_found", "model")
    return JSONResponse(model)


async def count_tokens(request: Request) -> Response:
    """Anthropic's `POST /v1/messages/count_tokens` (Claude Code calls it for `/context` and
    before long requests): Anthropic's own count through an Anthropic provider, the gateway's
    estimate for others (Gateway.count_tokens). Free, but it counts against the key's rate
    limits. The body is checked as /v1/messages checks it, and the key must be one /v1/messages
    would accept for this model (404 / 403 as it answers), in Anthropic's error shape."""
    config = current_config(request)
    key = authenticate(request, config)
    counted = parse_proxy_request("messages", await read_json(request, config.preferences.max_request_body_bytes))
    forwarded = forwarded_headers(request.scope["headers"])
    if forwarded is not None:
        counted = dataclasses.replace(counted, forwarded=forwarded)
    body, headers = await request.app.state.gateway.count_tokens(config, key, counted)
    return Response(body, headers=headers, media_type="application/json")


def _model_object(config: Config, key: ApiKey, name: str) -> dict[str, Any] | None:
    """OpenAI's model object for `name`, owned by the first provider the key may use it through."""
    allowed = [route for route in config.routes.get(name, ()) if key.access.allows(route)]
    label = config.shadowed_labels.get(name)
    if not allowed and label is not None and key.access.allows(label):  # as routes_for serves it
        allowed = [label]
    if not allowed:
        return None
    return {"id": name, "object": "model", "created": int(config.loaded_at or time.time()), "owned_by": allowed[0].provider.name}


# Many clients are configured with a base URL lacking /v1: every proxy path is served both ways.
API_PREFIXES = ("/v1", "")
UNPREFIXED_API_PATHS = ("/chat/completions", "/completions", "/embeddings", "/messages", "/responses", "/images", "/audio", "/moderations", "/models")

# Paths whose clients expect Anthropic's error shape (main.py renders Starlette-raised errors).
ANTHROPIC_PATHS = frozenset(f"{prefix}{path}" for prefix in API_PREFIXES for path in ("/messages", "/messages/count_tokens"))

_ENDPOINTS: dict[str, ProxyEndpoint | UploadEndpoint] = {**{name: ProxyEndpoint(name) for name in ENDPOINTS}, **UPLOAD_ENDPOINTS_BY_NAME}
PROXY_ENDPOINTS = {f"{prefix}/{name}": endpoint for name, endpoint in _ENDPOINTS.items() for prefix in API_PREFIXES}

routes = [
    *(Route(path, endpoint, methods=["POST"]) for path, endpoint in PROXY_ENDPOINTS.items()),
    *(Route(f"{prefix}/messages/count_tokens", count_tokens, methods=["POST"]) for prefix in API_PREFIXES),
    *(Route(f"{prefix}/models", list_models, methods=["GET"]) for prefix in API_PREFIXES),
    *(Route(f"{prefix}/models/{{model_id:path}}", retrieve_model, methods=["GET"]) for prefix in API_PREFIXES),
]
