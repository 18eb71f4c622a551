"""Prices and costs: pure functions over exact Decimals.

Token prices are USD per 1M tokens; count prices are USD per request. A ledger amount is
an integer number of nano-dollars (1e-9 USD): costs are rounded half-up to that quantum
once per request, and every balance is then an exact integer sum of ledger amounts.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from core.usage import Usage

NANOS_PER_USD = 1_000_000_000
NANO_DIGITS = 9
PER_MILLION = Decimal(1_000_000)
TOKEN = "token"
COUNT = "count"


def to_nanos(usd: Decimal) -> int:
    return int((usd * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def from_nanos(nanos: int) -> Decimal:
    return Decimal(nanos) / NANOS_PER_USD


def format_usd(nanos: int) -> str:
    """Nano-dollars as a plain decimal string (`1.5`, `0.000000001`, `2`), without a Decimal."""
    return plain_decimal(nanos, NANO_DIGITS)


def plain_decimal(units: int, places: int, *, point: bool = False) -> str:
    """`units / 10**places` in plain notation, never an exponent, no trailing zeros; `point`
    keeps a decimal point on whole numbers (`15.0`). The one writer of plain decimals; it
    writes the x-tollgate-* money headers of every request, hence the precomputed tables."""
    size = -units if units < 0 else units
    whole, fraction = divmod(size, _SCALES[places])
    decimals = format(fraction, _DIGIT_FORMATS[places]).rstrip("0") if fraction else ""
    if point and not decimals:
        decimals = "0"
    sign = "-" if units < 0 else ""
    return f"{sign}{whole}.{decimals}" if decimals else f"{sign}{whole}"


_SCALES = tuple(10**places for places in range(NANO_DIGITS + 1))
_DIGIT_FORMATS = tuple(f"0{places}d" for places in range(NANO_DIGITS + 1))


def _nanos_per_million(price: Decimal) -> int | None:
    """A per-1M-token price in whole nano-dollars, or None if it has finer digits."""
    scaled = price * NANOS_PER_USD
    return int(scaled) if scaled == scaled.to_integral_value() else None


def _round_per_million(total: int) -> int:
    """nano-dollars x tokens / 1M, rounded half up like to_nanos (totals are never negative)."""
    return (total + 500_000) // 1_000_000


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per 1M tokens. Cache reads bill at `cache_read`, cache writes at `cache_write`
    and reasoning tokens at `reasoning` when set; otherwise at the input (cache) or output
    (reasoning) price."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    # The five rates in nano-dollars per 1M tokens, fallbacks applied, computed once so the
    # request path prices in integers; None when a price has more than nine decimals.
    _rates: tuple[int, int, int, int, int] | None = field(init=False, repr=False, compare=False, default=None)
    _unit_prices: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_unit_prices", _token_prices_json(self))
        rates = [
            _nanos_per_million(price)
            for price in (
                self.input,
                self.output,
                self.input if self.cache_read is None else self.cache_read,
                self.input if self.cache_write is None else self.cache_write,
                self.output if self.reasoning is None else self.reasoning,
            )
        ]
        if None not in rates:
            object.__setattr__(self, "_rates", tuple(rates))

    def cost_nanos(self, usage: Usage) -> int:
        """`to_nanos(self.cost(usage))`, in integer arithmetic when the prices allow it."""
        rates = self._rates
        if rates is None:
            return to_nanos(self.cost(usage))
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        return _round_per_million(
            (usage.prompt_tokens - cached - written) * rates[0]
            + (usage.completion_tokens - reasoning) * rates[1]
            + cached * rates[2]
            + written * rates[3]
            + reasoning * rates[4]
        )

    def estimate_nanos(self, prompt_tokens: int, completion_tokens: int) -> int:
        """`to_nanos(self.estimate(...))`, in integer arithmetic when the prices allow it."""
        rates = self._rates
        if rates is None:
            return to_nanos(self.estimate(prompt_tokens, completion_tokens))
        return _round_per_million(prompt_tokens * rates[0] + completion_tokens * rates[1])

    def cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        return (
            (usage.prompt_tokens - cached - written) * self.input
            + cached * (self.input if self.cache_read is None else self.cache_read)
            + written * (self.input if self.cache_write is None else self.cache_write)
            + (usage.completion_tokens - reasoning) * self.output
            + reasoning * (self.output if self.reasoning is None else self.reasoning)
        ) / PER_MILLION

    def unit_prices(self) -> str:
        """The prices as recorded with each charge (history is never repriced), as JSON."""
        return self._unit_prices

    def estimate(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (prompt_tokens * self.input + completion_tokens * self.output) / PER_MILLION


def price_text(price: Decimal) -> str:
    """A price as recorded with a charge: its digits as written, never an exponent
    (`str(Decimal)` writes `1E-7` for a tiny catalog price times a small multiplier)."""
    return format(price, "f")


def _token_prices_json(price: TokenPrice) -> str:
    prices = {"input": price_text(price.input), "output": price_text(price.output)}
    for name in ("cache_read", "cache_write", "reasoning"):
        value = getattr(price, name)
        if value is not None:
            prices[name] = price_text(value)
    return json.dumps(prices, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def count_price_json(price: Decimal) -> str:
    return json.dumps({"count": price_text(price)}, separators=(",", ":"))


FREE = TokenPrice(Decimal(0), Decimal(0))


# The endpoints that sell something other than tokens, and the unit each is priced by (a
# `model_price` entry's `image_price`, `audio_minute_price`, `character_price`).
IMAGE = "image"
AUDIO_MINUTE = "audio_minute"
CHARACTER = "character"
UNIT_OF_ENDPOINT = {
    "images/generations": IMAGE,
    "images/edits": IMAGE,
    "audio/transcriptions": AUDIO_MINUTE,
    "audio/translations": AUDIO_MINUTE,
    "audio/speech": CHARACTER,
}
MODERATIONS = "moderations"
# Endpoints priced by core.pricing.book.PriceBook.charge_nanos rather than by tokens alone.
PRICED_BY_UNIT = frozenset({*UNIT_OF_ENDPOINT, MODERATIONS})
MS_PER_MINUTE = 60_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One `model_price` entry: a token price, a count price, media unit prices, or several.

    `image` is USD per image generated, `audio_minute` USD per minute of audio heard,
    `character` USD per 1M characters read aloud."""

    token: TokenPrice | None = None
    count: Decimal | None = None
    image: Decimal | None = None
    audio_minute: Decimal | None = None
    character: Decimal | None = None

    def unit_price(self, unit: str) -> Decimal | None:
        return self.image if unit == IMAGE else self.audio_minute if unit == AUDIO_MINUTE else self.character


def unit_quantity(unit: str, usage: Usage) -> Decimal:
    """How many of `unit` the usage holds, in the unit its price is quoted in."""
    if unit == IMAGE:
        return Decimal(usage.images)
    if unit == AUDIO_MINUTE:
        return Decimal(usage.audio_ms) / MS_PER_MINUTE
    return Decimal(usage.characters) / PER_MILLION


def unit_price_json(unit: str, price: Decimal) -> str:
    return json.dumps({unit: price_text(price)}, separators=(",", ":"))
