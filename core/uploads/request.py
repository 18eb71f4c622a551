"""An uploaded form as a ProxyRequest: the fields the gateway relies on checked, and the
units admission reserves for (`n` images, the audio's duration)."""

from __future__ import annotations

import asyncio

from core.errors import bad_request
from core.proxy import ProxyRequest, new_request_id
from core.request_checks import MAX_IMAGES
from core.uploads import AUDIO_ENDPOINTS, Upload
from core.uploads.audio_length import estimate_audio_ms, measure_audio_ms
from core.usage import Usage

# The file fields each endpoint requires (the first name is the documented one).
_FILE_FIELDS = {"audio/transcriptions": ("file",), "audio/translations": ("file",), "images/edits": ("image", "image[]")}
STREAMED_ENDPOINT = "audio/transcriptions"  # `stream: true` (gpt-4o-transcribe's SSE events)


async def upload_request(endpoint: str, upload: Upload) -> ProxyRequest:
    """Check the model, the file and `n`; measure the audio (in a thread: a spooled file is
    read from disk, and the event loop serves every other request meanwhile). The upstream
    validates the rest."""
    body = upload.fields()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field is required.", "missing_model", "model")
    names = _FILE_FIELDS[endpoint]
    file = upload.file(*names)
    if file is None:
        raise bad_request(f"The '{names[0]}' file is required.", "missing_file", names[0])
    stream = body.get("stream") == "true"
    if stream and endpoint != STREAMED_ENDPOINT:
        raise bad_request(f"Only transcriptions can be streamed, not /v1/{endpoint}.", "invalid_stream", "stream")
    if endpoint in AUDIO_ENDPOINTS:
        upload.audio_ms = await asyncio.to_thread(measure_audio_ms, file)
        units = Usage(audio_ms=upload.audio_ms if upload.audio_ms is not None else estimate_audio_ms(file.size))
    else:
        units = Usage(images=_image_count(body.get("n")))
    return ProxyRequest(endpoint, dict(body), model, stream, new_request_id(), units, upload)


def _image_count(raw: object) -> int:
    if raw is None:
        return 1
    if isinstance(raw, str) and len(raw) <= 2 and raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_IMAGES:
        return int(raw)
    raise bad_request(f"'n' must be a whole number from 1 to {MAX_IMAGES}.", "invalid_n", "n")
