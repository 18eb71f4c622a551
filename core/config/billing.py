"""The billing parts of api.yaml: `model_price`, `count_billing` and each key's terms."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.config.reader import Section, to_decimal
from core.lookup import PrefixTable
from core.pricing import COUNT, FREE, TOKEN, ModelPrice, TokenPrice, to_nanos
from core.pricing.book import PriceBook, build_price_book
from core.pricing.catalog import CatalogError, PriceCatalog, builtin_catalog, load_catalog
from core.pricing.vendor import ALERT, BUDGET_ACTIONS, VendorTerms
from core.timeutil import to_unix

BILLING_MODES = (TOKEN, COUNT, "hybrid")
UNLIMITED = -1  # credits: -1 in api.yaml, and in the JSON the admin API answers
DEFAULT_RESERVE_COMPLETION_TOKENS = 1024
# The most output tokens admission reserves for, whatever limit a request sets: Claude Code asks
# for 64,000 on every call, which reserved in full refuses a small balance that could pay for the
# answer. 0: no cap (the full limit is reserved, so a balance never goes below zero by output).
DEFAULT_MAX_RESERVE_COMPLETION_TOKENS = 8192
COUNT_BILLING_KEYS = ("enabled", "default_count_price", "model_count_prices")
UNIT_PRICE_KEYS = ("image_price", "audio_minute_price", "character_price")  # the media endpoints' units
MODEL_PRICE_KEYS = ("token_price", "count_price", "cache_read_price", "cache_write_price", "reasoning_price", *UNIT_PRICE_KEYS)


@dataclass(frozen=True, slots=True)
class KeyBilling:
    """A key's billing terms from the config; the ledger adds grants and charges."""

    mode: str = TOKEN
    credits_nanos: int | None = None  # None: unlimited USD
    count_credits: int = 0
    created_at: float = 0.0  # the billing window starts here (unix seconds)
    owner: str | None = None  # an account's ledger id: the key draws on that account's balance
    price_multiplier: Decimal = Decimal(1)  # the key's (or its account's) markup over the price

    @property
    def unlimited_credits(self) -> bool:
        return self.credits_nanos is None


BUILTIN, NO_CATALOG = "builtin", "none"  # preferences.price_catalog, besides a file's path


def read_price_book(prefs: Section) -> PriceBook:
    prices = prefs.section("model_price")
    model_prices = {str(name): _read_model_price(prices, name) for name in prices.node}
    billing = prefs.section("count_billing")
    billing.reject_unknown(COUNT_BILLING_KEYS)
    table = billing.section("model_count_prices")
    count_prices = {str(name): table.number(name) for name in table.node}
    return build_price_book(
        model_prices,
        count_prices,
        billing.number("default_count_price", 0),
        billing.boolean("enabled", True),
        _read_catalog(prefs),
        read_multiplier(prefs),
    )


def read_reserve_cap(prefs: Section, default: int) -> int:
    """`max_reserve_completion_tokens`: the key's own (or the global) cap on the output tokens
    admission reserves for; 0 is no cap. Null, as every setting here, is the same as unset."""
    return prefs.integer("max_reserve_completion_tokens", default, minimum=0)


def read_vendor_terms(prefs: Section) -> VendorTerms:
    """A provider's vendor side: `cost_price` (model_price's shapes), `cost_multiplier`,
    `monthly_budget` (USD at vendor cost) and `budget_action`."""
    prices = prefs.section("cost_price")
    cost_prices = {str(name): _read_model_price(prices, name) for name in prices.node}
    budget = prefs.number("monthly_budget", minimum=0, allow_equal=False) if prefs.has("monthly_budget") else None
    action = prefs.choice("budget_action", BUDGET_ACTIONS, ALERT)
    if action != ALERT and budget is None:
        raise prefs.error("budget_action", f"{prefs.where('budget_action')} needs a monthly_budget to act on")
    return VendorTerms(
        PrefixTable(cost_prices),
        prefs.number("cost_multiplier", 1, minimum=0),
        None if budget is None else to_nanos(budget),
        action,
    )


def read_multiplier(prefs: Section) -> Decimal:
    """`price_multiplier`: what a reseller bills over the price (catalog price x 1.2)."""
    return prefs.number("price_multiplier", 1, minimum=0, allow_equal=False)


def _read_catalog(prefs: Section) -> PriceCatalog | None:
    """`price_catalog`: the built-in catalog (default), none, or an operator's JSON file (a
    relative path is read from api.yaml's directory), loaded with the config."""
    choice = prefs.string("price_catalog", BUILTIN)
    if choice == NO_CATALOG:
        return None
    try:
        if choice == BUILTIN:
            return builtin_catalog()
        path = Path(choice)
        return load_catalog(path if path.is_absolute() else Path(prefs.file).parent / path)
    except CatalogError as exc:
        raise prefs.error("price_catalog", f"{prefs.where('price_catalog')}: {exc}") from None


def _read_model_price(prices: Section, name: Any) -> ModelPrice:
    value = prices.node[name]
    if value is None:
        raise prices.error(name, f"{prices.where(str(name))} has no price (inside {{...}} write token prices in quotes, like {{default: '1,2'}})")
    if isinstance(value, dict):
        entry = prices.section(name)
        entry.reject_unknown(MODEL_PRICE_KEYS)
        token = _token_price(entry, "token_price") if entry.has("token_price") else None
        if token is not None:
            extra = {name: entry.number(f"{name}_price") for name in ("cache_read", "cache_write", "reasoning") if entry.has(f"{name}_price")}
            token = TokenPrice(token.input, token.output, **extra)
        count = entry.number("count_price") if entry.has("count_price") else None
        units = {key.removesuffix("_price"): entry.number(key) for key in UNIT_PRICE_KEYS if entry.has(key)}
        if token is None and count is None and not units:
            raise prices.error(name, f"{prices.where(str(name))} needs a price: token_price, count_price, image_price, audio_minute_price or character_price")
        return ModelPrice(token, count, **units)
    if isinstance(value, str) and "," in value:
        return ModelPrice(token=_token_price(prices, name))
    count = to_decimal(value, prices, name)
    # `x: 0` marks a model free (tokens too); a count price otherwise leaves tokens to the catalog or default.
    return ModelPrice(token=FREE, count=count) if count == 0 else ModelPrice(count=count)


def _token_price(section: Section, key: Any) -> TokenPrice:
    text = str(section.node[key])
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise section.error(key, f"{section.where(str(key))} must be 'input,output' USD per 1M tokens, got '{text}'")
    return TokenPrice(to_decimal(parts[0], section, key), to_decimal(parts[1], section, key))


def read_key_billing(prefs: Section) -> KeyBilling:
    credits = prefs.number("credits", UNLIMITED, minimum=None)
    if credits < 0 and credits != UNLIMITED:
        raise prefs.error("credits", f"{prefs.where('credits')} must be >= 0, or -1 for unlimited; got {credits}")
    return KeyBilling(
        mode=prefs.choice("billing_mode", BILLING_MODES, TOKEN),
        credits_nanos=None if credits == UNLIMITED else to_nanos(credits),
        count_credits=prefs.integer("count_credits", 0),
        created_at=_read_timestamp(prefs, "created_at"),
        price_multiplier=read_multiplier(prefs),
    )


def _read_timestamp(section: Section, key: str) -> float:
    value = section.raw(key)
    if value is None:
        return 0.0
    try:
        return to_unix(value)
    except ValueError:
        raise section.error(key, f"{section.where(key)} must be a timestamp like 2024-01-01T00:00:00+08:00, got '{value}'") from None
