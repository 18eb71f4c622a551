"""uni-api's own api.yaml examples (test/fixtures/uniapi, verbatim) load, warn about what
Tollgate does not do, and serve each provider Tollgate has an engine for at the right path."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from ruamel.yaml import YAML
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.config import build_config
from core.config.yamlsource import ConfigError
from test.conftest import FREE
from test.servers import model_list

FIXTURES = Path(__file__).resolve().parent / "fixtures"
UNIAPI = FIXTURES / "uniapi"
EXAMPLES = sorted(path.name for path in UNIAPI.glob("*.yaml"))

# What the fake upstream lists for a provider written without `model:` (uni-api's discovery):
# a model the price catalog prices, and one nothing prices, which is not served (fail closed).
PRICED, UNPRICED = "gpt-4o-mini", "house-llm-1"
SEARCH_UNPRICED = (
    "api.yaml:8:9: model 'jina-embeddings-v3' has no price: add a model_price entry or a default "
    "(the price catalog does not list it; 'jina-embeddings-v3: 0' marks it free)"
)


def example(name: str) -> str:
    """The example as uni-api's README writes it."""
    return (UNIAPI / name).read_text()


def discovering(text: str) -> list[str]:
    """The providers written without `model:`: they serve what their upstream lists."""
    return [provider["provider"] for provider in YAML(typ="safe").load(text)["providers"] if "model" not in provider]


def engines_of(text: str) -> dict[str, str]:
    """Each served provider's engine, as the example's own base_url implies it. Read without
    asking the example's real hosts for their models: a provider that would discover them is
    given one (free) for this reading only."""
    yaml = YAML(typ="rt")
    tree = yaml.load(text)
    for provider in tree["providers"]:
        provider.setdefault("model", ["probe"])
    tree.setdefault("preferences", {}).setdefault("model_price", {})["probe"] = 0
    out = io.StringIO()
    yaml.dump(tree, out)
    return {provider.name: provider.engine for provider in build_config(out.getvalue(), "api.yaml").providers}


def served_by(text: str, fake_url: str) -> str:
    """The config with each provider's base_url host moved to the fake upstream (its path kept
    as written, under a first segment naming the provider), and the engine that the real URL
    implied written down, since the fake's host no longer implies it."""
    yaml = YAML(typ="rt")
    tree = yaml.load(text)
    engines = engines_of(text)
    for provider in tree["providers"]:
        name = provider["provider"]
        if "base_url" in provider and name in engines:
            url = urlsplit(provider["base_url"])
            provider["base_url"] = f"{fake_url}/{name}{url.path}"
            provider.setdefault("engine", engines[name])
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def on_the_fake(name: str, upstream: Any) -> str:
    """The example served by the fake upstream, which lists PRICED and UNPRICED for each
    provider that discovers its models."""
    text = example(name)
    for provider in discovering(text):
        upstream.script(provider, model_list("openai", [PRICED, UNPRICED]))
    return served_by(text, upstream.server.url)


def secrets_of(text: str) -> list[str]:
    return [key["api"] for key in YAML(typ="safe").load(text)["api_keys"]]


@pytest.mark.parametrize("name", [name for name in EXAMPLES if name != "search.yaml"])
def test_each_readme_example_loads_with_located_warnings(name, upstream):
    config = build_config(on_the_fake(name, upstream), "api.yaml")
    assert config.keys and any(key.is_admin for key in config.keys)
    for warning in config.warnings:
        assert warning.line is not None, str(warning)


def test_the_search_example_does_not_load_until_its_embedding_model_has_a_price():
    """uni-api bills an unpriced model its default (1,2); Tollgate serves no model nothing
    prices: the operator must price jina-embeddings-v3 (the example's `search` is not served)."""
    with pytest.raises(ConfigError) as error:
        build_config(example("search.yaml"), "api.yaml")
    assert str(error.value) == SEARCH_UNPRICED


def reasons(text: str) -> list[str]:
    return [warning.reason for warning in build_config(text, "api.yaml").warnings]


def test_the_advanced_example_warns_once_per_option_tollgate_lacks():
    text = example("advanced.yaml")
    config = build_config(text, "api.yaml")
    lines = text.splitlines()
    for warning in config.warnings:  # an ignored option's warning points at the line that sets it
        if warning.reason.startswith("uni-api option") and (option := warning.reason.split("'")[1]).isidentifier():
            assert lines[warning.line - 1].strip().startswith(f"{option}:"), str(warning)
    ignored = sorted(r.split("'")[1] for r in reasons(text) if r.startswith("uni-api option"))
    assert ignored == sorted(
        ["exclude_endpoints", "exclude_request_types", "exclude_request_rules", "max_request_body_bytes"]  # provider_name
        + ["tools"]  # anthropic
        + ["tools", "api_key_rate_limit", "api_key_cooldown_period", "api_key_schedule_algorithm", "keepalive_interval"]  # gemini
        + ["cooldown_period"]  # azure
        + ["tools"]  # other-provider
        + ["ENABLE_MODERATION", "API key as a channel (sk-…/*)"]  # api_keys[1]
        + ["model weight"] * 3  # api_keys[2]
        + ["rate_limit", "keepalive_interval", "error_triggers"]  # preferences
    )
    # post_body_parameter_overrides, AUTO_RETRY and SCHEDULING_ALGORITHM are Tollgate's too; the
    # example's socks5 proxies (gemini's and the global one) are not, each a warning at its line.
    socks5 = [w for w in config.warnings if w.reason.startswith("socks5")]
    assert [lines[w.line - 1].strip().split(" #")[0] for w in socks5] == ["proxy: socks5://[username]:[password]@[ip]:[port]"] * 2
    assert [w.reason for w in socks5] == ["socks5 proxies are not supported (http:// and https:// are) and are ignored"] * 2
    engines = sorted(r for r in reasons(text) if r.startswith("uni-api engine"))
    assert [e.split("'")[1] for e in engines] == ["aws", "azure-databricks", "cloudflare", "doubao-translation", "vertex", "vertex"]
    assert sum("there is no provider" in r for r in reasons(text)) == 4  # openai-test/…, gcp1-3/*
    assert not any("no key has role: admin" in r for r in reasons(text))


def test_the_advanced_example_reads_engines_and_base_urls_as_uni_api_does():
    providers = {p.name: p for p in build_config(example("advanced.yaml"), "api.yaml").providers}
    assert {name: (p.engine, p.base_url) for name, p in providers.items()} == {
        "provider_name": ("openai", "https://api.your.com/v1"),
        "anthropic": ("anthropic", "https://api.anthropic.com/v1"),
        "gemini": ("gemini", "https://generativelanguage.googleapis.com/v1beta"),
        "azure": ("azure", "https://your-endpoint.openai.azure.com"),
        "other-provider": ("openai", "https://api.xxx.com/v1"),  # engine: openrouter, uni-api's OpenAI format
    }
    assert providers["gemini"].proxy is None  # socks5: ignored, not the global (socks5, ignored too)


ANTHROPIC_MESSAGE = json.loads((FIXTURES / "anthropic_message.json").read_text())
GEMINI_RESPONSE = json.loads((FIXTURES / "gemini_response.json").read_text())


async def anthropic_like(body: dict[str, Any], request: Request) -> Response:
    return JSONResponse(ANTHROPIC_MESSAGE)


async def gemini_like(body: dict[str, Any], request: Request) -> Response:
    return JSONResponse(GEMINI_RESPONSE)


def test_the_advanced_example_serves_each_provider_at_the_path_it_names(start_gateway, upstream):
    text = example("advanced.yaml")
    admin, literal_key, _ = secrets_of(text)
    gateway = start_gateway(served_by(text, upstream.server.url))
    upstream.script("anthropic", anthropic_like)
    upstream.script("gemini", gemini_like)
    calls = [
        (admin, "provider_name/gpt-5.2", "/provider_name/v1/chat/completions"),
        (admin, "azure/gpt-5.2", "/azure/openai/deployments/gpt-5.2/chat/completions"),
        (admin, "gemini/gemini-2.5-flash", "/gemini/v1beta/models/gemini-2.5-flash:generateContent"),
        # The label of anthropic's claude-sonnet-4-5, shadowed by other-provider's model literally
        # named so: this key may use the label's route, not the literal model (403 before).
        (admin, "anthropic/claude-sonnet-4-5", "/anthropic/v1/messages"),
        # This key names `<anthropic/claude-sonnet-4-5>`: the model literally named so, uni-api's way.
        (literal_key, "anthropic/claude-sonnet-4-5", "/other-provider/v1/chat/completions"),
    ]
    for key, model, path in calls:
        reply = gateway.client(key).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content, model
        assert upstream.seen[-1].path == path, model
        if model == "azure/gpt-5.2":  # the example's post_body_parameter_overrides, applied
            assert upstream.seen[-1].body["key1"] == "value1" and upstream.seen[-1].body["key2"] == "value2"


def test_the_minimal_example_serves_the_priced_models_its_upstream_lists_and_its_only_key_is_the_admin(start_gateway, upstream):
    text = on_the_fake("minimal.yaml", upstream)
    (key,) = secrets_of(text)
    gateway = start_gateway(text)
    warnings = [w["reason"] for w in gateway.http("GET", "/v1/config/status", key=key).json()["warnings"]]  # an admin route
    assert any("no key has role: admin" in r for r in warnings)
    assert [r for r in warnings if UNPRICED in r] == [
        f"provider 'provider_name': 1 discovered model(s) have no price and are not served: {UNPRICED} (add model_price entries or a default)"
    ]
    assert [model.id for model in gateway.client(key).models.list()] == [PRICED]
    reply = gateway.client(key).chat.completions.create(model=PRICED, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert upstream.seen[-1].path == "/provider_name/v1/chat/completions"
    unpriced = gateway.http("POST", "/v1/chat/completions", key=key, json={"model": UNPRICED, "messages": [{"role": "user", "content": "hi"}]})
    assert unpriced.status_code == 404


def test_the_channel_priority_example_serves_both_channels(start_gateway, upstream):
    gateway = start_gateway(on_the_fake("channel_priority.yaml", upstream))
    for channel in ("ai1", "ai2"):
        gateway.client("sk-1234").chat.completions.create(model=f"{channel}/{PRICED}", messages=[{"role": "user", "content": "hi"}])
        assert upstream.seen[-1].path == f"/{channel}/v1/chat/completions"


def test_providers_tollgate_has_no_engine_for_serve_nothing_and_keys_naming_them_load():
    config = build_config(example("codex.yaml"), "api.yaml")
    assert config.providers == () and config.unserved == {"codex": None}
    priced = example("search.yaml") + "preferences:\n  model_price: {jina-embeddings-v3: '0.02'}\n"  # see the search test above
    search = build_config(priced, "api.yaml")
    assert search.public_models == ("jina-embeddings-v3",)  # `search` is uni-api's /v1/search: not served


def one_provider(base_url: str, engine: str | None = None, keys: str = "", prices: str = FREE) -> str:
    pinned = f"\n    engine: {engine}" if engine else ""
    return f"providers:\n  - provider: p1\n    base_url: {base_url}{pinned}\n    api: k\n    model: [m]\n{prices}api_keys:\n  - api: sk-one\n    role: admin{keys}\n"


@pytest.mark.parametrize(
    ("engine", "written", "prefix"),
    [
        ("openai", "/v1", "/v1"),
        ("openai", "/v1/chat/completions", "/v1"),
        ("openai", "/v1/responses", "/v1"),
        ("openai", "/v1/embeddings", "/v1"),
        ("openai", "/v1/images/generations", "/v1"),
        ("anthropic", "/v1", "/v1"),
        ("anthropic", "/v1/messages", "/v1"),  # was called as /v1/messages/messages
        ("gemini", "/v1beta", "/v1beta"),
        ("gemini", "/v1", "/v1"),
        ("gemini", "/v1beta/models/m:generateContent", "/v1beta"),
        ("azure", "", ""),
        ("azure", "/openai", ""),
        ("azure", "/openai/deployments/m/chat/completions", ""),
    ],
)
def test_base_url_may_be_a_prefix_or_a_full_endpoint(engine, written, prefix):
    config = build_config(one_provider(f"https://vendor.example{written}", engine), "api.yaml")
    assert config.providers[0].base_url == f"https://vendor.example{prefix}"


@pytest.mark.parametrize(
    ("engine", "written", "called"),
    [
        ("openai", "/v1/chat/completions", "/p1/v1/chat/completions"),
        ("anthropic", "/v1/messages", "/p1/v1/messages"),
        ("gemini", "/v1beta", "/p1/v1beta/models/m:generateContent"),
        ("azure", "", "/p1/openai/deployments/m/chat/completions"),
    ],
)
def test_a_full_endpoint_base_url_is_called_at_that_endpoint(start_gateway, upstream, engine, written, called):
    vendors = {"anthropic": anthropic_like, "gemini": gemini_like}
    if engine in vendors:
        upstream.script("p1", vendors[engine])
    gateway = start_gateway(one_provider(f"{upstream.server.url}/p1{written}", engine, prices="preferences:\n  model_price: {m: '1,2'}\n"))
    gateway.client("sk-one").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert upstream.seen[-1].path == called


@pytest.mark.parametrize(
    ("url", "engine"),
    [
        ("https://api.anthropic.com/v1/messages", "anthropic"),
        ("https://self-hosted.example/v1/messages", "anthropic"),
        ("https://proxy.example/v1beta", "gemini"),
        ("https://generativelanguage.googleapis.com/v1beta/openai/chat/completions", "openai"),
        ("https://my.openai.azure.com", "azure"),
        ("https://api.example.com/v1/chat/completions", "openai"),
    ],
)
def test_the_engine_is_inferred_from_the_base_url_as_uni_api_does(url, engine):
    assert build_config(one_provider(url), "api.yaml").providers[0].engine == engine


@pytest.mark.parametrize(("written", "engine"), [("gpt", "openai"), ("openrouter", "openai"), ("claude", "anthropic"), ("gemini", "gemini")])
def test_uni_apis_engine_names_are_read_as_tollgates(written, engine):
    assert build_config(one_provider("https://x.example/v1", written), "api.yaml").providers[0].engine == engine


def test_an_unknown_engine_is_still_an_error():
    with pytest.raises(ConfigError, match="engine must be one of openai, azure, anthropic, gemini, echo"):
        build_config(one_provider("https://x.example/v1", "telepathy"), "api.yaml")


def test_misspelled_options_stay_errors_with_a_suggestion():
    text = one_provider("https://x.example/v1").replace("    model: [m]\n", "    model: [m]\n    preferences: {model_timout: 5}\n")
    with pytest.raises(ConfigError, match="did you mean 'model_timeout'"):
        build_config(text, "api.yaml")
    with pytest.raises(ConfigError, match="unknown key 'tool'"):  # uni-api's is `tools`: a near miss is no option
        build_config(one_provider("https://x.example/v1").replace("    api: k\n", "    api: k\n    tool: true\n"), "api.yaml")


def test_a_key_with_an_empty_model_list_may_use_every_model():
    config = build_config(one_provider("https://x.example/v1", keys="\n  - api: sk-two\n    model: []"), "api.yaml")
    assert config.key_index.find("sk-two").access.everything


def test_a_key_whose_every_entry_is_ignored_may_use_nothing():
    config = build_config(one_provider("https://x.example/v1", keys="\n  - api: sk-two\n    model: [gcp1/*]"), "api.yaml")
    access = config.key_index.find("sk-two").access
    assert not access.everything and not access.allows(config.routes["m"][0])


def test_angle_brackets_name_the_model_literally():
    text = textwrap.dedent(
        """\
        providers:
          - provider: a
            base_url: https://a.example/v1
            api: k
            model: [m]
          - provider: b
            base_url: https://b.example/v1
            api: k
            model: [a/m]
        preferences:
          model_price: {default: 0}
        api_keys:
          - api: sk-one
            role: admin
          - api: sk-two
            model: ['<a/m>']
        """
    )
    config = build_config(text, "api.yaml")
    access = config.key_index.find("sk-two").access
    assert access.allows(config.routes["a/m"][0]) and config.routes["a/m"][0].provider.name == "b"
    assert not access.allows(config.routes["m"][0])
    assert config.shadowed_labels["a/m"].provider.name == "a"


def test_a_per_model_rate_limit_is_refused_saying_how_to_write_it():
    text = one_provider("https://x.example/v1", keys="\n  - api: sk-two\n    preferences:\n      rate_limit: {m: 10/min, default: 4/min}")
    with pytest.raises(ConfigError, match=r"per-model limits are not supported; write one limit for the key, e.g. rate_limit: 15/min,1000/day"):
        build_config(text, "api.yaml")


def test_another_role_is_a_user_with_a_warning():
    config = build_config(one_provider("https://x.example/v1", keys="\n  - api: sk-two\n    role: vip"), "api.yaml")
    assert config.key_index.find("sk-two").role == "user"
    assert [str(w) for w in config.warnings] == ["api.yaml:12:5: uni-api option 'role: vip' is not supported and is ignored (the key is a user key)"]


def test_warnings_are_on_the_config_status(start_gateway, upstream):
    gateway = start_gateway(one_provider(f"{upstream.server.url}/p1/v1").replace("    api: k\n", "    api: k\n    notes: https://x\n"))
    status = httpx.get(f"{gateway.url}/v1/config/status", headers={"Authorization": "Bearer sk-one"}).json()
    assert [w["message"] for w in status["warnings"]] == [f"{gateway.config_path}:5:5: uni-api option 'notes' is not supported and is ignored"]


def test_a_key_allowed_a_label_shadowed_by_a_model_named_so_is_served_by_the_label(start_gateway, upstream):
    """Provider b serves a model literally named `a/m`, the label of provider a's m: a key
    allowed `a/m` (provider a's m, uni-api's reading) got 403 for it."""
    gateway = start_gateway(
        """
        providers:
          - provider: a
            base_url: {fake:p1}
            api: k
            model: [m]
          - provider: b
            base_url: {fake:p2}
            api: k
            model: [a/m]
        api_keys:
          - api: sk-one
            role: admin
          - api: sk-label
            model: [a/m]
          - api: sk-literal
            model: ['<a/m>']
        preferences:
          model_price: {default: '1,2'}
        """,
        upstream,
    )
    for key, provider in (("sk-label", "p1"), ("sk-literal", "p2"), ("sk-one", "p2")):
        gateway.client(key).chat.completions.create(model="a/m", messages=[{"role": "user", "content": "hi"}])
        assert upstream.seen[-1].provider == provider, key
    assert gateway.http("GET", "/v1/models/a/m", key="sk-label").json()["owned_by"] == "a"
