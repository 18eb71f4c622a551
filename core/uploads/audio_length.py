"""How long an uploaded audio file plays: measured from its headers, else bounded by its size.

Measured with mutagen (MP3, M4A/MP4, Ogg Vorbis/Opus, FLAC, WAV, AIFF ...), which reads
the stream headers, never the whole file. WebM and files it cannot read fall back to an
upper bound from the size at ESTIMATE_BITS_PER_SECOND: a low bitrate, so the bound is long
and a reservation made on it covers the real duration of any common encoding.
"""

from __future__ import annotations

import logging

import mutagen

from core.uploads import UploadedFile

log = logging.getLogger("tollgate.uploads")

# 16 kbit/s: below speech-quality MP3/AAC (32-64 kbit/s) and at the low end of Opus voice.
ESTIMATE_BITS_PER_SECOND = 16_000
_MS_PER_SECOND = 1000


def measure_audio_ms(file: UploadedFile) -> int | None:
    """The file's duration in milliseconds, or None when its format cannot be read."""
    file.spool.seek(0)
    try:
        audio = mutagen.File(file.spool)
    except Exception:  # mutagen raises its own errors and, on truncated files, plain ones
        log.debug("could not read the audio of %r", file.filename, exc_info=True)
        return None
    length = getattr(getattr(audio, "info", None), "length", None)
    if audio is None or not isinstance(length, int | float) or length <= 0:
        return None
    return round(length * _MS_PER_SECOND)


def estimate_audio_ms(size: int) -> int:
    """The longest a file of `size` bytes plausibly plays, at ESTIMATE_BITS_PER_SECOND."""
    return -(-size * 8 * _MS_PER_SECOND // ESTIMATE_BITS_PER_SECOND)
