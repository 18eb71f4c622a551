"""api.yaml parsing and validation: typed results, and errors that name file, line and reason."""

from __future__ import annotations

import textwrap
from decimal import Decimal

import pytest
from ruamel.yaml import YAML

from core.config import MetricsSettings, build_config
from core.config.yamlsource import ConfigError, expand_env, parse_yaml
from core.routing import Scheduler, routes_for

BASE = """\
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
api_keys:
  - api: sk-one
"""
# BASE serves echo-1, which nothing prices, so on its own it does not load (fail-closed pricing): the error
# tests rely on that to add one line at a known place. A test that loads it says echo-1 is free with this.
ECHO_FREE = "preferences:\n  model_price: {echo-1: 0}\n"


def load(text: str):
    return build_config(textwrap.dedent(text), "api.yaml")


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


def test_metrics_settings_are_read_and_default_to_admin_only_without_key_series():
    assert load(BASE + ECHO_FREE).preferences.metrics == MetricsSettings(public=False, per_key=False)
    assert load(BASE + ECHO_FREE + "  metrics: {public: true, per_key: yes}\n").preferences.metrics == MetricsSettings(public=True, per_key=True)


def test_minimal_config_builds_typed_objects():
    config = load(BASE + ECHO_FREE)
    assert config.providers[0].engine == "echo"
    assert config.preferences.scheduling_algorithm == "fixed_priority"
    assert config.preferences.auto_retry is True
    assert config.key_index.find("sk-one").role == "admin"  # the only key: the admin, as in uni-api (test_uniapi.py)
    assert config.key_index.find("sk-on") is None


def test_alias_and_provider_scoped_names_resolve_to_routes():
    config = load(
        """\
        providers:
          - provider: a
            base_url: https://a.example/v1/chat/completions
            api: k
            model:
              - real-model-name: nice
              - other
          - provider: b
            base_url: https://b.example/v1/
            api: k
            model: [nice]
        preferences:
          model_price: {nice: 0, other: 0}
        """
    )
    nice = config.routes["nice"]
    assert [(r.provider.name, r.upstream_name) for r in nice] == [("a", "real-model-name"), ("b", "nice")]
    assert config.routes["b/nice"] == (nice[1],)
    assert "real-model-name" not in config.routes
    assert config.providers[0].base_url == "https://a.example/v1"
    assert config.providers[1].base_url == "https://b.example/v1"


def test_engine_is_inferred_from_base_url():
    config = load("providers:\n  - provider: x\n    base_url: https://api.example.com/v1\n    api: k\n    model: [m]\npreferences:\n  model_price: {m: 0}\n")
    assert config.providers[0].engine == "openai"
    anthropic = load(
        "providers:\n  - provider: x\n    base_url: https://api.anthropic.com/v1\n    api: k\n    model: [m]\npreferences:\n  model_price: {m: 0}\n"
    )
    assert anthropic.providers[0].engine == "anthropic"
    azure = load("providers:\n  - provider: x\n    base_url: https://me.openai.azure.com\n    api: k\n    model: [m]\npreferences:\n  model_price: {m: 0}\n")
    assert azure.providers[0].engine == "azure"


def test_timeouts_resolve_exact_then_longest_prefix_then_default():
    config = load(
        """\
        providers:
          - provider: a
            base_url: https://a.example/v1
            api: k
            model: [gpt-4o, gpt-4o-mini, o1]
            preferences:
              model_timeout: {default: 50, gpt-4o: 20, gpt-4o-mini: 5}
        preferences:
          model_timeout: {o1: 300}
        """
    )
    timeouts = {r.public_name: r.timeout for rs in config.routes.values() for r in rs}
    assert timeouts == {"gpt-4o": 20, "gpt-4o-mini": 5, "o1": 300}


def test_env_vars_are_expanded_with_defaults(monkeypatch):
    monkeypatch.setenv("UP_KEY", "secret-from-env")
    config = load(
        """\
        providers:
          - provider: a
            base_url: ${BASE:-https://fallback.example/v1}
            api: ${UP_KEY}
            model: [m]
        preferences:
          model_price: {m: 0}
        """
    )
    assert config.providers[0].upstream_keys == ("secret-from-env",)
    assert config.providers[0].base_url == "https://fallback.example/v1"


def test_unset_env_var_is_an_error_with_its_line(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    error = error_of(
        """\
        providers:
          - provider: a
            base_url: https://a.example/v1
            api: ${NOT_SET_ANYWHERE}
            model: [m]
        """
    )
    assert (error.line, error.column) == (4, 5)
    assert "NOT_SET_ANYWHERE is not set" in error.reason
    assert str(error).startswith("api.yaml:4:5: ")


def test_expand_env_leaves_plain_text_alone():
    tree = expand_env(parse_yaml("a: plain $HOME\nb: [x, '${V}']\n", "f"), "f", {"V": "v"})
    assert tree["a"] == "plain $HOME" and tree["b"][1] == "v"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (BASE + "extra: 1\n", 7, "unknown key 'extra' in the top level"),
        (BASE + "preferences:\n  cooldown_perod: 5\n", 8, "did you mean 'cooldown_period'?"),
        (BASE + "preferences:\n  cooldown_period: -5\n", 8, "preferences.cooldown_period must be >= 0, got -5"),
        (BASE + "preferences:\n  cooldown_period: soon\n", 8, "must be a number, got 'soon'"),
        (BASE + "preferences:\n  AUTO_RETRY: maybe\n", 8, "preferences.AUTO_RETRY must be true, false or a number of retries"),
        (BASE + "preferences:\n  SCHEDULING_ALGORITHM: fastest\n", 8, "must be one of fixed_priority, round_robin"),
        (BASE + "preferences:\n  metrics: 5\n", 8, "preferences.metrics must be a mapping, got the number 5"),
        (BASE + "preferences:\n  metrics: {per_kye: true}\n", 8, "unknown key 'per_kye' in preferences.metrics (did you mean 'per_key'?)"),
        (BASE + "preferences:\n  metrics: {public: maybe}\n", 8, "preferences.metrics.public must be true or false, got 'maybe'"),
        (BASE + "  - api: sk-one\n", 7, "duplicate API key in api_keys[1]"),
        (BASE + "  - api: sk-two\n    model: [echo/gpt-9]\n", 8, "provider 'echo' has no model 'gpt-9'"),
        (BASE + "  - api: sk-two\n    model: [gpt-9]\n", 8, "model 'gpt-9', which no provider serves"),
        (BASE + "  - api: sk-two\n    role: [admin]\n", 8, "api_keys[1].role must be a string"),
        (BASE.replace("model: [echo-1]", "model: [echo-1]\n  - provider: echo\n    engine: echo\n    model: [x]"), 5, "duplicate provider name 'echo'"),
        (BASE.replace("engine: echo", "engine: telepathy"), 3, "must be one of openai, azure"),
        (BASE.replace("model: [echo-1]", "model: [echo-1, {x: echo-1}]"), 4, "model 'echo-1' is listed twice"),
        (BASE.replace("model: [echo-1]", "model: 5"), 4, "providers[0].model must be a list"),
        ("providers:\n  - provider: x\n    base_url: ftp://x\n    api: k\n    model: [m]\n", 3, "must start with http:// or https://"),
        ("providers:\n  - provider: x\n    base_url: https://x\n    model: [m]\n", 2, "providers[0].api is required"),
        ("providers: []\n", 1, "at least one provider"),
        ("providers:\n  - provider: x\n    engine: echo\n    model: [m\n", 4, "YAML syntax error"),  # the unclosed '['
        ("providers:\n  - provider: [x\n", 2, "YAML syntax error"),
    ],
)
def test_validation_errors_name_the_line_and_reason(text, line, reason):
    error = error_of(text)
    assert error.file == "api.yaml"
    assert error.line == line, str(error)
    assert reason in error.reason, str(error)


def test_yaml_the_fast_parser_refuses_but_ruamel_accepts_still_loads():
    """libyaml stops at the ':' of a timezone inside a flow mapping; ruamel reads it."""
    config = load(BASE + "    preferences: {billing_mode: token, credits: 10.0, created_at: 2024-01-01T00:00:00+08:00}\n" + ECHO_FREE)
    billing = config.key_index.find("sk-one").billing
    assert (billing.mode, billing.credits_nanos, billing.created_at) == ("token", 10_000_000_000, 1704038400.0)


def test_a_syntax_error_is_reported_in_ruamels_words_not_the_fast_parsers():
    text = BASE + "    preferences: {credits: [1\n"
    with pytest.raises(Exception) as ruamel:
        YAML(typ="rt").load(text)
    assert str(ruamel.value.problem) in error_of(text).reason  # libyaml says "did not find expected ',' or ']'"


def test_a_key_without_its_colon_is_reported_at_its_own_line_and_column():
    text = BASE + "    role: user\n" + "    name alice\n" + "    preferences: {credits: 1}\n"
    error = error_of(text)
    assert (error.line, error.column) == (8, 5), str(error)
    assert str(error).startswith("api.yaml:8:5: YAML syntax error: could not find expected ':'")


def test_validation_errors_carry_the_column_too():
    error = error_of(BASE + "preferences:\n  cooldown_period: soon\n")
    assert str(error).startswith("api.yaml:8:3: preferences.cooldown_period must be a number")


@pytest.mark.parametrize("value", ["!!int soon", "!!float soon", "[" * 2000 + "]" * 2000])
def test_yaml_that_fails_inside_the_parser_is_a_config_error_not_a_crash(value):
    error = error_of(BASE + f"preferences:\n  cooldown_period: {value}\n")
    assert error.reason.startswith("YAML error: "), str(error)


def test_numbers_are_exact_decimals():
    config = load(BASE + "preferences:\n  cooldown_period: 0.1\n  model_price: {echo-1: 0}\n")
    assert config.preferences.cooldown_period == float(Decimal("0.1"))


def test_routes_for_applies_the_allow_list():
    config = load(
        """\
        providers:
          - provider: a
            engine: echo
            model: [m1, m2]
          - provider: b
            engine: echo
            model: [m1]
        api_keys:
          - api: sk-all
          - api: sk-some
            model: [b/m1]
          - api: sk-uni
            model: [all]
        preferences:
          model_price: {m1: 0, m2: 0}
        """
    )
    some = config.key_index.find("sk-some")
    assert [r.provider.name for r in routes_for(config, "m1", some)] == ["b"]
    assert len(routes_for(config, "m1", config.key_index.find("sk-uni"))) == 2
    with pytest.raises(Exception) as caught:
        routes_for(config, "m2", some)
    assert getattr(caught.value, "status", None) == 403
    with pytest.raises(Exception) as caught:
        routes_for(config, "m3", config.key_index.find("sk-all"))
    assert getattr(caught.value, "status", None) == 404


def test_scheduler_puts_cooling_routes_last_and_recovers_them():
    clock = [100.0]
    config = load(
        "providers:\n  - provider: a\n    engine: echo\n    model: [m]\n  - provider: b\n    engine: echo\n    model: [m]\npreferences:\n  model_price: {m: 0}\n"
    )
    scheduler = Scheduler(clock=lambda: clock[0])
    first, second = config.routes["m"]
    scheduler.cool_down(first, 60)
    assert scheduler.order("m", config.routes["m"], "fixed_priority") == [second, first]
    clock[0] += 61
    assert scheduler.order("m", config.routes["m"], "fixed_priority") == [first, second]


def test_every_setting_is_documented_in_the_example():
    import re
    from pathlib import Path

    from core import config
    from core.config import billing as config_billing
    from core.config import limits as config_limits

    example = (Path(__file__).resolve().parent.parent / "api.yaml.example").read_text()
    settings = (
        config.TOP_LEVEL_KEYS + config.PROVIDER_KEYS + config.PROVIDER_PREFERENCE_KEYS + config.KEY_KEYS + config.KEY_PREFERENCE_KEYS
        + config.PREFERENCE_KEYS + config_billing.COUNT_BILLING_KEYS + config_billing.MODEL_PRICE_KEYS + config_limits.ALERT_KEYS
    )  # fmt: skip
    missing = [name for name in settings if not re.search(rf"(^|[\s{{,]){re.escape(name)}:", example, re.MULTILINE)]
    weekly = "weekly_cost_limit" in example and "monthly_cost_limit" in example
    assert missing == [] and weekly, f"api.yaml.example does not document: {missing}"


@pytest.mark.parametrize(
    ("preferences", "where"),
    [
        ("count_credits: 100000000000000000000", "api_keys[0].preferences.count_credits"),
        ("credits: 10000000000000000", "api_keys[0].preferences.credits"),
        ("quota: 1e20", "api_keys[0].preferences.quota"),
        ("concurrency_limit: 18446744073709551616", "api_keys[0].preferences.concurrency_limit"),
        ("rate_limit: 100000000000000000000/min", "api_keys[0].preferences.rate_limit"),
        ("rate_limit: " + "9" * 5000 + "/min", "api_keys[0].preferences.rate_limit"),  # past int()'s digit limit
    ],
)
def test_numbers_past_the_documented_maximum_are_located_errors(preferences, where):
    error = error_of(BASE + f"    preferences: {{{preferences}}}\n")
    assert error.line == 7 and "at most 1000000000000000 (10^15)" in error.reason and where in error.reason


def test_the_largest_allowed_numbers_load():
    config = load(BASE + "    preferences: {count_credits: 1000000000000000, credits: 1000000000000000, quota: 1000000000000000}\n" + ECHO_FREE)
    assert config.key_index.find("sk-one").billing.count_credits == 10**15


def test_a_key_written_without_its_api_label_is_not_quoted_in_the_error():
    error = error_of(BASE + "  - sk-live-SECRET-7f3a9c\n")
    assert error.line == 7 and "api_keys[1] must be a mapping, got a string" in error.reason
    assert "SECRET" not in str(error)


@pytest.mark.parametrize(("written", "read"), [("true", True), ("false", False), ("0", 0), ("3", 3), ("'2'", 2)])
def test_auto_retry_is_true_false_or_a_number_of_retries(written, read):
    config = load(BASE + f"    preferences: {{AUTO_RETRY: {written}}}\npreferences: {{AUTO_RETRY: 1, model_price: {{echo-1: 0}}}}\n")
    assert config.key_index.find("sk-one").auto_retry == read and type(config.key_index.find("sk-one").auto_retry) is type(read)
    assert config.preferences.auto_retry == 1


def test_a_key_without_auto_retry_takes_the_global_one():
    assert load(BASE + "preferences: {AUTO_RETRY: 2, model_price: {echo-1: 0}}\n").key_index.find("sk-one").auto_retry == 2


@pytest.mark.parametrize("written", ["maybe", "-1", "1.5"])
def test_auto_retry_of_another_kind_is_a_located_error(written):
    error = error_of(BASE + f"preferences: {{AUTO_RETRY: {written}}}\n")
    assert error.line == 7 and "preferences.AUTO_RETRY" in error.reason


def test_a_key_may_set_its_own_scheduling_algorithm_and_lottery_is_one():
    config = load(
        BASE + "    preferences: {SCHEDULING_ALGORITHM: lottery}\n  - api: sk-two\npreferences: {SCHEDULING_ALGORITHM: round_robin, model_price: {echo-1: 0}}\n"
    )
    assert config.key_index.find("sk-one").scheduling_algorithm == "lottery"
    assert config.key_index.find("sk-two").scheduling_algorithm == "round_robin"


def test_smart_round_robin_loads_as_weighted_round_robin_with_a_warning():
    # role: admin, so the only warning is this one (without it the first key is the admin, with a warning)
    config = load(BASE + "    role: admin\n    preferences: {SCHEDULING_ALGORITHM: smart_round_robin}\n" + ECHO_FREE)
    assert config.key_index.find("sk-one").scheduling_algorithm == "weighted_round_robin"
    assert [(w.line, "smart_round_robin" in w.reason) for w in config.warnings] == [(8, True)]


def test_lottery_puts_routes_first_in_proportion_to_their_weight():
    config = load(
        """\
        providers:
          - {provider: heavy, engine: echo, model: [m], preferences: {weight: 3}}
          - {provider: light, engine: echo, model: [m]}
        preferences:
          model_price: {m: 0}
        """
    )
    scheduler = Scheduler()
    firsts = [scheduler.order("m", config.routes["m"], "lottery")[0].provider.name for _ in range(2000)]
    assert 1350 < firsts.count("heavy") < 1650  # 1500 expected; sigma is about 19


def test_rate_limits_count_weeks_months_and_years_as_uni_api_does():
    config = load(BASE + "    preferences: {rate_limit: '1/week,10/month,3/mo,5/year,2/hr'}\n" + ECHO_FREE)
    rules = config.key_index.find("sk-one").limits.rate_limits
    assert [(rule.limit, rule.seconds) for rule in rules] == [(1, 7 * 86400), (10, 30 * 86400), (3, 30 * 86400), (5, 365 * 86400), (2, 3600)]


def test_body_overrides_load_per_public_model_and_warn_about_what_they_cannot_do():
    config = load(
        """\
        providers:
          - provider: a
            base_url: https://a.example/v1
            api: k
            model:
              - real-name: nice
            preferences:
              post_body_parameter_overrides:
                stream: false
                __remove__: [{path: tools, where: {type: x}}, temperature]
                nice: {seed: 1}
                real-name: {seed: 2}
        preferences:
          model_price: {nice: 0}
        """
    )
    overrides = config.providers[0].body_overrides
    assert config.routes["nice"][0].provider is config.providers[0]
    body = {"model": "real-name", "temperature": 1, "stream": True}
    # `real-name` is no public name, so (as in uni-api) it is a field for every model.
    assert overrides.apply("nice", body) == {"model": "real-name", "stream": True, "real-name": {"seed": 2}, "seed": 1}
    assert overrides.apply("other", body) == {"model": "real-name", "stream": True, "real-name": {"seed": 2}}
    assert [w.line for w in config.warnings] == [9, 10]
    assert "stream" in config.warnings[0].reason and "path rules" in config.warnings[1].reason


def test_a_proxys_credentials_go_to_the_proxy_only_and_never_into_messages():
    config = load(
        """\
        providers:
          - {provider: tls, base_url: https://a.example/v1, api: k, model: [m]}
          - {provider: plain, base_url: http://b.example/v1, api: k, model: [m], preferences: {proxy: "http://b-proxy:3128"}}
        preferences:
          proxy: http://ops:pa%40ss@proxy.example:8080
          model_price: {m: 0}
        """
    )
    tls, plain = config.providers
    assert tls.proxy.url == "http://proxy.example:8080" and tls.proxy.request_headers == {}
    assert tls.proxy.connect_headers == {"Proxy-Authorization": "Basic b3BzOnBhQHNz"}  # ops:pa@ss, to the CONNECT only
    assert plain.proxy.url == "http://b-proxy:3128" and plain.proxy.connect_headers is None and plain.proxy.request_headers == {}
    assert "pa%40ss" not in repr(config.providers) and "b3Bz" not in repr(config.providers)
    error = error_of(BASE + "preferences:\n  proxy: ftp://ops:hunter2@proxy.example\n")
    assert error.line == 8 and "preferences.proxy must be a proxy URL" in error.reason and "hunter2" not in str(error)
