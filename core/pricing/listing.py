"""Every served model's price as people read it: the admin API's `model_prices` and the
prices page. Prices are plain decimal strings (never exponents, never floats), with where
each came from, so an operator can check what a key will be charged before it is."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from core.pricing.book import PriceBook, RoutePrice

_TOKEN_RATES = ("input", "output", "cache_read", "cache_write", "reasoning")
_UNIT_RATES = ("image", "audio_minute", "character")


def plain(value: Decimal) -> str:
    """A price in plain notation without trailing zeros: `0.18`, `10`, never `1E+1`."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def price_rows(book: PriceBook) -> list[dict[str, Any]]:
    """One row per route (provider, public model), in config order."""
    return [price_row(book, route) for route in book.by_route.values()]


def price_row(book: PriceBook, route: RoutePrice) -> dict[str, Any]:
    own = route.price
    row: dict[str, Any] = {
        "model": route.model,
        "provider": route.provider,
        "upstream_model": route.upstream,
        "source": route.origin.source if route.origin else None,
        "source_detail": route.origin.detail if route.origin else None,
        "multiplier": plain(route.multiplier),
    }
    token = route.token
    for name in _TOKEN_RATES:
        value = getattr(token, name)
        row[name] = None if value is None else plain(value)
    for name in _UNIT_RATES:
        value = getattr(own, name) if own is not None else None
        row[name] = None if value is None else plain(value)
    count = book.explicit_count_price(route.model) if book.has_explicit_count_price(route.model) else None
    row["count"] = None if count is None else plain(count)
    row["vendor_price"] = vendor_price_row(book, route)
    return row


def vendor_price_row(book: PriceBook, route: RoutePrice) -> dict[str, Any] | None:
    """What the provider charges the operator for the route's upstream model (core.pricing.vendor),
    cost_multiplier applied; None when unknown."""
    vendor = book.vendor_price(route.provider, route.upstream)
    price = vendor.price
    if price is None or vendor.origin is None:
        return None
    row: dict[str, Any] = {"source": vendor.origin.source, "source_detail": vendor.origin.detail}
    for name in _TOKEN_RATES:
        value = getattr(price.token, name) if price.token is not None else None
        row[name] = None if value is None else plain(value)
    for name in (*_UNIT_RATES, "count"):
        value = getattr(price, name)
        row[name] = None if value is None else plain(value)
    return row
