"""Provider adapters by engine name."""

from __future__ import annotations

from core.providers.anthropic import AnthropicAdapter
from core.providers.base import Adapter
from core.providers.echo import EchoAdapter
from core.providers.gemini import GeminiAdapter
from core.providers.openai import AzureAdapter, OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "azure": AzureAdapter(),
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "echo": EchoAdapter(),
}


def adapter_for(engine: str) -> Adapter:
    return ADAPTERS[engine]
