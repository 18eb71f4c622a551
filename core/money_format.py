"""Money and counts as people and JSON clients read them: one format, everywhere.

For people (pages, alerts, the audit log), from the exact nano-dollar amount:

- thousands separators and a leading `$`: `$1,234.50`, `-$2.00`;
- at least 2 decimals, and no trailing zeros beyond them: `$5.00`, `$0.002`;
- a cent or more: rounded half up to 4 decimals, a hundredth of a cent (`$14.9999`);
- under a cent (per-request and per-token costs): up to 7 decimals (`$0.0000365`),
  and `<$0.0000001` for a non-zero amount smaller than that.

For JSON APIs: plain decimal numbers from the exact value (`0.0000555`, `15.0`), never
exponent notation such as `5.55e-05`, written as orjson fragments so they stay numbers.
"""

from __future__ import annotations

import orjson

from core.pricing import NANO_DIGITS, NANOS_PER_USD, plain_decimal

MIN_PLACES = 2
PLACES = 4  # amounts of a cent or more
SMALL_PLACES = 7  # amounts under a cent
CENT_NANOS = NANOS_PER_USD // 100


def usd_text(nanos: int | None) -> str:
    """`$1,234.5678` for a page; None (no limit) reads `unlimited`."""
    if nanos is None:
        return "unlimited"
    sign, size = ("-" if nanos < 0 else ""), abs(nanos)
    places = PLACES if size >= CENT_NANOS else SMALL_PLACES
    unit = 10 ** (NANO_DIGITS - places)
    rounded = (size + unit // 2) // unit
    if size and not rounded:
        return f"{'>-' if sign else '<'}$0.{'0' * (places - 1)}1"
    whole, fraction = divmod(rounded, 10**places)
    decimals = f"{fraction:0{places}d}".rstrip("0").ljust(MIN_PLACES, "0")
    return f"{sign}${whole:,}.{decimals}"


def count_text(value: int) -> str:
    """`1,234,567`: requests, tokens, count credits."""
    return f"{value:,}"


def usd_json(nanos: int) -> orjson.Fragment:
    """A JSON number of USD, exact to the nano-dollar (orjson writes the fragment verbatim)."""
    return orjson.Fragment(plain_decimal(nanos, NANO_DIGITS, point=True).encode())


def cents_json(nanos: int) -> orjson.Fragment:
    """A JSON number of US cents (OpenAI's legacy usage API counts in cents)."""
    return orjson.Fragment(plain_decimal(nanos, NANO_DIGITS - 2, point=True).encode())
