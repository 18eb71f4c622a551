"""Uploaded forms: what a multipart endpoint (transcriptions, translations, image edits)
received, held so that it can be sent upstream again on failover.

Text fields are kept in memory (small); each file is spooled (memory up to
SPOOL_MEMORY_BYTES, then an unnamed temporary file), so no upload is ever held whole in
memory. `Upload.close()` frees every spool: the endpoint calls it once the answer is sent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

AUDIO_ENDPOINTS = ("audio/transcriptions", "audio/translations")
UPLOAD_ENDPOINTS = (*AUDIO_ENDPOINTS, "images/edits")  # the endpoints that take multipart/form-data
SPOOL_MEMORY_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024


def new_spool() -> IO[bytes]:
    """A spool for one file part: in memory while small, an unnamed temporary file past that
    (on Linux never visible in the directory, and gone with its last descriptor)."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, mode="w+b")


@dataclass(slots=True, eq=False)
class UploadedFile:
    """One file part as it arrived: its field name, the client's filename and content type."""

    field: str
    filename: str
    content_type: str
    spool: IO[bytes]
    size: int = 0

    def chunks(self, size: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The file from its first byte, each time (failover sends it again). Every read seeks
        to its own offset first, so two readers of one file never disturb each other."""
        offset = 0
        while offset < self.size:
            self.spool.seek(offset)
            chunk = self.spool.read(min(size, self.size - offset))
            if not chunk:
                return
            offset += len(chunk)
            yield chunk


@dataclass(slots=True, eq=False)
class Upload:
    """A multipart form: its parts in the order sent (a text field's value is a str), and the
    duration measured from its audio file, if it has one that could be measured."""

    parts: list[tuple[str, str | UploadedFile]] = field(default_factory=list)
    audio_ms: int | None = None

    @property
    def files(self) -> list[UploadedFile]:
        return [value for _, value in self.parts if isinstance(value, UploadedFile)]

    def fields(self) -> dict[str, str | list[str]]:
        """The text fields by name; a name sent more than once (`timestamp_granularities[]`)
        maps to the list of its values."""
        found: dict[str, str | list[str]] = {}
        for name, value in self.parts:
            if isinstance(value, UploadedFile):
                continue
            if name not in found:
                found[name] = value
            else:
                previous = found[name]
                found[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        return found

    def file(self, *names: str) -> UploadedFile | None:
        """The first file sent under any of `names`."""
        return next((file for file in self.files if file.field in names), None)

    def close(self) -> None:
        """Free every spool (a file spilled to disk is deleted); safe to call twice."""
        for file in self.files:
            file.spool.close()
