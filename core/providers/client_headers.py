"""The client headers a vendor needs to see, passed on to the providers of its engine.

Coding agents steer vendors with headers as well as bodies. Claude Code names, per request,
the Anthropic betas its body relies on (`anthropic-beta: claude-code-…,context-management-…`):
Anthropic refuses a beta-only field (`context_management`) sent without its beta, so a
gateway that drops the header breaks the agent. Codex CLI sends OpenAI's internal flags
(`x-openai-internal-codex-responses-lite`). Such headers are read once per request from the
ASGI scope and passed on only to the engines that understand them: Anthropic's betas to
Anthropic providers, OpenAI's to OpenAI and Azure ones. Everything else a client sends stays
at the gateway (its key, cookies, tracing are the gateway's business, never a vendor's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ANTHROPIC_BETA = "anthropic-beta"
OPENAI_BETA = "openai-beta"
_EXACT = frozenset({ANTHROPIC_BETA.encode(), OPENAI_BETA.encode()})
_OPENAI_PREFIX = b"x-openai-"
_PREFIX_LENGTH = len(_OPENAI_PREFIX)
OPENAI_ENGINES = frozenset({"openai", "azure"})


def forwarded_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """The forwardable headers among an ASGI scope's (names come lowercased); None when there
    are none, which is every ordinary client's request (a pass over its headers, ~1 µs). A repeated header is one
    comma-separated list, as HTTP defines repeats."""
    found: dict[str, str] | None = None
    for name, value in raw:
        if name in _EXACT or name[:_PREFIX_LENGTH] == _OPENAI_PREFIX:  # (a slice: half a startswith call's cost)
            if found is None:
                found = {}
            text, key = value.decode("latin-1"), name.decode()
            found[key] = f"{found[key]},{text}" if key in found else text
    return found


def merged_betas(*lists: str | None) -> str | None:
    """Comma-separated beta names, each once, in first-seen order (the provider's own first)."""
    names: dict[str, None] = {}
    for listed in lists:
        for name in (listed or "").split(","):
            if name.strip():
                names.setdefault(name.strip(), None)
    return ",".join(names) or None


def with_anthropic_betas(headers: dict[str, str], forwarded: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` (the provider's, configured under any capitalisation) with the client's
    `anthropic-beta` merged into the provider's own list."""
    client = forwarded.get(ANTHROPIC_BETA) if forwarded else None
    if not client:
        return headers
    configured = [name for name in headers if name.lower() == ANTHROPIC_BETA]
    merged = merged_betas(*(headers[name] for name in configured), client)
    out = {name: value for name, value in headers.items() if name not in configured}
    if merged:
        out[ANTHROPIC_BETA] = merged
    return out


def openai_headers(forwarded: Mapping[str, str] | None) -> dict[str, str]:
    """The client's OpenAI headers (`openai-beta`, `x-openai-*`) to pass to an OpenAI-engine provider."""
    if not forwarded:
        return {}
    return {name: value for name, value in forwarded.items() if name != ANTHROPIC_BETA}
