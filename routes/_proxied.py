"""The frame every proxied endpoint shares (routes/proxy.py's JSON ones, routes/uploads.py's
multipart ones): authenticate, read the request, run the gateway, answer, and tell the
telemetry what happened, whatever happened.

Plain ASGI apps rather than Starlette request handlers: they are the hot path, and building
Starlette's Request/Response objects and passing its exception middleware cost more per call
than all of billing (see bench/run.py).
"""

from __future__ import annotations

import dataclasses

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from core.config import Config
from core.errors import GatewayError
from core.providers.client_headers import forwarded_headers
from core.proxy import ProxyRequest
from core.telemetry import TRACE_HEADERS, Telemetry
from core.telemetry.facts import CLIENT_CLOSED, RequestFacts
from core.upstream_gate import ClientLeft
from routes._http import authenticate_headers, internal_error, request_headers
from routes._stream import send_answer

# The request headers every proxied endpoint reads, picked out of the ASGI scope in one pass.
READ_HEADERS = frozenset({b"authorization", b"x-api-key", b"content-length", b"user-agent", b"x-forwarded-for", *TRACE_HEADERS})


class ProxiedEndpoint:
    """One proxied endpoint; subclasses read its request and shape its errors."""

    read_headers = READ_HEADERS

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.__name__ = endpoint.replace("/", "_")  # Starlette names routes after their endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        telemetry: Telemetry = state.telemetry
        facts = RequestFacts(self.endpoint)
        telemetry.start(facts)
        request: ProxyRequest | None = None
        try:
            try:
                config: Config = state.store.current  # this request's config to the end, whatever reloads
                headers = request_headers(scope, self.read_headers)
                telemetry.read_trace_headers(facts, headers)
                client = scope.get("client")
                key = authenticate_headers(config, headers, client[0] if client else None, state.clock(), state.auth_throttle)
                request = await self.read_request(receive, headers, config)
                forwarded = forwarded_headers(scope["headers"])
                if forwarded is not None:  # a coding agent's betas and flags, for vendors that read them
                    request = dataclasses.replace(request, forwarded=forwarded)
                result = await state.gateway.handle(config, key, request, facts, receive)
            except GatewayError as exc:
                facts.failed(exc)
                await self.send_error(exc, scope, receive, send)
                return
            except (ClientDisconnect, ClientLeft):
                facts.status = CLIENT_CLOSED
                return  # gone before its request had arrived, or while it waited for a provider: nothing to answer, nothing charged
            except Exception as exc:  # a bug: answered with a logged 500, not a dropped connection
                error = internal_error(Request(scope), exc)
                facts.failed(error)
                await self.send_error(error, scope, receive, send)
                return
            await send_answer(request.request_id, result, scope, receive, send, facts)
        finally:
            if request is not None:
                self.done(request)
            telemetry.finish(facts)

    async def read_request(self, receive: Receive, headers: dict[str, str], config: Config) -> ProxyRequest:
        raise NotImplementedError

    async def send_error(self, error: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    def done(self, request: ProxyRequest) -> None:
        """Free what the request held once it has been answered (an upload's spooled files)."""
