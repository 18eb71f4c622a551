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

from core.lookup import DEFAULT, PrefixTable
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


def _token_prices_json(price: TokenPrice) -> str:
    prices = {"input": str(price.input), "output": str(price.output)}
    for name in ("cache_read", "cache_write", "reasoning"):
        value = getattr(price, name)
        if value is not None:
            prices[name] = str(value)
    return json.dumps(prices, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def count_price_json(price: Decimal) -> str:
    return json.dumps({"count": str(price)}, separators=(",", ":"))


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
# Endpoints priced by core.pricing.PriceBook.charge_nanos rather than by tokens alone.
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


def _unit_price_json(unit: str, price: Decimal) -> str:
    return json.dumps({unit: str(price)}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Everything needed to price a model, resolved once per config load.

    A model takes the `model_price` entry that matches it best (exact, longest prefix,
    `default`); that entry's token price, or the default entry's when it has none. So
    `gpt-4o-mini: 0.001` (count only) never inherits `gpt-4o`'s token price.
    """

    model_prices: PrefixTable[ModelPrice]
    billing_count_prices: PrefixTable[Decimal]  # count_billing.model_count_prices
    default_count_price: Decimal
    count_billing_enabled: bool
    _count_nanos: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def token_price(self, model: str) -> TokenPrice:
        entry = self.model_prices.get(model)
        if entry is not None and entry.token is not None:
            return entry.token
        fallback = self.model_prices.default
        return fallback.token if fallback is not None and fallback.token is not None else FREE

    def count_price_nanos(self, model: str) -> int:
        """The count price in nano-dollars, remembered per model for this config."""
        nanos = self._count_nanos.get(model)
        if nanos is None:
            nanos = to_nanos(self.count_price(model))
            if len(self._count_nanos) < 65536:
                self._count_nanos[model] = nanos
        return nanos

    def count_price(self, model: str) -> Decimal:
        """Its own model_price count price, else count_billing.model_count_prices, else the default."""
        own = self._own_count_price(model)
        if own is not None:
            return own
        configured = self.billing_count_prices.get(model)
        return self.default_count_price if configured is None else configured

    def has_explicit_count_price(self, model: str) -> bool:
        """A named entry (not a default) gives this model a count price: hybrid keys bill it by count."""
        if self._own_count_price(model) is not None:
            return True
        value, key = self.billing_count_prices.match(model)
        return value is not None and key != DEFAULT

    def cost_type(self, billing_mode: str, model: str) -> str:
        if not self.count_billing_enabled or billing_mode == TOKEN:
            return TOKEN
        if billing_mode == COUNT:
            return COUNT
        return COUNT if self.has_explicit_count_price(model) else TOKEN

    def charge_nanos(self, model: str, endpoint: str, usage: Usage) -> tuple[int, str]:
        """What a request of a PRICED_BY_UNIT endpoint costs a key billed in dollars, and the
        unit prices used (recorded with the charge).

        Moderations cost the model's count price (0 if it names none: a default count price
        is for count billing). The media endpoints bill by tokens when the vendor reported
        token usage and the model's entry has a token price (gpt-image-1, gpt-4o-transcribe);
        else by their unit (images, minutes of audio, 1M characters) when the entry prices it;
        else by tokens, as any other request."""
        if endpoint == MODERATIONS:
            price = self.explicit_count_price(model)
            return to_nanos(price), count_price_json(price)
        unit = UNIT_OF_ENDPOINT[endpoint]
        entry = self._entry(model)
        reported_tokens = not usage.estimated and usage.total_tokens > 0
        if entry is not None and not (reported_tokens and entry.token is not None):
            unit_price = entry.unit_price(unit)
            if unit_price is not None:
                return to_nanos(unit_quantity(unit, usage) * unit_price), _unit_price_json(unit, unit_price)
        token_price = self.token_price(model)
        return token_price.cost_nanos(usage), token_price.unit_prices()

    def estimate_charge_nanos(self, model: str, endpoint: str, units: Usage, prompt_tokens: int, completion_tokens: int) -> int:
        """What to reserve for a request of a PRICED_BY_UNIT endpoint: its units at the unit
        price when the model has one (`units` is what the request asks for: `n` images, the
        input's characters, the upload's longest likely duration), else its token estimate."""
        if endpoint == MODERATIONS:
            return to_nanos(self.explicit_count_price(model))
        entry = self._entry(model)
        price = entry.unit_price(UNIT_OF_ENDPOINT[endpoint]) if entry is not None else None
        if price is not None:
            return to_nanos(unit_quantity(UNIT_OF_ENDPOINT[endpoint], units) * price)
        return self.token_price(model).estimate_nanos(prompt_tokens, completion_tokens)

    def explicit_count_price(self, model: str) -> Decimal:
        """A count price some entry names for this model (not a default), else 0."""
        own = self._own_count_price(model)
        if own is not None:
            return own
        value, key = self.billing_count_prices.match(model)
        return value if value is not None and key != DEFAULT else Decimal(0)

    def _entry(self, model: str) -> ModelPrice | None:
        """The model's best `model_price` entry, the default one included."""
        return self.model_prices.get(model)

    def _own_count_price(self, model: str) -> Decimal | None:
        entry, key = self.model_prices.match(model)
        return entry.count if entry is not None and key != DEFAULT else None


def build_price_book(model_prices: dict[str, ModelPrice], count_prices: dict[str, Decimal], default_count_price: Decimal, enabled: bool) -> PriceBook:
    return PriceBook(PrefixTable(model_prices), PrefixTable(count_prices), default_count_price, enabled)
