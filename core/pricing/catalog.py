"""The price catalog: vendors' published list prices, kept as data in a JSON file.

Prices are facts that change on the vendors' schedule, not ours, so they live in
`catalog.json` (with each vendor's source page and date) rather than in code; an operator
can pin or replace them with a file of their own in the same format. Prices are JSON
strings holding exact decimals: a JSON number would be read as a binary float.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.pricing import ModelPrice, TokenPrice

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).with_name("catalog.json")
MAX_PRICE = Decimal(10**15)  # as for api.yaml's numbers
_PRICE_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}
TOKEN_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")
UNIT_KEYS = ("image", "audio_minute", "character")
MODEL_KEYS = (*TOKEN_KEYS, *UNIT_KEYS, "free", "aliases", "note")
VENDOR_KEYS = ("source", "as_of", "models")
TOP_KEYS = ("about", "vendors")
# Where an engine's own prices are: Azure sells OpenAI's models, at its own prices where they differ.
VENDORS_OF_ENGINE = {"openai": ("openai",), "azure": ("azure", "openai"), "anthropic": ("anthropic",), "gemini": ("gemini",)}
FREE_PRICE = ModelPrice(token=TokenPrice(Decimal(0), Decimal(0)), count=Decimal(0))


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A model's catalog price and where it came from (shown beside the price it bills)."""

    price: ModelPrice
    vendor: str
    source: str
    as_of: str


@dataclass(frozen=True, slots=True)
class PriceCatalog:
    """A loaded catalog, indexed at load: `lookup` runs for every model at config load."""

    name: str  # "builtin" or the file's path
    vendors: dict[str, tuple[str, str]]  # vendor -> (source, as_of), in file order
    _by_vendor: dict[str, dict[str, CatalogEntry]]  # vendor -> model name or alias -> entry
    _anywhere: dict[str, CatalogEntry]  # name -> the first vendor's entry, in file order

    def lookup(self, engine: str, model: str) -> CatalogEntry | None:
        """The price of `model` (exact name or alias) from the engine's own vendors, else from
        any vendor: an OpenAI-compatible aggregator serving claude-3-5-haiku bills Anthropic's price."""
        for vendor in VENDORS_OF_ENGINE.get(engine, ()):
            entry = self._by_vendor.get(vendor, {}).get(model)
            if entry is not None:
                return entry
        return self._anywhere.get(model)


def load_catalog(path: str | Path) -> PriceCatalog:
    """An operator's catalog file, checked whole: any mistake raises CatalogError."""
    return _load(Path(path), str(path))


@functools.cache
def builtin_catalog() -> PriceCatalog:
    """The catalog shipped with Tollgate (core/pricing/catalog.json), read once per process."""
    return _load(BUILTIN_PATH, BUILTIN)


def _load(path: Path, name: str) -> PriceCatalog:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CatalogError(f"price catalog {path}: cannot be read ({error.strerror or error})") from None
    return parse_catalog(text, name, str(path))


def parse_catalog(text: str, name: str, where: str) -> PriceCatalog:
    """A catalog from its JSON text; `where` names the file in error messages."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise CatalogError(f"price catalog {where}: not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except _DuplicateKey as duplicate:
        raise CatalogError(f"price catalog {where}: the key '{duplicate.key}' appears twice in one object (the second would silently win)") from None
    return _Reader(where).catalog(data, name)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key written twice (json keeps the last one without a word)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _Reader:
    """Checks a decoded catalog field by field, naming the first wrong one by its path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, path: str, problem: str) -> CatalogError:
        return CatalogError(f"price catalog {self.where}: {path} {problem}")

    def catalog(self, data: Any, name: str) -> PriceCatalog:
        self.mapping(data, "the top level")
        self.reject_unknown(data, TOP_KEYS, "the top level")
        if "vendors" not in data:
            raise self.error("the top level", "needs 'vendors'")
        vendors = self.mapping(data["vendors"], "vendors")
        by_vendor: dict[str, dict[str, CatalogEntry]] = {}
        anywhere: dict[str, CatalogEntry] = {}
        sources: dict[str, tuple[str, str]] = {}
        for vendor, body in vendors.items():
            source, as_of, index = self.vendor(vendor, body)
            sources[vendor] = (source, as_of)
            by_vendor[vendor] = index
            for model, entry in index.items():
                anywhere.setdefault(model, entry)
        return PriceCatalog(name, sources, by_vendor, anywhere)

    def vendor(self, vendor: str, body: Any) -> tuple[str, str, dict[str, CatalogEntry]]:
        path = f"vendors.{vendor}"
        self.mapping(body, path)
        self.reject_unknown(body, VENDOR_KEYS, path)
        source, as_of = self.source(body, path), self.as_of(body, path)
        if "models" not in body:
            raise self.error(path, "needs 'models'")
        index: dict[str, CatalogEntry] = {}
        owner: dict[str, str] = {}  # name or alias -> the model entry that holds it
        for model, raw in self.mapping(body["models"], f"{path}.models").items():
            entry = CatalogEntry(self.price(raw, f"{path}.models.{model}"), vendor, source, as_of)
            for alias in self.names(model, raw, f"{path}.models.{model}"):
                if alias in owner:
                    raise self.error(f"{path}.models.{model}", f"names '{alias}', which {path}.models.{owner[alias]} already names")
                owner[alias] = model
                index[alias] = entry
        return source, as_of, index

    def price(self, raw: Any, path: str) -> ModelPrice:
        self.mapping(raw, path)
        self.reject_unknown(raw, MODEL_KEYS, path)
        prices = {key: self.decimal(raw[key], f"{path}.{key}") for key in (*TOKEN_KEYS, *UNIT_KEYS) if key in raw}
        free = raw.get("free", False)
        if not isinstance(free, bool):
            raise self.error(f"{path}.free", f"must be true or false, got {json.dumps(free)}")
        if "note" in raw and not isinstance(raw["note"], str):
            raise self.error(f"{path}.note", "must be a string")
        if free:
            if prices:
                raise self.error(path, f"is free and also has prices ({', '.join(prices)}): keep one")
            return FREE_PRICE
        token = self.token_price(prices, path)
        units = {key: prices[key] for key in UNIT_KEYS if key in prices}
        if token is None and not units:
            raise self.error(path, "needs a price: input and output, image, audio_minute, character, or free: true")
        return ModelPrice(token=token, **units)

    def token_price(self, prices: dict[str, Decimal], path: str) -> TokenPrice | None:
        given = [key for key in TOKEN_KEYS if key in prices]
        if not given:
            return None
        missing = [key for key in ("input", "output") if key not in prices]
        if missing:
            raise self.error(path, f"has {', '.join(given)} but no {' or '.join(missing)}: a token price needs both input and output")
        return TokenPrice(**{key: prices[key] for key in given})

    def names(self, model: str, raw: dict[str, Any], path: str) -> Iterator[str]:
        """The model's own name, then its aliases."""
        yield model
        aliases = raw.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(alias, str) and alias for alias in aliases):
            raise self.error(f"{path}.aliases", "must be a list of model names")
        yield from aliases

    def decimal(self, value: Any, path: str) -> Decimal:
        """A price: a string of digits with at most one point (no sign, exponent or `_`)."""
        if not isinstance(value, str):
            raise self.error(path, f'must be a decimal string like "2.50", got {json.dumps(value)}')
        if _PRICE_TEXT.fullmatch(value) is None:
            raise self.error(path, f'must be a decimal string like "2.50" (digits and one point, >= 0), got "{value}"')
        number = Decimal(value)
        if number > MAX_PRICE:
            raise self.error(path, f'must be at most 10^15, got "{value}"')
        return number

    def source(self, body: dict[str, Any], path: str) -> str:
        value = body.get("source")
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, "needs 'source': the page the prices come from")
        return value

    def as_of(self, body: dict[str, Any], path: str) -> str:
        value = body.get("as_of")
        try:
            if not isinstance(value, str) or _DATE_TEXT.fullmatch(value) is None:
                raise ValueError(value)
            date.fromisoformat(value)
        except ValueError:
            raise self.error(path, f"needs 'as_of': the date of the prices, YYYY-MM-DD (got {json.dumps(value)})") from None
        return str(value)

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a JSON object, got {_JSON_KINDS.get(type(value), type(value).__name__)}")
        return value

    def reject_unknown(self, body: dict[str, Any], known: tuple[str, ...], path: str) -> None:
        for key in body:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(known)})"
                raise self.error(path, f"has an unknown key '{key}'{suffix}")
