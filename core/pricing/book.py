"""The price book: every price a config sets, resolved once per load for the request path.

Per request, pricing is a dict lookup: the route's price (core.pricing.resolution resolved
it at load) and integer arithmetic on its rates (core.pricing.TokenPrice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from core.lookup import DEFAULT, PrefixTable
from core.pricing import (
    COUNT,
    FREE,
    MODERATIONS,
    TOKEN,
    UNIT_OF_ENDPOINT,
    ModelPrice,
    TokenPrice,
    count_price_json,
    to_nanos,
    unit_price_json,
    unit_quantity,
)
from core.pricing.resolution import PriceOrigin, Resolved, resolve, scaled, scaled_token
from core.pricing.vendor import NO_TERMS, UNKNOWN, VendorPrice, VendorTerms, resolve_vendor_price, vendor_prices
from core.usage import Usage

if TYPE_CHECKING:
    from core.pricing.catalog import PriceCatalog


@dataclass(frozen=True, slots=True)
class RoutePrice:
    """A model's price as one provider serves it, resolved at load (core.pricing.resolution),
    the global and provider multipliers applied. `price` is the model's own price (None when
    only a name outside the config asks, and nothing prices it); `token` the token price
    charged, the default entry's when its own has none, else free."""

    provider: str
    model: str
    upstream: str
    price: ModelPrice | None
    token: TokenPrice
    origin: PriceOrigin | None
    multiplier: Decimal


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Everything needed to price a model, resolved once per config load.

    Dollar prices are resolved per route (provider, public model) by
    core.pricing.resolution: the `model_price` entry that matches the model best (exact,
    longest prefix), completed from the price catalog, else `default`. So `gpt-4o-mini:
    0.001` (count only) never inherits `gpt-4o`'s token price. Count prices stay by name:
    the model's own entry, `count_billing.model_count_prices`, `default_count_price`.
    """

    model_prices: PrefixTable[ModelPrice]
    billing_count_prices: PrefixTable[Decimal]  # count_billing.model_count_prices
    default_count_price: Decimal
    count_billing_enabled: bool
    catalog: PriceCatalog | None = None
    multiplier: Decimal = Decimal(1)  # preferences.price_multiplier
    by_route: dict[tuple[str, str], RoutePrice] = field(default_factory=dict)  # (provider, public model)
    by_model: dict[str, RoutePrice] = field(default_factory=dict)  # public model: its costliest route, to reserve
    # The vendor side (core.pricing.vendor): each route's vendor price by (provider, upstream
    # model), and each provider's terms and engine, for a model no route serves (a usage report).
    vendor_by_route: dict[tuple[str, str], VendorPrice] = field(default_factory=dict)
    vendor_terms: dict[str, tuple[VendorTerms, str]] = field(default_factory=dict)
    _count_nanos: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _by_name: dict[str, RoutePrice] = field(default_factory=dict, repr=False, compare=False)

    def resolve_route(self, engine: str, upstream: str, public: str) -> Resolved:
        return resolve(self.model_prices, self.catalog, engine, upstream, public)

    def route_price(self, model: str, provider: str | None = None) -> RoutePrice:
        """The model's price on `provider` (its costliest route when None); a name no route
        serves (a usage report's model) is resolved by name alone, and remembered."""
        if provider is not None:
            hit = self.by_route.get((provider, model))
            if hit is not None:
                return hit
        hit = self.by_model.get(model) or self._by_name.get(model)
        if hit is None:
            hit = self.priced_route("", "", model, model, Decimal(1))
            if len(self._by_name) < 65536:
                self._by_name[model] = hit
        return hit

    def priced_route(self, provider: str, engine: str, upstream: str, public: str, provider_multiplier: Decimal) -> RoutePrice:
        """A route's price, resolved and multiplied (global x provider)."""
        resolved = self.resolve_route(engine, upstream, public)
        multiplier = self.multiplier * provider_multiplier
        own = None if resolved.price is None else scaled(resolved.price, multiplier)
        fallback = self.model_prices.default
        token = own.token if own is not None and own.token is not None else None
        if token is None:
            token = scaled_token(fallback.token, multiplier) if fallback is not None and fallback.token is not None else FREE
        return RoutePrice(provider, public, upstream, own, token, resolved.origin, multiplier)

    def vendor_price(self, provider: str, upstream: str) -> VendorPrice:
        """What `provider` charges for `upstream`: resolved at load for every route; a model no
        route serves (a usage report's) is resolved now and remembered; UNKNOWN for a provider
        the config does not have."""
        hit = self.vendor_by_route.get((provider, upstream))
        if hit is None:
            terms, engine = self.vendor_terms.get(provider, (NO_TERMS, ""))
            hit = resolve_vendor_price(terms, self.catalog, engine, upstream, upstream) if provider in self.vendor_terms else UNKNOWN
            if len(self.vendor_by_route) < 65536:
                self.vendor_by_route[(provider, upstream)] = hit
        return hit

    def token_price(self, model: str, provider: str | None = None, multiplier: Decimal = Decimal(1)) -> TokenPrice:
        token = self.route_price(model, provider).token
        return token if multiplier == 1 else scaled_token(token, multiplier)

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

    def charge_nanos(self, model: str, endpoint: str, usage: Usage, provider: str | None = None, multiplier: Decimal = Decimal(1)) -> tuple[int, str]:
        """What a request of a PRICED_BY_UNIT endpoint costs a key billed in dollars, and the
        unit prices used (recorded with the charge); `multiplier` is the key's.

        Moderations cost the model's count price (0 if it names none: a default count price
        is for count billing). The media endpoints bill by tokens when the vendor reported
        token usage and the model's own price has a token price (gpt-image-1,
        gpt-4o-transcribe); else by their unit (images, minutes of audio, 1M characters)
        when it prices that unit; else by tokens, as any other request."""
        if endpoint == MODERATIONS:
            price = self.explicit_count_price(model)
            return to_nanos(price), count_price_json(price)
        unit = UNIT_OF_ENDPOINT[endpoint]
        route = self.route_price(model, provider)
        own = route.price
        reported_tokens = not usage.estimated and usage.total_tokens > 0
        if own is not None and not (reported_tokens and own.token is not None):
            unit_price = own.unit_price(unit)
            if unit_price is not None:
                unit_price *= multiplier
                return to_nanos(unit_quantity(unit, usage) * unit_price), unit_price_json(unit, unit_price)
        token_price = self.token_price(model, provider, multiplier)
        return token_price.cost_nanos(usage), token_price.unit_prices()

    def estimate_charge_nanos(
        self, model: str, endpoint: str, units: Usage, prompt_tokens: int, completion_tokens: int, multiplier: Decimal = Decimal(1)
    ) -> int:
        """What to reserve for a request of a PRICED_BY_UNIT endpoint: its units at the unit
        price when the model has one (`units` is what the request asks for: `n` images, the
        input's characters, the upload's longest likely duration), else its token estimate."""
        if endpoint == MODERATIONS:
            return to_nanos(self.explicit_count_price(model))
        own = self.route_price(model).price
        price = own.unit_price(UNIT_OF_ENDPOINT[endpoint]) if own is not None else None
        if price is not None:
            return to_nanos(unit_quantity(UNIT_OF_ENDPOINT[endpoint], units) * price * multiplier)
        return self.token_price(model, None, multiplier).estimate_nanos(prompt_tokens, completion_tokens)

    def explicit_count_price(self, model: str) -> Decimal:
        """A count price some entry names for this model (not a default), else 0."""
        own = self._own_count_price(model)
        if own is not None:
            return own
        value, key = self.billing_count_prices.match(model)
        return value if value is not None and key != DEFAULT else Decimal(0)

    def _own_count_price(self, model: str) -> Decimal | None:
        entry, key = self.model_prices.match(model)
        return entry.count if entry is not None and key != DEFAULT else None


def build_price_book(
    model_prices: dict[str, ModelPrice],
    count_prices: dict[str, Decimal],
    default_count_price: Decimal,
    enabled: bool,
    catalog: PriceCatalog | None = None,
    multiplier: Decimal = Decimal(1),
) -> PriceBook:
    return PriceBook(PrefixTable(model_prices), PrefixTable(count_prices), default_count_price, enabled, catalog, multiplier)


def with_routes(book: PriceBook, routes: Iterable[tuple[str, str, str, str, Decimal]]) -> PriceBook:
    """The book with every route's price resolved: (provider, engine, upstream, public,
    provider multiplier) each. A public model served by several providers reserves at its
    costliest route's token price, so failing over never charges past the hold by price."""
    by_route: dict[tuple[str, str], RoutePrice] = {}
    by_model: dict[str, RoutePrice] = {}
    for provider, engine, upstream, public, multiplier in routes:
        priced = book.priced_route(provider, engine, upstream, public, multiplier)
        by_route[(provider, public)] = priced
        held = by_model.get(public)
        if held is None or _reserve_rank(priced) > _reserve_rank(held):
            by_model[public] = priced
    return dataclasses.replace(book, by_route=by_route, by_model=by_model, _count_nanos={}, _by_name={})


def with_vendor_prices(book: PriceBook, providers: dict[str, tuple[VendorTerms, str]], routes: list[tuple[str, str, str, str]]) -> PriceBook:
    """The book with every route's vendor price resolved: `providers` maps each provider to its
    terms and engine, `routes` are (provider, engine, upstream, public)."""
    terms = {name: provider_terms for name, (provider_terms, _) in providers.items()}
    return dataclasses.replace(book, vendor_by_route=vendor_prices(terms, book.catalog, routes), vendor_terms=dict(providers))


def _reserve_rank(route: RoutePrice) -> tuple[Decimal, Decimal]:
    units = route.price
    unit_sum = sum((getattr(units, name) or Decimal(0) for name in ("image", "audio_minute", "character")), Decimal(0)) if units else Decimal(0)
    return route.token.input + route.token.output, unit_sum
