"""The price catalog: the shipped data file and the loader of operators' own files (pure, no server)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.pricing import ModelPrice, TokenPrice
from core.pricing.catalog import BUILTIN_PATH, CatalogError, builtin_catalog, load_catalog
from core.usage import Usage

RAW = json.loads(BUILTIN_PATH.read_text(encoding="utf-8"))
TOKEN_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")
UNIT_KEYS = ("image", "audio_minute", "character")


def every_name() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(vendor, model, name or alias, raw entry) for every name the shipped file prices."""
    return [
        (vendor, model, name, raw)
        for vendor, body in RAW["vendors"].items()
        for model, raw in body["models"].items()
        for name in (model, *raw.get("aliases", ()))
    ]


def test_builtin_catalog_loads_with_each_vendors_source_and_date() -> None:
    catalog = builtin_catalog()
    assert catalog.name == "builtin"
    assert list(catalog.vendors) == ["openai", "azure", "anthropic", "gemini"]
    for vendor, (source, as_of) in catalog.vendors.items():
        assert source.startswith("https://"), vendor
        assert as_of == RAW["vendors"][vendor]["as_of"]
    assert builtin_catalog() is catalog  # read once per process


def test_builtin_prices_are_json_strings_never_numbers() -> None:
    for vendor, model, _name, raw in every_name():
        for key in (*TOKEN_KEYS, *UNIT_KEYS):
            if key in raw:
                assert isinstance(raw[key], str), f"{vendor}.{model}.{key}"


def test_gpt_4o_mini_is_priced_exactly_as_the_issue_says() -> None:
    entry = builtin_catalog().lookup("openai", "gpt-4o-mini")
    assert entry is not None and entry.vendor == "openai"
    assert entry.price == ModelPrice(token=TokenPrice(Decimal("0.15"), Decimal("0.60"), cache_read=Decimal("0.075")))


@pytest.mark.parametrize("name", ["claude-3-5-haiku", "claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"])
def test_claude_3_5_haiku_is_priced_exactly_as_the_issue_says(name: str) -> None:
    entry = builtin_catalog().lookup("anthropic", name)
    assert entry is not None and entry.vendor == "anthropic"
    token = entry.price.token
    assert token is not None
    assert (token.input, token.output, token.cache_write, token.cache_read) == (Decimal("0.80"), Decimal("4.00"), Decimal("1.00"), Decimal("0.08"))


@pytest.mark.parametrize(("vendor", "model", "name", "raw"), every_name(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_builtin_name_looks_up_to_its_json_prices(vendor: str, model: str, name: str, raw: dict[str, Any]) -> None:
    entry = builtin_catalog().lookup(vendor, name)
    assert entry is not None
    assert (entry.vendor, entry.source, entry.as_of) == (vendor, RAW["vendors"][vendor]["source"], RAW["vendors"][vendor]["as_of"])
    assert entry.price == expected_price(raw)


def expected_price(raw: dict[str, Any]) -> ModelPrice:
    """The ModelPrice the JSON entry says, built independently of the loader."""
    if raw.get("free"):
        return ModelPrice(token=TokenPrice(Decimal(0), Decimal(0)), count=Decimal(0))
    token = None
    if "input" in raw:
        token = TokenPrice(**{key: Decimal(raw[key]) for key in TOKEN_KEYS if key in raw})
    return ModelPrice(token=token, **{key: Decimal(raw[key]) for key in UNIT_KEYS if key in raw})


def test_builtin_token_prices_keep_the_vendor_digits() -> None:
    """Cache and reasoning prices are listed only where they differ from their fallback."""
    for vendor, model, _name, raw in every_name():
        if "cache_read" in raw:
            assert Decimal(raw["cache_read"]) != Decimal(raw["input"]), f"{vendor}.{model}"
        if "reasoning" in raw:
            assert Decimal(raw["reasoning"]) != Decimal(raw["output"]), f"{vendor}.{model}"


@pytest.mark.parametrize(
    ("engine", "model"), [("openai", "omni-moderation-latest"), ("openai", "text-moderation-latest"), ("openai", "omni-moderation-2024-09-26")]
)
def test_free_models_price_to_zero(engine: str, model: str) -> None:
    entry = builtin_catalog().lookup(engine, model)
    assert entry is not None
    assert entry.price.count == 0
    assert entry.price.token is not None
    assert entry.price.token.cost_nanos(Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)) == 0


def test_azure_prices_an_openai_only_model_from_openai() -> None:
    entry = builtin_catalog().lookup("azure", "o1-pro")
    assert entry is not None and entry.vendor == "openai"


def test_azure_takes_its_own_price_before_openai() -> None:
    azure, openai = builtin_catalog().lookup("azure", "text-embedding-3-small"), builtin_catalog().lookup("openai", "text-embedding-3-small")
    assert azure is not None and openai is not None
    assert (azure.vendor, openai.vendor) == ("azure", "openai")
    assert azure.price != openai.price


def test_an_openai_engine_finds_claude_in_any_vendor() -> None:
    """An OpenAI-compatible aggregator serving claude-3-5-haiku bills Anthropic's price."""
    entry = builtin_catalog().lookup("openai", "claude-3-5-haiku")
    assert entry is not None and entry.vendor == "anthropic"


def test_lookup_is_exact_and_case_sensitive() -> None:
    catalog = builtin_catalog()
    assert catalog.lookup("openai", "GPT-4o-mini") is None
    assert catalog.lookup("openai", "gpt-4o-mini-2099-01-01") is None
    assert catalog.lookup("echo", "no-such-model") is None


def test_an_unknown_engine_searches_every_vendor_in_file_order() -> None:
    entry = builtin_catalog().lookup("echo", "gpt-4o-mini")
    assert entry is not None and entry.vendor == "openai"  # openai is listed before azure


# Operators' own files.


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def catalog_of(models: dict[str, Any], **vendor: Any) -> dict[str, Any]:
    return {"vendors": {"openai": {"source": "https://example.com/prices", "as_of": "2026-01-02", "models": models, **vendor}}}


def test_an_operators_file_loads_and_names_itself(tmp_path: Path) -> None:
    path = write(tmp_path, catalog_of({"house-model": {"input": "1.5", "output": "3", "aliases": ["house"]}, "painter": {"image": "0.02"}}))
    catalog = load_catalog(path)
    assert catalog.name == str(path)
    assert catalog.vendors == {"openai": ("https://example.com/prices", "2026-01-02")}
    entry = catalog.lookup("azure", "house")
    assert entry is not None and entry.price == ModelPrice(token=TokenPrice(Decimal("1.5"), Decimal("3")))
    painter = catalog.lookup("openai", "painter")
    assert painter is not None and painter.price == ModelPrice(image=Decimal("0.02"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (catalog_of({"gpt-4o": {"input": 2.5, "output": "10"}}), 'vendors.openai.models.gpt-4o.input must be a decimal string like "2.50", got 2.5'),
        (catalog_of({"gpt-4o": {"input": "2.5", "output": 10}}), 'vendors.openai.models.gpt-4o.output must be a decimal string like "2.50", got 10'),
        (
            catalog_of({"gpt-4o": {"input": "-1", "output": "10"}}),
            'vendors.openai.models.gpt-4o.input must be a decimal string like "2.50" (digits and one point, >= 0), got "-1"',
        ),
        (catalog_of({"gpt-4o": {"input": "NaN", "output": "10"}}), 'got "NaN"'),
        (catalog_of({"gpt-4o": {"input": "1e3", "output": "10"}}), 'got "1e3"'),
        (catalog_of({"gpt-4o": {"input": "", "output": "10"}}), 'got ""'),
        (catalog_of({"gpt-4o": {"input": "1" + "0" * 16, "output": "10"}}), "vendors.openai.models.gpt-4o.input must be at most 10^15"),
        (catalog_of({"gpt-4o": {"input": "2.5", "ouput": "10"}}), "vendors.openai.models.gpt-4o has an unknown key 'ouput' (did you mean 'output'?)"),
        (catalog_of({"gpt-4o": {"input": "2.5", "output": "10"}}, sourse="x"), "vendors.openai has an unknown key 'sourse' (did you mean 'source'?)"),
        ({"vendor": {}}, "the top level has an unknown key 'vendor' (did you mean 'vendors'?)"),
        ({"about": "no vendors"}, "the top level needs 'vendors'"),
        ({"vendors": {"openai": {"as_of": "2026-01-02", "models": {}}}}, "vendors.openai needs 'source': the page the prices come from"),
        ({"vendors": {"openai": {"source": "https://x", "models": {}}}}, "vendors.openai needs 'as_of': the date of the prices, YYYY-MM-DD (got null)"),
        (
            {"vendors": {"openai": {"source": "https://x", "as_of": "Nov 2026", "models": {}}}},
            "vendors.openai needs 'as_of': the date of the prices, YYYY-MM-DD (got \"Nov 2026\")",
        ),
        ({"vendors": {"openai": {"source": "https://x", "as_of": "2026-01-02"}}}, "vendors.openai needs 'models'"),
        (
            catalog_of({"gpt-4o": {"input": "1", "output": "2"}, "gpt-4o-mini": {"input": "1", "output": "2", "aliases": ["gpt-4o"]}}),
            "vendors.openai.models.gpt-4o-mini names 'gpt-4o', which vendors.openai.models.gpt-4o already names",
        ),
        (
            catalog_of({"a": {"input": "1", "output": "2", "aliases": ["x"]}, "b": {"input": "1", "output": "2", "aliases": ["x"]}}),
            "vendors.openai.models.b names 'x', which vendors.openai.models.a already names",
        ),
        (catalog_of({"a": {"input": "1", "output": "2", "aliases": ["a"]}}), "vendors.openai.models.a names 'a', which vendors.openai.models.a already names"),
        (catalog_of({"a": {"input": "1", "output": "2", "aliases": "a-1"}}), "vendors.openai.models.a.aliases must be a list of model names"),
        (catalog_of({"a": {"input": "1"}}), "vendors.openai.models.a has input but no output: a token price needs both input and output"),
        (catalog_of({"a": {"cache_read": "1"}}), "vendors.openai.models.a has cache_read but no input or output"),
        (catalog_of({"a": {"note": "nothing"}}), "vendors.openai.models.a needs a price: input and output, image, audio_minute, character, or free: true"),
        (catalog_of({"a": {"free": True, "input": "1", "output": "1"}}), "vendors.openai.models.a is free and also has prices (input, output): keep one"),
        (catalog_of({"a": {"free": "yes"}}), 'vendors.openai.models.a.free must be true or false, got "yes"'),
        (catalog_of({"a": ["1", "2"]}), "vendors.openai.models.a must be a JSON object, got an array"),
        ({"vendors": []}, "vendors must be a JSON object, got an array"),
        (
            '{"vendors": {"openai": {"source": "https://x", "as_of": "2026-01-02", "models": {"a": {"input": "1", "output": "2"},}}}}',
            "not JSON: Expecting property name enclosed in double quotes at line 1 column",
        ),
        ('{"vendors": {}}\n{', "not JSON: Extra data at line 2 column 1"),
        (
            '{"vendors": {"openai": {"source": "https://x", "as_of": "2026-01-02", "models": {"a": {"image": "1"}, "a": {"image": "2"}}}}}',
            "the key 'a' appears twice in one object",
        ),
    ],
)
def test_a_malformed_catalog_file_says_where_and_what(tmp_path: Path, data: Any, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    assert str(raised.value).startswith(f"price catalog {path}: ")
    assert message in str(raised.value)


def test_a_missing_catalog_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"price catalog .*nothing\.json: cannot be read \(No such file or directory\)"):
        load_catalog(tmp_path / "nothing.json")


def test_a_catalog_error_is_a_value_error() -> None:
    assert issubclass(CatalogError, ValueError)


def test_the_readme_table_gives_each_vendors_model_count_date_and_source() -> None:
    readme = (BUILTIN_PATH.parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Price catalog") :].split("\n### ")[0]
    for vendor, body in RAW["vendors"].items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{vendor}`"))
        assert f"| {len(body['models'])} | {body['as_of']} | {body['source']} |" in row, row
