"""/v1 endpoints that take a file upload (multipart/form-data): audio transcriptions and
translations, image edits. Plain ASGI apps, like the other proxy endpoints (routes/_proxied.py).

The body is parsed as it arrives and counted against `max_request_body_bytes`: a 413 as soon
as it passes the limit, with or without a Content-Length. The whole form has arrived before
admission (the audio's duration is measured from it), then the gateway runs it as any other
request; the spooled files are freed once the answer is sent, however the request ended.
"""

from __future__ import annotations

import orjson
from starlette.types import Receive, Scope, Send

from core.config import Config
from core.errors import GatewayError
from core.proxy import ProxyRequest
from core.uploads import UPLOAD_ENDPOINTS, Upload
from core.uploads.form import FormReader
from core.uploads.request import upload_request
from routes._http import receive_body
from routes._proxied import READ_HEADERS, ProxiedEndpoint


class UploadEndpoint(ProxiedEndpoint):
    """One multipart endpoint: the form is parsed as it arrives."""

    read_headers = READ_HEADERS | {b"content-type"}  # and the form's boundary

    async def read_request(self, receive: Receive, headers: dict[str, str], config: Config) -> ProxyRequest:
        upload = await receive_form(receive, headers, config.preferences.max_request_body_bytes)
        try:
            return await upload_request(self.endpoint, upload)
        except BaseException:
            upload.close()
            raise

    async def send_error(self, error: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_error(error, send)

    def done(self, request: ProxyRequest) -> None:
        if request.upload is not None:
            request.upload.close()


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
