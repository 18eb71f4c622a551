"""Price resolution and cost arithmetic: pure functions, exact Decimals."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from core.config import ConfigError, build_config
from core.pricing import TokenPrice, format_usd, from_nanos, to_nanos
from core.usage import Usage

PRICES = """\
providers:
  - provider: echo
    engine: echo
    model: [gpt-4o, gpt-4o-mini, gpt-4-turbo, claude-3-5-sonnet, claude-3-haiku, other]
preferences:
  count_billing:
    enabled: {enabled}
    default_count_price: 0.001
    model_count_prices: {{gpt-4: 0.01, claude-3: 0.005, default: 0.002}}
  model_price:
    claude-3-5-sonnet: 0.12,0.48
    gpt-4o-mini: 0.0005
    gpt-4o:
      token_price: 1,2
      count_price: 0.008
      cache_read_price: 0.5
    default: 3,6
"""


def book(enabled: bool = True):
    return build_config(PRICES.format(enabled=str(enabled).lower()), "api.yaml").preferences.prices


@pytest.mark.parametrize(
    ("model", "token_price"),
    [
        ("gpt-4o", (Decimal(1), Decimal(2))),  # exact
        ("gpt-4o-2024-08-06", (Decimal(1), Decimal(2))),  # prefix
        ("gpt-4o-mini", (Decimal("0.15"), Decimal("0.60"))),  # its entry is count-only: token price from the catalog
        ("claude-3-5-sonnet-20241022", (Decimal("0.12"), Decimal("0.48"))),
        ("other", (Decimal(3), Decimal(6))),  # default
    ],
)
def test_token_price_resolution(model, token_price):
    price = book().token_price(model)
    assert (price.input, price.output) == token_price


@pytest.mark.parametrize(
    ("model", "count_price"),
    [
        ("gpt-4o-mini", Decimal("0.0005")),  # its own model_price count price beats gpt-4o's by length
        ("gpt-4o", Decimal("0.008")),  # own model_price count price
        ("gpt-4-turbo", Decimal("0.01")),  # count_billing prefix gpt-4
        ("claude-3-haiku", Decimal("0.005")),  # count_billing prefix claude-3
        ("other", Decimal("0.002")),  # count_billing default
    ],
)
def test_count_price_resolution(model, count_price):
    assert book().count_price(model) == count_price


@pytest.mark.parametrize(
    ("mode", "model", "cost_type"),
    [
        ("hybrid", "gpt-4o", "count"),  # own count price
        ("hybrid", "gpt-4-turbo", "count"),  # named model_count_prices entry
        ("hybrid", "claude-3-5-sonnet", "count"),  # prefix claude-3 is a named entry
        ("hybrid", "other", "token"),  # only a default count price: token billing
        ("count", "other", "count"),
        ("token", "gpt-4o", "token"),
    ],
)
def test_hybrid_choice(mode, model, cost_type):
    assert book().cost_type(mode, model) == cost_type


def test_count_billing_disabled_bills_everything_by_tokens():
    assert book(enabled=False).cost_type("count", "gpt-4o") == "token"
    assert book(enabled=False).cost_type("hybrid", "gpt-4o") == "token"


def test_token_cost_bills_cached_tokens_at_the_cache_price():
    price = book().token_price("gpt-4o")
    cost = price.cost(Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400))
    assert cost == (600 * Decimal(1) + 400 * Decimal("0.5") + 500 * Decimal(2)) / 1_000_000


def test_cached_tokens_bill_at_input_price_without_a_cache_price():
    price = book().token_price("claude-3-5-sonnet")
    assert price.cost(Usage(100, 10, 50)) == price.cost(Usage(100, 10, 0))


def test_tiny_charges_sum_exactly():
    price = book().token_price("claude-3-5-sonnet")
    one = to_nanos(price.cost(Usage(prompt_tokens=1, completion_tokens=0)))
    assert one == 120  # 0.12 USD / 1M tokens = 120 nano-dollars per token
    assert from_nanos(sum(one for _ in range(10_000))) == Decimal("0.0012")


def test_bad_prices_are_config_errors():
    from core.config.yamlsource import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config(PRICES.format(enabled="true").replace("0.12,0.48", "0.12,abc"), "api.yaml")
    assert caught.value.line == 11 and "must be a number" in caught.value.reason


PRICE_CASES = [
    TokenPrice(Decimal("2.5"), Decimal("10")),
    TokenPrice(Decimal("0.15"), Decimal("0.6"), cache_read=Decimal("0.075"), cache_write=Decimal("0.1875"), reasoning=Decimal("1.2")),
    TokenPrice(Decimal("0.000000001"), Decimal("0.0000000015")),  # finer than a nano per 1M: Decimal path
    TokenPrice(Decimal("3"), Decimal("15"), cache_read=Decimal("0.3")),
    TokenPrice(Decimal(0), Decimal(0)),
]
USAGE_CASES = [
    Usage(),
    Usage(prompt_tokens=1),
    Usage(prompt_tokens=7, completion_tokens=3),
    Usage(prompt_tokens=1000, completion_tokens=333, cached_tokens=400, cache_write_tokens=200, reasoning_tokens=100),
    Usage(prompt_tokens=5, completion_tokens=5, cached_tokens=50, cache_write_tokens=50, reasoning_tokens=50),  # parts capped at totals
    Usage(prompt_tokens=123_456_789, completion_tokens=98_765_432),
]


@pytest.mark.parametrize("price", PRICE_CASES)
@pytest.mark.parametrize("usage", USAGE_CASES)
def test_integer_costs_equal_the_decimal_definition(price, usage):
    assert price.cost_nanos(usage) == to_nanos(price.cost(usage))
    assert price.estimate_nanos(usage.prompt_tokens, usage.completion_tokens) == to_nanos(price.estimate(usage.prompt_tokens, usage.completion_tokens))


@pytest.mark.parametrize("nanos", [0, 1, 10, 999_999_999, 1_000_000_000, 10_000_000_000, 1_500_000_000, -1, -2_250_000_000, 123_456_789_012])
def test_format_usd_matches_decimal_formatting(nanos):
    assert format_usd(nanos) == format(from_nanos(nanos).normalize(), "f")


MEDIA_PRICES = """\
providers:
  - provider: echo
    engine: echo
    model: [gpt-image-1, dall-e-3, whisper-1, gpt-4o-transcribe, tts-1, omni-moderation-latest, text-moderation-007]
preferences:
  count_billing: {model_count_prices: {text-moderation: 0.002}, default_count_price: 0.5}
  model_price:
    gpt-image-1: {image_price: 0.04, token_price: "5,40"}
    dall-e-3: {image_price: 0.08}
    whisper-1: {audio_minute_price: 0.006}
    gpt-4o-transcribe: {audio_minute_price: 0.006, token_price: "2.5,10"}
    tts-1: {character_price: 15}
    omni-moderation-latest: {count_price: 0.0001}
    default: 1,2
"""


def media_book():
    return build_config(MEDIA_PRICES, "api.yaml").preferences.prices


@pytest.mark.parametrize(
    ("model", "endpoint", "usage", "nanos", "unit_prices"),
    [
        ("dall-e-3", "images/generations", Usage(images=3, estimated=True), 240_000_000, '{"image":"0.08"}'),
        # gpt-image-1 reports token usage: its token price bills it, not the image price.
        ("gpt-image-1", "images/generations", Usage(prompt_tokens=50, completion_tokens=4160, images=1), 166_650_000, '{"input":"5","output":"40"}'),
        ("gpt-image-1", "images/edits", Usage(images=2, estimated=True), 80_000_000, '{"image":"0.04"}'),
        # 12.5 minutes of audio at 0.006 per minute.
        ("whisper-1", "audio/transcriptions", Usage(audio_ms=750_000, estimated=True), 75_000_000, '{"audio_minute":"0.006"}'),
        ("whisper-1", "audio/translations", Usage(audio_ms=1, estimated=True), 100, '{"audio_minute":"0.006"}'),
        (
            "gpt-4o-transcribe",
            "audio/transcriptions",
            Usage(prompt_tokens=1000, completion_tokens=100, audio_ms=60_000),
            3_500_000,
            '{"input":"2.5","output":"10"}',
        ),
        ("tts-1", "audio/speech", Usage(characters=2_000, estimated=True), 30_000_000, '{"character":"15"}'),
        ("omni-moderation-latest", "moderations", Usage(estimated=True), 100_000, '{"count":"0.0001"}'),
        # A moderation model with a named count_billing price pays it; one without pays 0, not the default count price.
        ("text-moderation-007", "moderations", Usage(), 2_000_000, '{"count":"0.002"}'),
        ("other-moderation", "moderations", Usage(), 0, '{"count":"0"}'),
        # No unit price: the model's token price bills whatever tokens there are.
        ("whisper-2", "audio/transcriptions", Usage(prompt_tokens=1_000_000, audio_ms=60_000), 1_000_000_000, '{"input":"1","output":"2"}'),
    ],
)
def test_media_endpoints_bill_by_their_unit(model, endpoint, usage, nanos, unit_prices):
    assert media_book().charge_nanos(model, endpoint, usage) == (nanos, unit_prices)


def test_media_reservations_use_the_requested_units():
    prices = media_book()
    assert prices.estimate_charge_nanos("dall-e-3", "images/generations", Usage(images=4), 10, 1024) == 320_000_000
    assert prices.estimate_charge_nanos("tts-1", "audio/speech", Usage(characters=1_000_000), 10, 0) == 15_000_000_000
    assert prices.estimate_charge_nanos("omni-moderation-latest", "moderations", Usage(), 10, 0) == 100_000
    # Without a unit price, the token estimate at the model's token price.
    assert prices.estimate_charge_nanos("whisper-2", "audio/transcriptions", Usage(audio_ms=60_000), 1_000_000, 0) == 1_000_000_000


def test_unit_prices_are_checked_like_every_price():
    bad = MEDIA_PRICES.replace("image_price: 0.08", "image_price: -1")
    with pytest.raises(ConfigError, match="image_price"):
        build_config(bad, "api.yaml")
    typo = MEDIA_PRICES.replace("audio_minute_price: 0.006}", "audio_minute: 0.006}")
    with pytest.raises(ConfigError, match="audio_minute"):
        build_config(typo, "api.yaml")


def test_recorded_unit_prices_are_never_in_exponent_notation():
    tiny = TokenPrice(Decimal("0.0000001"), Decimal("1E+1"), cache_read=Decimal("3.30"))
    assert json.loads(tiny.unit_prices()) == {"input": "0.0000001", "output": "10", "cache_read": "3.30"}
