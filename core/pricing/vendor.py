"""What a vendor charges the operator for a request: the other side of the money.

A provider's vendor price for a model is resolved once per config load, route by route: the
provider's `cost_price` entry naming the upstream model (or the public one; exact, then
longest prefix), completed from the price catalog's list price for the upstream model, else
the catalog's list price alone, else `cost_price.default`; then x `cost_multiplier` (a
negotiated discount). When nothing prices it the cost is *unknown* (None), never $0: a
margin computed against a made-up zero is worse than no margin.

The cost of each request is computed when it settles, from the usage it was charged for,
and stored with its unit prices next to the billed cost, so history never changes when
prices do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING

from core.lookup import DEFAULT, PrefixTable
from core.pricing import MODERATIONS, UNIT_OF_ENDPOINT, ModelPrice, count_price_json, to_nanos, unit_price_json, unit_quantity
from core.pricing.resolution import CATALOG, CONFIG, DEFAULT_PRICE, PriceOrigin, completed, scaled
from core.usage import Usage

if TYPE_CHECKING:
    from core.pricing.catalog import PriceCatalog

ALERT, STOP = "alert", "stop"  # budget_action
BUDGET_ACTIONS = (ALERT, STOP)


@dataclass(frozen=True, slots=True)
class VendorTerms:
    """A provider's vendor side, as `providers[].preferences` sets it."""

    cost_prices: PrefixTable[ModelPrice] = field(default_factory=lambda: PrefixTable({}))
    cost_multiplier: Decimal = Decimal(1)
    monthly_budget_nanos: int | None = None  # USD at vendor cost per calendar month (preferences.timezone)
    budget_action: str = ALERT

    @property
    def stops(self) -> bool:
        """Whether reaching the budget takes the provider out of routing."""
        return self.monthly_budget_nanos is not None and self.budget_action == STOP


NO_TERMS = VendorTerms()


@dataclass(frozen=True, slots=True)
class VendorPrice:
    """A model's vendor price on one provider, multiplied; `price` None: unknown cost."""

    price: ModelPrice | None
    origin: PriceOrigin | None

    def cost(self, endpoint: str, usage: Usage) -> tuple[int | None, str]:
        """(nano-dollars, the unit prices used as JSON) of one request; (None, "") when the
        price says nothing about what the request used (a chat model priced per image only)."""
        price = self.price
        if price is None:
            return None, ""
        unit = UNIT_OF_ENDPOINT.get(endpoint)
        if unit is not None:
            unit_price = price.unit_price(unit)
            reported_tokens = not usage.estimated and usage.total_tokens > 0
            if unit_price is not None and not (reported_tokens and price.token is not None):
                return to_nanos(unit_quantity(unit, usage) * unit_price), unit_price_json(unit, unit_price)
        if endpoint == MODERATIONS and price.count is not None:
            return to_nanos(price.count), count_price_json(price.count)
        if price.token is not None:
            return price.token.cost_nanos(usage), price.token.unit_prices()
        if price.count is not None:  # a vendor that sells calls, not tokens
            return to_nanos(price.count), count_price_json(price.count)
        return None, ""


UNKNOWN = VendorPrice(None, None)


def resolve_vendor_price(terms: VendorTerms, catalog: PriceCatalog | None, engine: str, upstream: str, public: str) -> VendorPrice:
    """The vendor price of `upstream` (served as `public`) by an `engine` provider; see the module doc."""
    entry, matched = _named_entry(terms.cost_prices, upstream, public)
    listed = catalog.lookup(engine, upstream) if catalog is not None else None
    if entry is not None and listed is not None:
        merged = completed(entry, listed.price)
        detail = f"cost_price.{matched}" + ("" if merged == entry else f", completed from catalog: {listed.vendor}, prices as of {listed.as_of}")
        found = VendorPrice(merged, PriceOrigin(CONFIG if merged == entry else f"{CONFIG}+{CATALOG}", detail))
    elif entry is not None:
        found = VendorPrice(entry, PriceOrigin(CONFIG, f"cost_price.{matched}"))
    elif listed is not None:
        found = VendorPrice(listed.price, PriceOrigin(CATALOG, f"catalog: {listed.vendor}, prices as of {listed.as_of}"))
    elif terms.cost_prices.default is not None:
        found = VendorPrice(terms.cost_prices.default, PriceOrigin(DEFAULT_PRICE, "cost_price.default"))
    else:
        return UNKNOWN
    assert found.price is not None
    return VendorPrice(scaled_all(found.price, terms.cost_multiplier), found.origin)


def _named_entry(table: PrefixTable[ModelPrice], upstream: str, public: str) -> tuple[ModelPrice | None, str | None]:
    """The entry naming the upstream model, else the public one (never `default`: it comes last)."""
    for name in (upstream, public):
        entry, matched = table.match(name)
        if entry is not None and matched != DEFAULT:
            return entry, matched
    return None, None


def scaled_all(price: ModelPrice, multiplier: Decimal) -> ModelPrice:
    """A vendor price x the multiplier, a per-call (count) price included: a discount is on
    the whole invoice (a key's count prices are the operator's own, so `scaled` leaves them)."""
    if multiplier == 1:
        return price
    price = scaled(price, multiplier)
    if price.count is None:
        return price
    return replace(price, count=price.count * multiplier)


def vendor_prices(
    terms: Mapping[str, VendorTerms], catalog: PriceCatalog | None, routes: list[tuple[str, str, str, str]]
) -> dict[tuple[str, str], VendorPrice]:
    """Every route's vendor price, by (provider, upstream model): (provider, engine, upstream,
    public) each. Two public names of one upstream model share the first one's price."""
    prices: dict[tuple[str, str], VendorPrice] = {}
    for provider, engine, upstream, public in routes:
        if (provider, upstream) not in prices:
            prices[(provider, upstream)] = resolve_vendor_price(terms.get(provider, NO_TERMS), catalog, engine, upstream, public)
    return prices
