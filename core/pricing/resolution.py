"""Which price a model is billed at, and where that price came from.

A model's price is resolved once per config load, route by route: the `model_price` entry
that names it (exact, then longest prefix), field by field completed from the price catalog
(by the upstream model name, then the public one), and only when neither prices it at all,
`model_price.default`. A model nothing prices is refused at load (fail closed): billing it
$0 by accident is the error operators of other gateways find on their invoices.

Multipliers (global x provider at load, x key or account when charging) scale the dollar
prices of tokens and media units; count prices are the operator's own and stay as written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING

from core.lookup import DEFAULT, PrefixTable
from core.pricing import ModelPrice, TokenPrice

if TYPE_CHECKING:
    from core.pricing.catalog import CatalogEntry, PriceCatalog

CONFIG = "config"  # a model_price entry names the model
CATALOG = "catalog"  # the price catalog prices it
DEFAULT_PRICE = "default"  # only model_price.default does
_UNIT_RATES = ("image", "audio_minute", "character")


@dataclass(frozen=True, slots=True)
class PriceOrigin:
    """Where a price came from, for the pages and the admin API: `source` is CONFIG, CATALOG,
    DEFAULT_PRICE or `config+catalog` (an entry completed from the catalog); `detail` names the
    entry or the catalog vendor and the date of its prices."""

    source: str
    detail: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """A model's own price (its entry completed from the catalog, or the default entry when
    neither prices it), or None when nothing does."""

    price: ModelPrice | None
    origin: PriceOrigin | None


UNPRICED = Resolved(None, None)


def is_priced(price: ModelPrice) -> bool:
    """Whether the entry prices anything: tokens, a count, or a media unit."""
    return price.token is not None or price.count is not None or any(getattr(price, name) is not None for name in _UNIT_RATES)


def resolve(entries: PrefixTable[ModelPrice], catalog: PriceCatalog | None, engine: str, upstream: str, public: str) -> Resolved:
    """The price of `public` served as `upstream` by an `engine` provider (see the module doc)."""
    entry, matched = entries.match(public)
    own = entry if entry is not None and matched != DEFAULT else None
    listed = _catalog_entry(catalog, engine, upstream, public)
    if own is not None and listed is not None:
        merged = completed(own, listed.price)
        source = CONFIG if merged == own else f"{CONFIG}+{CATALOG}"
        detail = f"model_price.{matched}" + ("" if merged == own else f", completed from {_catalog_detail(listed)}")
        return Resolved(merged, PriceOrigin(source, detail))
    if own is not None:
        return Resolved(own, PriceOrigin(CONFIG, f"model_price.{matched}"))
    if listed is not None:
        return Resolved(listed.price, PriceOrigin(CATALOG, _catalog_detail(listed)))
    if entries.default is not None:
        return Resolved(entries.default, PriceOrigin(DEFAULT_PRICE, "model_price.default"))
    return UNPRICED


def _catalog_entry(catalog: PriceCatalog | None, engine: str, upstream: str, public: str) -> CatalogEntry | None:
    if catalog is None:
        return None
    return catalog.lookup(engine, upstream) or (catalog.lookup(engine, public) if public != upstream else None)


def _catalog_detail(listed: CatalogEntry) -> str:
    return f"catalog: {listed.vendor}, prices as of {listed.as_of}"


def completed(own: ModelPrice, listed: ModelPrice) -> ModelPrice:
    """The entry, its missing prices taken from the catalog: an entry giving only a count
    price (`gpt-4o: 0.01`) still bills token keys the catalog's token price. An entry's
    token price is taken whole (its cache prices fall back to its own input price)."""
    changes = {name: getattr(listed, name) for name in ("token", *_UNIT_RATES) if getattr(own, name) is None and getattr(listed, name) is not None}
    return replace(own, **changes) if changes else own


def scaled(price: ModelPrice, multiplier: Decimal) -> ModelPrice:
    """The price x multiplier for tokens and media units (count prices unchanged)."""
    if multiplier == 1:
        return price
    changes = {name: getattr(price, name) * multiplier for name in _UNIT_RATES if getattr(price, name) is not None}
    token = scaled_token(price.token, multiplier) if price.token is not None else None
    return replace(price, token=token, **changes)


@functools.lru_cache(maxsize=4096)
def scaled_token(price: TokenPrice, multiplier: Decimal) -> TokenPrice:
    """A token price x multiplier, remembered: a key's multiplier applies at every charge."""
    if multiplier == 1:
        return price

    def times(value: Decimal | None) -> Decimal | None:
        return None if value is None else value * multiplier

    return TokenPrice(price.input * multiplier, price.output * multiplier, times(price.cache_read), times(price.cache_write), times(price.reasoning))
