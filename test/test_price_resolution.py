"""Price resolution with the catalog, fail-closed loading, and multipliers: the real gateway
bills catalog prices exactly, an unpriced model never loads, and every price says where it
came from (config, catalog, default)."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.config import ConfigError, build_config
from core.pricing import MODERATIONS, UNIT_OF_ENDPOINT, to_nanos
from core.usage import Usage
from test.conftest import ADMIN_KEY, USER_KEY, keys_yaml

CATALOG = json.loads((Path(__file__).parent.parent / "core" / "pricing" / "catalog.json").read_text())
ENGINE_OF_VENDOR = {"openai": "openai", "azure": "azure", "anthropic": "anthropic", "gemini": "gemini"}
MESSAGES = [{"role": "user", "content": "hi"}]
ANTHROPIC_MESSAGE = json.loads((Path(__file__).parent / "fixtures" / "anthropic_message.json").read_text())


def listed(vendor: str, model: str) -> dict[str, Any]:
    return CATALOG["vendors"][vendor]["models"][model]


def usage_rows(gateway) -> list[tuple]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # writes what the process queued
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT model, provider, cost_nanos, unit_prices FROM usage ORDER BY id").fetchall()


def openai_usage(prompt: int, cached: int, completion: int) -> Any:
    async def handler(body: dict[str, Any], _request: Request) -> Response:
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
        )

    return handler


# --- the catalog, billed end to end ---------------------------------------------------------


def test_a_model_without_a_model_price_entry_is_billed_the_catalog_price(start_gateway, upstream):
    upstream.script("p1", openai_usage(prompt=1000, cached=400, completion=200))
    gateway = start_gateway("providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o-mini]\n" + keys_yaml(), upstream)
    gateway.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    price = listed("openai", "gpt-4o-mini")
    assert (price["input"], price["output"], price["cache_read"]) == ("0.15", "0.60", "0.075")  # the example
    expected = (600 * Decimal(price["input"]) + 400 * Decimal(price["cache_read"]) + 200 * Decimal(price["output"])) / 1_000_000
    [(model, provider, cost, unit_prices)] = usage_rows(gateway)
    assert (model, provider, cost) == ("gpt-4o-mini", "p1", to_nanos(expected)) and cost == 240_000
    assert json.loads(unit_prices) == {"input": "0.15", "output": "0.60", "cache_read": "0.075"}


def test_an_anthropic_model_is_billed_the_catalog_cache_prices(start_gateway, upstream):
    async def anthropic(body: dict[str, Any], _request: Request) -> Response:
        return JSONResponse({**ANTHROPIC_MESSAGE, "model": body["model"]})

    upstream.script("p1", anthropic)
    config = "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    engine: anthropic\n    model: [claude-3-5-haiku-20241022: haiku]\n"
    gateway = start_gateway(config + keys_yaml(), upstream)
    gateway.client().chat.completions.create(model="haiku", messages=MESSAGES)
    # 25 input, 100 written to the cache, 1000 read from it, 15 output (the fixture's usage)
    price = listed("anthropic", "claude-3-5-haiku")
    assert (price["input"], price["output"], price["cache_write"], price["cache_read"]) == ("0.80", "4.00", "1.00", "0.08")
    [(model, _provider, cost, _unit_prices)] = usage_rows(gateway)
    assert (model, cost) == ("haiku", to_nanos(Decimal("0.000260")))  # 25*0.8 + 100*1 + 1000*0.08 + 15*4 per 1M


def catalog_rows() -> list[tuple[str, str, str]]:
    """(vendor, name, the entry's name) for every model and alias of the data file."""
    rows = []
    for vendor, table in CATALOG["vendors"].items():
        for name, entry in table["models"].items():
            rows += [(vendor, alias, name) for alias in [name, *entry.get("aliases", [])]]
    return rows


@pytest.mark.parametrize(("vendor", "model", "entry_name"), catalog_rows())
def test_every_catalog_price_bills_exactly(vendor, model, entry_name):
    """A table test against the data file: each model (and alias), served by a provider of
    its vendor's engine, costs exactly what the file's prices say, unit by unit."""
    entry = listed(vendor, entry_name)
    engine = ENGINE_OF_VENDOR[vendor]
    config = f"providers:\n  - provider: v\n    engine: {engine}\n    base_url: https://vendor.example/v1\n    api: k\n    model: ['{model}']\n"
    book = build_config(config + "preferences:\n  price_catalog: builtin\n", "api.yaml").preferences.prices

    def rate(name: str, fallback: str | None = None) -> Decimal:
        if entry.get("free"):
            return Decimal(0)
        return Decimal(entry.get(name) or entry.get(fallback or name) or 0)

    if entry.get("free") or "input" in entry:
        usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000, cached_tokens=200_000, cache_write_tokens=100_000, reasoning_tokens=50_000)
        expected = (
            700_000 * rate("input") + 200_000 * rate("cache_read", "input") + 100_000 * rate("cache_write", "input")
            + 450_000 * rate("output") + 50_000 * rate("reasoning", "output")
        ) / 1_000_000  # fmt: skip
        assert book.token_price(model, "v").cost_nanos(usage) == to_nanos(expected)
    media = {
        "image": (Usage(images=3), Decimal(3)),
        "audio_minute": (Usage(audio_ms=90_000), Decimal("1.5")),
        "character": (Usage(characters=2_000_000), Decimal(2)),
    }
    for unit, (used, quantity) in media.items():
        if unit in entry:
            endpoint = next(name for name, sold in UNIT_OF_ENDPOINT.items() if sold == unit)
            assert book.charge_nanos(model, endpoint, used, "v")[0] == to_nanos(quantity * Decimal(entry[unit]))
    assert book.route_price(model, "v").origin.source == "catalog"
    assert book.charge_nanos(model, MODERATIONS, Usage(), "v")[0] == 0


# --- fail closed ----------------------------------------------------------------------------

UNPRICED = "providers:\n  - provider: echo\n    engine: echo\n    model:\n      - echo-1\n      - my-private-model\n"


def test_an_unpriced_model_is_refused_at_load_with_its_name_and_line():
    with pytest.raises(ConfigError) as refused:
        build_config(UNPRICED + "preferences:\n  model_price: {echo-1: '1,2'}\n", "api.yaml")
    assert refused.value.line == 6 and "model 'my-private-model' has no price: add a model_price entry or a default" in str(refused.value)
    assert str(refused.value).startswith("api.yaml:6:")


@pytest.mark.parametrize("prices", ["{default: '1,2'}", "{echo: '1,2', my-: '1,2'}", "{echo-1: 0, my-private-model: '0,0'}"], ids=["default", "prefix", "free"])
def test_a_default_a_prefix_entry_or_an_explicit_zero_prices_it(prices):
    book = build_config(UNPRICED + f"preferences:\n  model_price: {prices}\n", "api.yaml").preferences.prices
    assert book.route_price("my-private-model", "echo").price is not None


def test_an_explicit_zero_is_free_for_token_keys_too():
    book = build_config(UNPRICED + "preferences:\n  model_price: {echo-1: 0, my-private-model: 0, default: '5,5'}\n", "api.yaml").preferences.prices
    assert book.token_price("my-private-model", "echo").cost_nanos(Usage(prompt_tokens=10**6, completion_tokens=10**6)) == 0
    assert book.count_price("my-private-model") == 0


def test_without_the_catalog_a_catalog_model_needs_a_price():
    config = "providers:\n  - provider: echo\n    engine: echo\n    model: [gpt-4o-mini]\n"
    assert build_config(config, "api.yaml").preferences.prices.route_price("gpt-4o-mini").origin.source == "catalog"
    with pytest.raises(ConfigError, match="model 'gpt-4o-mini' has no price"):
        build_config(config + "preferences:\n  price_catalog: none\n", "api.yaml")


def test_an_operators_own_catalog_file_replaces_the_builtin_one(tmp_path):
    own = {
        "about": "ours",
        "vendors": {"openai": {"source": "https://example.com/prices", "as_of": "2026-11-01", "models": {"gpt-4o-mini": {"input": "1", "output": "2"}}}},
    }
    (tmp_path / "prices.json").write_text(json.dumps(own))
    config = "providers:\n  - provider: echo\n    engine: echo\n    model: [gpt-4o-mini]\npreferences:\n  price_catalog: prices.json\n"
    (tmp_path / "api.yaml").write_text(config)
    price = build_config(config, str(tmp_path / "api.yaml")).preferences.prices.token_price("gpt-4o-mini", "echo")
    assert (price.input, price.output) == (Decimal(1), Decimal(2))
    (tmp_path / "prices.json").write_text('{"vendors": {"openai": {"models": {"x": {"input": 1}}}}}')
    with pytest.raises(ConfigError) as broken:
        build_config(config, str(tmp_path / "api.yaml"))
    assert broken.value.line == 6 and "price_catalog" in str(broken.value) and "prices.json" in str(broken.value)


def test_a_reload_that_adds_an_unpriced_model_keeps_the_last_good_config(start_gateway):
    good = "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + keys_yaml() + "preferences:\n  model_price: {echo-1: '1,2'}\n"
    gateway = start_gateway(good)
    gateway.rewrite_config(good.replace("model: [echo-1]", "model: [echo-1, echo-2]"))
    error = gateway.status()["last_error"]
    assert error["line"] == 4 and "model 'echo-2' has no price" in error["reason"]
    assert gateway.client().chat.completions.create(model="echo-1", messages=MESSAGES).choices[0].message.content == "Echo: hi"
    assert gateway.http("POST", "/v1/chat/completions", json={"model": "echo-2", "messages": MESSAGES}).status_code == 404


# --- multipliers and where prices come from ------------------------------------------------

MULTIPLIED = f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    api: k
    model: [gpt-4o, gpt-4o-mini, house-model]
    preferences: {{price_multiplier: 2}}
  - provider: p2
    base_url: {{fake:p2}}
    api: k
    model: [other-model]
accounts:
  - name: acme
    preferences: {{price_multiplier: 1.25}}
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    preferences: {{price_multiplier: 1.1}}
  - api: sk-acme-member-0001
    account: acme
preferences:
  price_multiplier: 1.5
  model_price:
    gpt-4o: '1,2'
    gpt-4o-mini: 0.002
    default: '3,4'
"""


def test_multipliers_multiply_and_the_prices_charged_are_recorded(start_gateway, upstream):
    upstream.script("p1", openai_usage(prompt=1_000_000, cached=0, completion=1_000_000))
    gateway = start_gateway(MULTIPLIED, upstream)
    gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)  # 1,2 x 1.5 x 2 x 1.1 (key)
    gateway.client("sk-acme-member-0001").chat.completions.create(model="gpt-4o", messages=MESSAGES)  # x 1.25 (account)
    rows = usage_rows(gateway)
    assert [row[2] for row in rows] == [to_nanos(Decimal("3.3") * 3), to_nanos(Decimal("3.75") * 3)]
    assert [json.loads(row[3]) for row in rows] == [{"input": "3.30", "output": "6.60"}, {"input": "3.750", "output": "7.500"}]
    assert [Decimal(value) for value in json.loads(rows[0][3]).values()] == [Decimal("3.3"), Decimal("6.6")]


def test_the_admin_api_shows_each_price_and_where_it_came_from(start_gateway, upstream):
    gateway = start_gateway(MULTIPLIED, upstream)
    body = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()
    rows = {(row["provider"], row["model"]): row for row in body["model_prices"]}
    # What the vendor charges the operator: the catalog's list price of the upstream model (the keys' multipliers aside).
    vendor = rows["p1", "gpt-4o"].pop("vendor_price")
    assert (vendor["source"], Decimal(vendor["input"]), Decimal(vendor["output"])) == (
        "catalog",
        Decimal(listed("openai", "gpt-4o")["input"]),
        Decimal(listed("openai", "gpt-4o")["output"]),
    )
    assert rows["p1", "house-model"]["vendor_price"] is None  # no cost_price, not in the catalog: unknown
    assert rows["p1", "gpt-4o"] | {"source_detail": None} == {
        "model": "gpt-4o", "provider": "p1", "upstream_model": "gpt-4o", "source": "config", "source_detail": None, "multiplier": "3",
        "input": "3", "output": "6", "cache_read": None, "cache_write": None, "reasoning": None,
        "image": None, "audio_minute": None, "character": None, "count": None,
    }  # fmt: skip
    mini = rows["p1", "gpt-4o-mini"]  # a count price of its own, token prices from the catalog
    assert (mini["source"], mini["count"], mini["input"]) == ("config+catalog", "0.002", str(Decimal(listed("openai", "gpt-4o-mini")["input"]) * 3))
    assert "catalog: openai" in mini["source_detail"]
    assert (rows["p1", "house-model"]["source"], rows["p1", "house-model"]["input"]) == ("default", "9")
    assert (rows["p2", "other-model"]["source"], rows["p2", "other-model"]["multiplier"]) == ("default", "1.5")
    assert body["api_keys_states"][USER_KEY]["price_multiplier"] == "1.1"
    assert body["api_keys_states"]["sk-acme-member-0001"]["price_multiplier"] == "1.25"
