"""Provider adapters by engine name."""

from __future__ import annotations

from core.providers.anthropic import AnthropicAdapter
from core.providers.base import Adapter
from core.providers.echo import EchoAdapter
from core.providers.gemini import GeminiAdapter
from core.providers.openai import AzureAdapter, OpenAIAdapter
from core.providers.responses_native import NativeResponsesAdapter
from core.providers.responses_translate import TranslatedResponsesAdapter

ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "azure": AzureAdapter(),
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "echo": EchoAdapter(),
}


def adapter_for(engine: str) -> Adapter:
    return ADAPTERS[engine]


def messages_adapter_for(engine: str) -> Adapter:
    """The `/v1/messages` path: native for Anthropic providers, translated for the rest."""
    from core.providers.messages import MessagesAdapter

    return MessagesAdapter(ADAPTERS[engine], native=engine == "anthropic")


# Engines that speak OpenAI's Responses API natively (the request passes through untouched).
NATIVE_RESPONSES_ENGINES = frozenset({"openai", "azure", "echo"})


_NATIVE_RESPONSES = NativeResponsesAdapter()
# Every other engine serves /v1/responses through its chat adapter, translated both ways.
_TRANSLATED_RESPONSES = {engine: TranslatedResponsesAdapter(adapter) for engine, adapter in ADAPTERS.items()}


def responses_adapter_for(engine: str) -> Adapter:
    """The `/v1/responses` path: native for OpenAI-style providers, translated for the rest."""
    if engine == "echo":
        return ADAPTERS[engine]  # answers the Responses API itself
    if engine in NATIVE_RESPONSES_ENGINES:
        return _NATIVE_RESPONSES
    return _TRANSLATED_RESPONSES[engine]
