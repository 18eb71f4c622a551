"""Providers without `model:` serve what their upstream's /models lists (uni-api's discovery)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.config import build_config
from core.config.yamlsource import ConfigError
from test.conftest import keys_yaml
from test.servers import fail, model_list
from test.test_proxy import ForwardProxy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MESSAGES = [{"role": "user", "content": "hi"}]
SECRET = "upstream-secret-7f3a"


def config(engine: str, extra: str = "", user_models: str | None = "[p1/*]") -> str:
    """One provider p1 on the fake upstream with no `model:`, and an echo provider beside it."""
    return (
        f"""
providers:
  - provider: p1
    base_url: {{fake:p1}}
    engine: {engine}
    api: {SECRET}
  - provider: echo
    engine: echo
    model: [echo-1]
"""
        + keys_yaml(user_models)
        + "preferences:\n  model_price: {echo-1: '1,2', gpt-: '1,2', claude-: '3,15', gemini-: '0.3,2.5'}\n"
        + extra
    )


def models_requests(upstream: Any) -> list[Any]:
    return [seen for seen in upstream.seen if seen.path.endswith("/models")]


def test_openai_provider_lists_its_upstreams_models_and_serves_them(start_gateway, upstream):
    upstream.script("p1", model_list("openai", ["gpt-x", "gpt-y"]))
    gateway = start_gateway(config("openai"), upstream)
    listed = [model.id for model in gateway.client().models.list()]
    assert listed == ["gpt-x", "gpt-y"]  # the key allowed p1/* sees them; not echo-1
    reply = gateway.client().chat.completions.create(model="gpt-y", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from upstream"
    asked, chat = models_requests(upstream), upstream.seen[-1]
    assert len(asked) == 1 and asked[0].headers["authorization"] == f"Bearer {SECRET}"
    assert chat.path == "/p1/v1/chat/completions" and chat.body["model"] == "gpt-y"
    assert gateway.status()["warnings"] == []


def test_anthropic_discovery_follows_pages_and_serves_through_messages(start_gateway, upstream):
    message = json.loads((FIXTURES / "anthropic_message.json").read_text())

    async def anthropic(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(message)

    upstream.script("p1", model_list("anthropic", ["claude-a", "claude-b", "claude-c"], then=anthropic, page_size=2))
    gateway = start_gateway(config("anthropic"), upstream)
    assert [model.id for model in gateway.client().models.list()] == ["claude-a", "claude-b", "claude-c"]
    gateway.client().chat.completions.create(model="claude-c", messages=MESSAGES)
    pages = models_requests(upstream)
    assert [page.query for page in pages] == ["limit=1000", "limit=1000&after_id=claude-b"]
    assert pages[0].headers["x-api-key"] == SECRET and pages[0].headers["anthropic-version"] == "2023-06-01"
    assert upstream.seen[-1].path == "/p1/v1/messages" and upstream.seen[-1].body["model"] == "claude-c"


def test_gemini_discovery_keeps_the_models_that_generate_content(start_gateway, upstream):
    answer = json.loads((FIXTURES / "gemini_response.json").read_text())

    async def gemini(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(answer)

    upstream.script("p1", model_list("gemini", ["gemini-a", "gemini-aqa", "gemini-b"], then=gemini, page_size=2))
    gateway = start_gateway(config("gemini"), upstream)
    assert [model.id for model in gateway.client().models.list()] == ["gemini-a", "gemini-b"]  # -aqa only answers questions
    gateway.client().chat.completions.create(model="gemini-b", messages=MESSAGES)
    pages = models_requests(upstream)
    assert [page.query for page in pages] == ["pageSize=1000", "pageSize=1000&pageToken=2"]
    assert pages[0].headers["x-goog-api-key"] == SECRET and SECRET not in pages[0].query  # the key is never in a URL
    assert upstream.seen[-1].path == "/p1/v1/models/gemini-b:generateContent"


def test_a_failed_discovery_at_start_serves_nothing_from_that_provider_and_says_why(start_gateway, upstream):
    upstream.script("p1", fail(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}))
    gateway = start_gateway(config("openai", user_models=None), upstream)
    assert [model.id for model in gateway.client().models.list()] == ["echo-1"]
    with pytest.raises(openai.NotFoundError):
        gateway.client().chat.completions.create(model="gpt-x", messages=MESSAGES)
    (warning,) = gateway.status()["warnings"]
    assert warning["line"] == 3  # the provider's entry
    assert f"model discovery from {upstream.base_url('p1')}/models failed: HTTP 401" in warning["reason"]
    assert "serves no models" in warning["reason"] and SECRET not in json.dumps(gateway.status())
    assert len(models_requests(upstream)) == 1  # asked once, though the warning made the load build twice


def test_a_reload_whose_discovery_fails_keeps_the_models_discovered_before(start_gateway, upstream):
    listing = model_list("openai", ["gpt-x", "gpt-y"])
    down = {"models": False}

    async def flaky(body: dict[str, Any], request: Request) -> Response:
        if down["models"] and request.url.path.endswith("/models"):
            return Response("upstream is down", status_code=503)
        return await listing(body, request)

    upstream.script("p1", flaky)
    gateway = start_gateway(config("openai"), upstream)
    down["models"] = True
    gateway.rewrite_config(gateway.config_path.read_text().replace("name: alice", "name: alice-renamed"))
    status = gateway.status()
    assert status["reload_count"] == 1 and status["last_error"] is None
    (warning,) = status["warnings"]
    assert "HTTP 503" in warning["reason"] and "still serving the 2 models discovered before" in warning["reason"]
    assert [model.id for model in gateway.client().models.list()] == ["gpt-x", "gpt-y"]
    assert gateway.client().chat.completions.create(model="gpt-x", messages=MESSAGES).choices[0].message.content == "Hello from upstream"


def test_a_hanging_models_endpoint_is_cut_at_the_discovery_timeout(start_gateway, upstream):
    async def hanging(body: dict[str, Any], request: Request) -> Response:
        await asyncio.sleep(3)
        return JSONResponse({"data": [{"id": "late"}]})

    upstream.script("p1", hanging)
    gateway = start_gateway(config("openai", "  model_discovery_timeout: 0.5\n", user_models=None), upstream)
    (warning,) = gateway.status()["warnings"]  # an answer waited for would have served 'late', without a warning
    assert "failed" in warning["reason"] and "serves no models" in warning["reason"]
    assert [model.id for model in gateway.client().models.list()] == ["echo-1"]


def test_an_azure_provider_must_list_its_deployments():
    text = "providers:\n  - provider: az\n    base_url: https://x.openai.azure.com\n    api: k\n"
    with pytest.raises(ConfigError) as error:
        build_config(text, "api.yaml")
    assert error.value.line == 2 and "model is required for an Azure provider" in error.value.reason


def test_a_discovered_model_nothing_prices_is_not_served_and_one_warning_names_it(start_gateway, upstream):
    upstream.script("p1", model_list("openai", ["gpt-x", "house-llm-1", "house-llm-2"]))
    gateway = start_gateway(config("openai"), upstream)
    assert [model.id for model in gateway.client().models.list()] == ["gpt-x"]
    [warning] = gateway.status()["warnings"]
    assert warning["line"] == 3 and "2 discovered model(s) have no price and are not served: house-llm-1, house-llm-2" in warning["reason"]
    assert gateway.http("POST", "/v1/chat/completions", json={"model": "house-llm-1", "messages": MESSAGES}).status_code == 404
    gateway.rewrite_config(gateway.config_path.read_text().replace("gpt-: '1,2'", "gpt-: '1,2', default: '5,5'"))
    assert [model.id for model in gateway.client().models.list()] == ["gpt-x", "house-llm-1", "house-llm-2"]  # a default prices them


def test_discovery_reaches_the_upstream_through_the_providers_proxy(start_gateway, upstream):
    proxy = ForwardProxy()
    try:
        upstream.script("p1", model_list("openai", ["gpt-x"]))
        proxied = proxy.url.replace("http://", "http://ops:s3cret@")
        text = config("openai").replace(f"    api: {SECRET}\n", f"    api: {SECRET}\n    preferences: {{proxy: '{proxied}'}}\n", 1)
        gateway = start_gateway(text, upstream)
        assert [model.id for model in gateway.client().models.list()] == ["gpt-x"]
        assert proxy.seen[0] == ("/p1/v1/models", "Basic b3BzOnMzY3JldA==")  # ops:s3cret, to the proxy only
        assert "proxy-authorization" not in models_requests(upstream)[0].headers
    finally:
        proxy.server.stop()
