"""The price catalog loader: operators' own files (pure, no server)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.pricing import ModelPrice, TokenPrice
from core.pricing.catalog import CatalogError, load_catalog


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
