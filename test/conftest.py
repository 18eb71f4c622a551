from __future__ import annotations

import asyncio
import os
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from main import create_app
from test.agent_vendors import AnthropicMessagesVendor, CodexResponsesVendor
from test.servers import FakeUpstream, ServerThread, WebhookReceiver

ADMIN_KEY = "sk-admin-test-0001"
USER_KEY = "sk-user-test-0002"


class RunningGateway:
    def __init__(self, server: ServerThread, config_path: Path):
        self.server = server
        self.config_path = config_path
        self.url = server.url

    def client(self, key: str = USER_KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def async_client(self, key: str = USER_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def fire(self, key: str, count: int, call: Callable[[openai.AsyncOpenAI], Awaitable[Any]] | None = None, **create: Any) -> list[int]:
        """Send `count` requests at once with the async openai SDK, `call(client)` each (by
        default a chat completion of `create`); their HTTP statuses."""

        async def all_at_once() -> list[int]:
            client = self.async_client(key)

            async def one() -> int:
                try:
                    await (call(client) if call is not None else client.chat.completions.create(**create))
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code

            return list(await asyncio.gather(*(one() for _ in range(count))))

        return asyncio.run(all_at_once())

    def http(self, method: str, path: str, key: str | None = USER_KEY, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 10)
        return httpx.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def status(self) -> dict[str, Any]:
        return self.http("GET", "/v1/config/status", key=ADMIN_KEY).json()

    def rewrite_config(self, text: str) -> None:
        """Write a new config the way editors do (temp file, then atomic rename) and wait for it."""
        before = self.status()
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, self.config_path)
        self.wait_for(lambda s: s["reload_count"] > before["reload_count"] or s["last_attempt_at"] > before["last_attempt_at"])

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if condition(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"config status never matched: {status}")
            time.sleep(0.05)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.server = ServerThread(fake.app()).start()
    yield fake
    fake.server.stop()


@pytest.fixture
def agent_vendors(upstream: FakeUpstream) -> tuple[AnthropicMessagesVendor, CodexResponsesVendor]:
    """The strict fakes coding agents meet (test/agent_vendors.py): p1 speaks Anthropic's
    Messages API, p2 OpenAI's Responses API."""
    messages, responses = AnthropicMessagesVendor(), CodexResponsesVendor()
    upstream.script("p1", messages)
    upstream.script("p2", responses)
    return messages, responses


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A local webhook endpoint that records what alerts POST to it."""
    hook = WebhookReceiver()
    hook.server = ServerThread(hook.app()).start()
    yield hook
    hook.server.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Start the real app under uvicorn on a config text; `{fake:NAME}` becomes a fake upstream URL."""
    started: list[ServerThread] = []

    def start(config_text: str, upstream: FakeUpstream | None = None, **app_kwargs: Any) -> RunningGateway:
        text = textwrap.dedent(config_text)
        if upstream is not None:
            for name in ("p1", "p2", "p3"):
                text = text.replace(f"{{fake:{name}}}", upstream.base_url(name))
        config_path = tmp_path / "api.yaml"
        config_path.write_text(text)
        app = create_app(config_path, tmp_path / "data" / "tollgate.db", **app_kwargs)
        server = ServerThread(app).start()
        started.append(server)
        return RunningGateway(server, config_path)

    yield start
    for server in started:
        server.stop()


# A served model nothing prices does not load (fail-closed pricing). Tests about something
# else serve their echo and made-up models free, and say so with this preferences section.
FREE = "preferences:\n  model_price: {default: 0}\n"


def keys_yaml(user_models: str | None = None) -> str:
    """The api_keys section most tests share: one admin and one user key."""
    allow = f"\n    model: {user_models}" if user_models else ""
    return f"""
api_keys:
  - api: {ADMIN_KEY}
    role: admin
    name: ops
  - api: {USER_KEY}
    name: alice{allow}
"""


def clear_of_window_edge(seconds: int, margin: float = 20) -> None:
    """Wait out the end of the current fixed window when it is near: a burst must fall in one."""
    left = seconds - time.time() % seconds
    if left < margin:
        time.sleep(left + 0.5)
