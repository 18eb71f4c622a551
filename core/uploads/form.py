"""Reading multipart/form-data as it arrives, with python-multipart's streaming parser.

The reader is fed the body chunk by chunk (the route counts the bytes against the body
limit); text fields are collected, file parts written to spools as their bytes come, so a
large upload never sits whole in memory.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.errors import GatewayError, bad_request
from core.uploads import Upload, UploadedFile, new_spool

MULTIPART = b"multipart/form-data"
MAX_PARTS = 64  # far more than any of these endpoints takes (a few fields, up to 16 images)
MAX_FIELD_BYTES = 1024 * 1024  # a text field (a prompt) is kept in memory: bounded
_OCTET_STREAM = "application/octet-stream"


def not_multipart(content_type: str | None) -> GatewayError:
    sent = f"'{content_type}'" if content_type else "no Content-Type"
    return bad_request(f"This endpoint takes a file upload as multipart/form-data; the request has {sent}.", "invalid_content_type")


def _malformed(detail: str) -> GatewayError:
    return bad_request(f"The multipart/form-data body is malformed: {detail}.", "invalid_multipart")


class FormReader:
    """Feed it the body's chunks, then `finish()` for the Upload. On any error, `close()`
    frees what was spooled so far (`finish` hands that duty to the Upload)."""

    def __init__(self, content_type: str | None):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != MULTIPART or not boundary:
            raise not_multipart(content_type)
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except FormParserError as exc:
            raise _malformed(str(exc)) from None
        self.upload = Upload()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name = ""
        self._text: bytearray | None = None
        self._file: UploadedFile | None = None
        self._ended = False

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise _malformed(str(exc)) from None

    def finish(self) -> Upload:
        if not self._ended:
            raise _malformed("it ends before its closing boundary")
        return self.upload

    def close(self) -> None:
        self.upload.close()
        if self._file is not None:
            self._file.spool.close()

    def _on_part_begin(self) -> None:
        if len(self.upload.parts) >= MAX_PARTS:
            raise bad_request(f"The form has more than {MAX_PARTS} parts.", "too_many_parts")
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise _malformed("a part has no Content-Disposition: form-data name")
        self._name = _text(name)
        if b"filename" in options:
            content_type = _text(self._headers.get(b"content-type", b"")) or _OCTET_STREAM
            self._file = UploadedFile(self._name, _text(options[b"filename"]), content_type, new_spool())
        else:
            self._text = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.spool.write(data[start:end])
            self._file.size += end - start
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise bad_request(f"The form field '{self._name}' is over {MAX_FIELD_BYTES} bytes.", "field_too_large", self._name)

    def _on_part_end(self) -> None:
        if self._file is not None:
            self.upload.parts.append((self._name, self._file))
            self._file = None
        elif self._text is not None:
            try:
                value = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"The form field '{self._name}' is not UTF-8 text.", "invalid_field", self._name) from None
            self.upload.parts.append((self._name, value))
            self._text = None

    def _on_end(self) -> None:
        self._ended = True


def _text(raw: bytes) -> str:
    """A header parameter as text: UTF-8 as browsers and SDKs send it, else Latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
