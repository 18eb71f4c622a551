"""uni-api's api.yaml words Tollgate reads but does not act on: one table, by place.

Tollgate follows uni-api's api.yaml, so a uni-api user's file must load: the options uni-api
documents (its README and the code that reads them, uni-api 7abb50a) that Tollgate does not
implement load with one warning each, located. Anything else unknown stays an error with a
"did you mean", so a misspelling of Tollgate's own options is never silently ignored. An
option Tollgate implements under the same name is read as Tollgate's (the known list is
checked first), so this table never shadows one.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.config.reader import Section

# Places, as `read_options` names them.
TOP, PROVIDER, PROVIDER_PREFERENCES, KEY, KEY_PREFERENCES, PREFERENCES = (
    "top", "provider", "provider.preferences", "api_key", "api_key.preferences", "preferences",
)  # fmt: skip

NOT_SUPPORTED: dict[str, frozenset[str]] = {
    TOP: frozenset({"video_providers"}),
    PROVIDER: frozenset({
        "tools", "notes", "image", "exclude_endpoints", "exclude_request_types", "only_request_types", "exclude_request_rules",
        "project_id", "region", "private_key", "client_email", "cf_account_id", "aws_access_key", "aws_secret_key",
    }),
    PROVIDER_PREFERENCES: frozenset({
        "api_key_rate_limit", "api_key_cooldown_period", "api_key_schedule_algorithm", "api_key_quota_cooldown_period",
        "keepalive_interval", "cooldown_period", "max_request_body_bytes", "exclude_endpoints", "timeout_policy",
        "passthrough_request_headers", "search_defaults", "responses_stream_commit_policy", "access_key", "secret_key",
    }),
    KEY: frozenset({"weights"}),
    KEY_PREFERENCES: frozenset({"ENABLE_MODERATION"}),
    PREFERENCES: frozenset({"rate_limit", "keepalive_interval", "error_triggers"}),
}  # fmt: skip

# uni-api's own engine names for the formats Tollgate speaks. `openrouter` is uni-api's
# OpenAI-format engine (it even picks it itself for OpenAI-style URLs whose model names are
# not gpt/claude/gemini...): the same chat/completions body, so it is served as openai.
ENGINE_ALIASES = {"gpt": "openai", "openrouter": "openai", "claude": "anthropic"}
# uni-api's engines whose wire format or auth Tollgate lacks (Vertex's service accounts,
# Bedrock's signatures, Databricks' serving endpoints, Cloudflare's and Cohere's APIs, Codex's
# OAuth, Volcengine's translation): such a provider loads, with a warning, and serves nothing.
ENGINES_NOT_SUPPORTED = frozenset(
    {"vertex", "vertex-claude", "vertex-gemini", "vertex-express", "aws", "azure-databricks", "cloudflare", "cohere", "codex", "doubao-translation"}
)


def ignored(option: str) -> str:
    """The one wording of every such warning."""
    return f"uni-api option '{option}' is not supported and is ignored"


def read_options(section: Section, known: Iterable[str], place: str, *, warn: bool = True) -> None:
    """Refuse unknown keys as `Section.reject_unknown` does, except uni-api's options of this
    place, which are warned about (or, with `warn=False`, passed over: their provider is
    already warned about as a whole)."""
    known = tuple(known)
    not_supported = NOT_SUPPORTED[place]
    for key in section.node:
        if key not in known and key in not_supported and warn:
            section.warn(key, ignored(str(key)))
    section.reject_unknown(known, also_allowed=not_supported)
