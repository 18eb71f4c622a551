"""The media endpoints' units (images generated, audio heard, characters read aloud) as
people, CSV files and JSON clients read them: one format, everywhere.

The ledger keeps whole numbers (images, milliseconds of audio, characters); audio is shown
in minutes, the unit its price is quoted in, as an exact plain decimal made with integers
(never a float, never exponent notation). Minutes carry 6 decimals at most: a millionth of
a minute (60 µs) is finer than the millisecond recorded, so the figure reads back to the
exact millisecond. Each unit is shown only when it is not zero.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.pricing import MS_PER_MINUTE, plain_decimal

MINUTE_PLACES = 6
_MICRO = 10**MINUTE_PLACES
CSV_HEADER = ("images", "audio_minutes", "characters")  # appended to the exports' columns


def audio_minutes(audio_ms: int) -> str:
    """`12.5`: minutes of audio as a plain decimal, rounded half up to 6 places."""
    micro_minutes = (audio_ms * _MICRO + MS_PER_MINUTE // 2) // MS_PER_MINUTE
    return plain_decimal(micro_minutes, MINUTE_PLACES)


def units_text(images: int, audio_ms: int, characters: int) -> str:
    """`3 images · 12.5 min audio · 2,000 characters` for a page; "" when there are none."""
    return " · ".join(unit_parts(images, audio_ms, characters))


def unit_parts(images: int, audio_ms: int, characters: int) -> list[str]:
    """`["3 images", "12.5 min audio", "2,000 characters"]`, the non-zero ones (a narrow
    column shows one a line)."""
    parts = []
    if images:
        parts.append(f"{images:,} image{'' if images == 1 else 's'}")
    if audio_ms:
        whole, dot, fraction = audio_minutes(audio_ms).partition(".")
        parts.append(f"{int(whole):,}{dot}{fraction} min audio")
    if characters:
        parts.append(f"{characters:,} character{'' if characters == 1 else 's'}")
    return parts


def units_json(images: int, audio_ms: int, characters: int) -> dict[str, Any]:
    """The non-zero units for a JSON API: `images`, `audio_minutes` (an exact JSON number,
    written verbatim by orjson), `characters`."""
    out: dict[str, Any] = {}
    if images:
        out["images"] = images
    if audio_ms:
        out["audio_minutes"] = orjson.Fragment(audio_minutes(audio_ms).encode())
    if characters:
        out["characters"] = characters
    return out


def units_csv(images: int, audio_ms: int, characters: int) -> tuple[int, str, int]:
    """The CSV_HEADER columns of one row (zeros included: every row has every column)."""
    return images, audio_minutes(audio_ms), characters
