"""/v1 endpoints that take a file upload (multipart/form-data): audio transcriptions and
translations, image edits. Plain ASGI apps, like the other proxy endpoints (routes/proxy.py).

The body is parsed as it arrives and counted against `max_request_body_bytes`: a 413 as soon
as it passes the limit, with or without a Content-Length. The whole form has arrived before
admission (the audio's duration is measured from it), then the gateway runs it as any other
request; the spooled files are freed once the answer is sent, however the request ended.
"""

from __future__ import annotations

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from core.config import Config
from core.errors import GatewayError
from core.proxy import ProxyRequest
from core.telemetry import TRACE_HEADERS, Telemetry
from core.telemetry.facts import CLIENT_CLOSED, RequestFacts
from core.uploads import UPLOAD_ENDPOINTS, Upload
from core.uploads.form import FormReader
from core.uploads.request import upload_request
from routes._http import authenticate_headers, internal_error, receive_body, request_headers
from routes._stream import send_answer

# The request headers these endpoints read: the proxy's, and the form's boundary.
_READ_HEADERS = frozenset({b"authorization", b"x-api-key", b"content-length", b"content-type", b"user-agent", b"x-forwarded-for", *TRACE_HEADERS})


class UploadEndpoint:
    """One multipart endpoint: authenticate, read the form, run the gateway, answer."""

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
                headers = request_headers(scope, _READ_HEADERS)
                telemetry.read_trace_headers(facts, headers)
                client = scope.get("client")
                key = authenticate_headers(config, headers, client[0] if client else None, state.clock(), state.auth_throttle)
                request = await self._read_request(receive, headers, config.preferences.max_request_body_bytes)
                result = await state.gateway.handle(config, key, request, facts)
            except GatewayError as exc:
                facts.failed(exc)
                await _send_error(exc, send)
                return
            except ClientDisconnect:
                facts.status = CLIENT_CLOSED
                return  # gone before its form had arrived: nothing to answer, nothing charged
            except Exception as exc:  # a bug: answered with a logged 500, not a dropped connection
                error = internal_error(Request(scope), exc)
                facts.failed(error)
                await _send_error(error, send)
                return
            await send_answer(request.request_id, result, scope, receive, send, facts)
        finally:
            if request is not None and request.upload is not None:
                request.upload.close()
            telemetry.finish(facts)

    async def _read_request(self, receive: Receive, headers: dict[str, str], limit: int) -> ProxyRequest:
        upload = await receive_form(receive, headers, limit)
        try:
            return await upload_request(self.endpoint, upload)
        except BaseException:
            upload.close()
            raise


async def receive_form(receive: Receive, headers: dict[str, str], limit: int) -> Upload:
    """The form, parsed as its chunks arrive; 413 as soon as it is known to pass `limit`
    bytes (a Content-Length over it is refused before reading). On any failure every file
    spooled so far is freed."""
    reader = FormReader(headers.get("content-type"))
    try:
        await receive_body(receive, headers.get("content-length"), limit, reader.feed)
        return reader.finish()
    except BaseException:
        reader.close()
        raise


async def _send_error(error: GatewayError, send: Send) -> None:
    """OpenAI's error shape."""
    body = orjson.dumps(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


UPLOAD_ENDPOINTS_BY_NAME = {name: UploadEndpoint(name) for name in UPLOAD_ENDPOINTS}
