"""api.yaml parsed into immutable, typed objects, built once per load.

The request path never touches YAML: everything it needs (model → routes, key index,
timeouts) is derived here. A `Config` is swapped atomically on reload.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

from core.body_overrides import BodyOverrides, read_body_overrides
from core.config.billing import (
    BILLING_MODES,
    DEFAULT_MAX_RESERVE_COMPLETION_TOKENS,
    DEFAULT_RESERVE_COMPLETION_TOKENS,
    KeyBilling,
    read_key_billing,
    read_multiplier,
    read_price_book,
    read_reserve_cap,
    read_vendor_terms,
)
from core.config.discovery import DEFAULT_TIMEOUT as DEFAULT_DISCOVERY_TIMEOUT
from core.config.discovery import Discovery
from core.config.limits import LIMIT_KEYS, AlertSettings, IPNetwork, KeyLimits, read_alerts, read_key_limits, read_networks, read_timezone
from core.config.reader import Section, collecting_warnings, items_of
from core.config.uniapi import (
    ENGINE_ALIASES,
    ENGINES_NOT_SUPPORTED,
    KEY,
    KEY_PREFERENCES,
    PREFERENCES,
    PROVIDER,
    PROVIDER_PREFERENCES,
    TOP,
    ignored,
    read_options,
)
from core.config.yamlsource import ConfigError, ConfigWarning, error_at, expand_env, line_of, parse_yaml
from core.cooperate import cooperate
from core.keys.index import KeyIndex, digest_of, mask_key
from core.lookup import PrefixTable
from core.pricing.book import PriceBook, build_price_book, with_routes, with_vendor_prices
from core.pricing.vendor import NO_TERMS, VendorTerms

ENGINES = ("openai", "azure", "anthropic", "gemini", "echo")
SCHEDULING_ALGORITHMS = ("fixed_priority", "round_robin", "weighted_round_robin", "lottery", "random")
# uni-api's names Tollgate reads as one of its own: smart_round_robin also orders a provider's
# upstream keys by their success rate, which Tollgate does not (it rotates them).
SCHEDULING_ALIASES = {"smart_round_robin": "weighted_round_robin"}
DEFAULT_TIMEOUT = Decimal(100)

# Every setting api.yaml accepts, by place; a test checks that api.yaml.example documents each.
TOP_LEVEL_KEYS = ("providers", "accounts", "api_keys", "preferences")
PROVIDER_KEYS = ("provider", "base_url", "api", "engine", "model", "preferences")
PROVIDER_PREFERENCE_KEYS = (
    "model_timeout",
    "headers",
    "weight",
    "api_version",
    "default_max_tokens",
    "price_multiplier",
    "post_body_parameter_overrides",
    "proxy",
    "cost_price",
    "cost_multiplier",
    "monthly_budget",
    "budget_action",
    "max_connections",
    "max_connections_wait",
)
KEY_KEYS = ("api", "id", "name", "role", "account", "model", "preferences")
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # safe in a URL path, a CSV cell and a log line
ACCOUNT_KEYS = ("name", "preferences")
ACCOUNT_PREFERENCE_KEYS = (
    "billing_mode", "credits", "count_credits", "created_at", "rate_limit", "token_rate_limit", "concurrency_limit",
    "daily_cost_limit", "weekly_cost_limit", "monthly_cost_limit", "budget", "budget_period", "timezone", "alerts", "self_service_keys",
    "price_multiplier",
)  # fmt: skip
ACCOUNT_ID_PREFIX = "account:"  # an account's ledger id: `account:acme` (no key id has a ':')
ACCOUNT = "account"  # the role of the stand-in key an account is billed and limited as
FILE, API = "api.yaml", "api"  # where a key is defined: the operator's file, or the keys API
KEY_PREFERENCE_KEYS = (
    "billing_mode", "credits", "count_credits", "created_at", "price_multiplier", "max_reserve_completion_tokens", *LIMIT_KEYS,
    "AUTO_RETRY", "SCHEDULING_ALGORITHM",
)  # fmt: skip
PREFERENCE_KEYS = (
    "SCHEDULING_ALGORITHM", "AUTO_RETRY", "cooldown_period", "model_timeout", "max_request_body_bytes", "model_price", "count_billing",
    "reserve_completion_tokens", "max_reserve_completion_tokens", "timezone", "trusted_proxies", "alerts", "max_response_body_bytes", "auth_failure_limit",
    "price_catalog", "price_multiplier", "model_discovery_timeout", "proxy", "metrics",
)  # fmt: skip
METRICS_KEYS = ("public", "per_key")
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BODY = 100 * 1024 * 1024  # an upstream answer (or stream) past this is cut off: 502
DEFAULT_AUTH_FAILURE_LIMIT = 30
DEFAULT_MAX_CONNECTIONS_WAIT = 10.0  # seconds a request waits for a slot of a provider at its max_connections


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """An http(s) proxy: its URL without credentials, which go in a Proxy-Authorization
    header: to the proxy's CONNECT for an https vendor (never through the tunnel), with the
    request itself for a plain http one (aiohttp sends `proxy_headers` only on a CONNECT)."""

    url: str
    connect_headers: dict[str, str] | None = field(default=None, repr=False)
    request_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def for_vendor(self, base_url: str) -> UpstreamProxy:
        auth = self.connect_headers or self.request_headers or None
        if base_url.startswith("https://"):
            return UpstreamProxy(self.url, auth)
        return UpstreamProxy(self.url, None, auth or {})


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    engine: str
    base_url: str
    upstream_keys: tuple[str, ...] = field(repr=False)
    headers: dict[str, str]
    weight: int
    api_version: str | None = None  # Azure's api-version, Anthropic's anthropic-version
    default_max_tokens: int = 4096  # Anthropic requires max_tokens; used when the client sends none
    price_multiplier: Decimal = Decimal(1)  # this provider's prices x this (x the global multiplier)
    body_overrides: BodyOverrides | None = None  # post_body_parameter_overrides (core/body_overrides.py)
    proxy: UpstreamProxy | None = field(default=None, repr=False)  # `proxy`: what this provider is reached through
    vendor: VendorTerms = NO_TERMS  # what the vendor charges the operator, and its monthly budget
    # Calls in flight to this provider at once, at most (core/upstream_gate.py); None: no limit.
    max_connections: int | None = None
    max_connections_wait: float = DEFAULT_MAX_CONNECTIONS_WAIT  # then 503 upstream_busy (or the next route)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One way to serve a public model name: this provider, under this upstream name."""

    provider: Provider
    public_name: str
    upstream_name: str
    timeout: float
    discovered: bool = False  # listed by the upstream's /models (the provider has no `model:`), not by the operator

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.public_name}"


@dataclass(frozen=True, slots=True)
class ModelAccess:
    """A key's allow-list, compiled: `*`, `provider/*`, `provider/model` or a public model name."""

    everything: bool = True
    providers: frozenset[str] = frozenset()
    provider_models: frozenset[tuple[str, str]] = frozenset()
    models: frozenset[str] = frozenset()

    def allows(self, route: ModelRoute) -> bool:
        return (
            self.everything
            or route.public_name in self.models
            or route.provider.name in self.providers
            or (route.provider.name, route.public_name) in self.provider_models
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    # The secret as api.yaml writes it, while that is what authenticates the key; None for keys
    # made through the API and api.yaml keys rotated through it (only `digest` is known then).
    secret: str | None = field(repr=False)
    id: str  # the ledger's name for the key: `id:` in api.yaml, else a hash of the secret, or generated by the API
    name: str
    role: str
    access: ModelAccess
    billing: KeyBilling = field(default_factory=KeyBilling)
    limits: KeyLimits = field(default_factory=KeyLimits)
    line: int | None = None
    digest: bytes = field(default=b"", repr=False)  # sha256 of the current secret: what the key index matches
    masked: str = "…"  # the secret's ends, for humans (core.keys.mask_key)
    defined_in: str = FILE  # FILE or API
    # The key's entry as written (api.yaml's mapping without `api`, or what the API stored): the
    # base an API edit merges into, and what the keys API shows as the key's settings.
    entry: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    previous_digest: bytes | None = field(default=None, repr=False)  # a rotated-away secret, valid until:
    previous_until: float = 0.0
    account: ApiKey | None = field(default=None, repr=False, compare=False)  # its account's stand-in key
    self_service_keys: bool = False  # an account's stand-in: the account's keys may make and revoke keys in it
    auto_retry: bool | int = True  # its AUTO_RETRY, else the global one (see read_auto_retry)
    scheduling_algorithm: str = "fixed_priority"  # its SCHEDULING_ALGORITHM, else the global one
    # Its max_reserve_completion_tokens, else the global one (0: no cap), resolved at load.
    max_reserve_completion_tokens: int = DEFAULT_MAX_RESERVE_COMPLETION_TOKENS

    def __post_init__(self) -> None:
        if not self.digest and self.secret is not None:
            object.__setattr__(self, "digest", digest_of(self.secret))
            object.__setattr__(self, "masked", mask_key(self.secret))

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """`preferences.metrics`: who may scrape GET /metrics, and whether per-key series exist."""

    public: bool = False  # no admin key needed: for a scraper on a private network
    per_key: bool = False  # tollgate_key_* series labelled with key names (one series per key)


@dataclass(frozen=True, slots=True)
class Preferences:
    scheduling_algorithm: str = "fixed_priority"
    auto_retry: bool | int = True  # see read_auto_retry
    cooldown_period: float = 60.0
    max_request_body_bytes: int = DEFAULT_MAX_BODY
    prices: PriceBook = field(default_factory=lambda: build_price_book({}, {}, Decimal(0), True))
    reserve_completion_tokens: int = DEFAULT_RESERVE_COMPLETION_TOKENS
    max_reserve_completion_tokens: int = DEFAULT_MAX_RESERVE_COMPLETION_TOKENS  # 0: no cap
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    trusted_proxies: tuple[IPNetwork, ...] = ()
    alerts: AlertSettings = field(default_factory=AlertSettings)
    max_response_body_bytes: int = DEFAULT_MAX_RESPONSE_BODY
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT  # per client address per minute; 0: off
    model_discovery_timeout: float = DEFAULT_DISCOVERY_TIMEOUT  # seconds for all providers without `model:`
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    source_hash: str
    loaded_at: float
    providers: tuple[Provider, ...]
    keys: tuple[ApiKey, ...]
    key_index: KeyIndex[ApiKey]
    keys_by_id: dict[str, ApiKey]  # by ledger id: how pages and sessions name a key
    routes: dict[str, tuple[ModelRoute, ...]]
    public_models: tuple[str, ...]
    preferences: Preferences
    # Accounts by name, each as a stand-in key (role ACCOUNT, id `account:NAME`, never in the
    # key index): its balance is shared by its keys, and its limits apply to them together.
    accounts: dict[str, ApiKey] = field(default_factory=dict)
    # Filled in when records stored through the keys API are applied (core/keys/records.py):
    deleted_keys: dict[str, ApiKey] = field(default_factory=dict)  # by id; their history stays readable
    key_problems: dict[str, str] = field(default_factory=dict)  # key id (or account id) → why its stored change is not in force
    deleted_accounts: dict[str, ApiKey] = field(default_factory=dict)  # by name; their keys' history stays readable
    warnings: tuple[ConfigWarning, ...] = ()  # what loads but is not done as written (Section.warn)
    # `provider/model` labels that a model literally named so (on another provider) holds in
    # `routes`: a key not allowed that model but allowed the label's route is served by it.
    shadowed_labels: dict[str, ModelRoute] = field(default_factory=dict)
    unserved: dict[str, frozenset[str] | None] = field(default_factory=dict)  # see Unserved
    budgeted: frozenset[str] = frozenset()  # providers with a `monthly_budget` (core/vendors)


def load_config(path: str | Path, previous: Config | None = None) -> Config:
    """Read, validate and build the config at `path`; raises ConfigError with file and line.
    `previous`: the config this one replaces, whose discovered models a failed discovery keeps."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "config file not found (start from: cp api.yaml.example api.yaml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read config file: {exc}") from None
    return build_config(text, str(path), hashlib.sha256(raw).hexdigest(), previous)


def build_config(text: str, file: str, source_hash: str | None = None, previous: Config | None = None) -> Config:
    """Build from the fast, position-less parse; on an error or a warning, build again from
    a parse that knows line numbers, so the message can say where (asking no upstream twice)."""
    discovery = Discovery(previous)
    try:
        try:
            with collecting_warnings() as warnings:
                config = _build(parse_yaml(text, file, located=False), text, file, source_hash, discovery)
            if not warnings or all(warning.line is not None for warning in warnings):
                return replace(config, warnings=tuple(warnings))
        except ConfigError as fast_error:
            if fast_error.line is not None and all(warning.line is not None for warning in warnings):
                fast_error.warnings = tuple(warnings)
                raise
        with collecting_warnings() as warnings:  # again, with positions for the message
            try:
                config = _build(parse_yaml(text, file), text, file, source_hash, discovery)
            except ConfigError as error:
                error.warnings = tuple(warnings)
                raise
        return replace(config, warnings=tuple(warnings))
    except RecursionError:  # lists or mappings nested thousands deep: refused, not a crash of the reloader
        raise ConfigError(file, None, "YAML error: nested too deeply") from None


def _build(tree: Any, text: str, file: str, source_hash: str | None, discovery: Discovery) -> Config:
    expand_env(tree, file)
    top = Section(tree, file, "")
    read_options(top, TOP_LEVEL_KEYS, TOP)
    preferences, global_timeouts = _read_preferences(top.section("preferences"))
    unpriced: list[ConfigError] = []  # raised once the rest has loaded
    providers, routes_by_provider, unserved = _read_providers(
        top, global_timeouts, discovery, preferences.model_discovery_timeout, preferences.prices, unpriced, read_proxy(top.section("preferences"), None)
    )
    route_prices = _price_routes(routes_by_provider)
    priced = with_routes(preferences.prices, route_prices)
    priced = with_vendor_prices(priced, {p.name: (p.vendor, p.engine) for p in providers}, [route[:4] for route in route_prices])
    preferences = replace(preferences, prices=priced)
    routes, shadowed = _index_routes(routes_by_provider)
    accounts = _read_accounts(top, preferences)
    keys = _read_keys(top, {p.name: p for p in providers}, routes, preferences, accounts, unserved)
    if unpriced:
        raise unpriced[0]
    return Config(
        source=file,
        source_hash=source_hash or hashlib.sha256(text.encode()).hexdigest(),
        loaded_at=time.time(),
        providers=tuple(providers),
        keys=tuple(keys),
        key_index=KeyIndex(keys),
        keys_by_id={key.id: key for key in keys},
        routes=routes,
        public_models=tuple(dict.fromkeys(r.public_name for rs in routes_by_provider for r in rs)),
        preferences=preferences,
        accounts=accounts,
        shadowed_labels=shadowed,
        unserved=unserved,
        budgeted=frozenset(p.name for p in providers if p.vendor.monthly_budget_nanos is not None),
    )


def _read_accounts(top: Section, preferences: Preferences) -> dict[str, ApiKey]:
    """`accounts:`: balances and limits shared by the keys that name them (`account: acme`)."""
    accounts: dict[str, ApiKey] = {}
    for index, node in items_of(top, "accounts"):
        section = Section(node, top.file, f"accounts[{index}]", top.node["accounts"], index)
        account = read_account(section, preferences, line_of(top.node["accounts"], index))
        if account.name in accounts:
            raise section.error("name", f"duplicate account name '{account.name}'")
        accounts[account.name] = account
    return accounts


def read_account(section: Section, preferences: Preferences, line: int | None = None) -> ApiKey:
    """One account entry, validated: api.yaml's and the accounts API's share this (the same
    mistake, the same message). The account is a stand-in key its keys draw on."""
    section.reject_unknown(ACCOUNT_KEYS)
    name = section.string("name")
    if not KEY_ID.fullmatch(name):
        raise section.error("name", f"{section.where('name')} must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got '{name}'")
    prefs = section.section("preferences")
    prefs.reject_unknown(ACCOUNT_PREFERENCE_KEYS)
    return ApiKey(
        secret=None,
        id=ACCOUNT_ID_PREFIX + name,
        name=name,
        role=ACCOUNT,
        access=ModelAccess(),
        billing=read_key_billing(prefs),
        limits=read_key_limits(prefs, preferences.timezone, preferences.alerts),
        line=line,
        entry={name: value for name, value in section.node.items()},
        self_service_keys=prefs.boolean("self_service_keys", False),
    )


def _read_preferences(section: Section) -> tuple[Preferences, dict[str, Decimal]]:
    read_options(section, PREFERENCE_KEYS, PREFERENCES)
    prefs = Preferences(
        scheduling_algorithm=read_scheduling_algorithm(section, "fixed_priority"),
        auto_retry=read_auto_retry(section, True),
        cooldown_period=float(section.number("cooldown_period", 60)),
        max_request_body_bytes=section.integer("max_request_body_bytes", DEFAULT_MAX_BODY, minimum=1),
        prices=read_price_book(section),
        reserve_completion_tokens=section.integer("reserve_completion_tokens", DEFAULT_RESERVE_COMPLETION_TOKENS),
        max_reserve_completion_tokens=read_reserve_cap(section, DEFAULT_MAX_RESERVE_COMPLETION_TOKENS),
        timezone=read_timezone(section, "timezone"),
        trusted_proxies=read_networks(section, "trusted_proxies"),
        max_response_body_bytes=section.integer("max_response_body_bytes", DEFAULT_MAX_RESPONSE_BODY, minimum=1),
        auth_failure_limit=section.integer("auth_failure_limit", DEFAULT_AUTH_FAILURE_LIMIT, minimum=0),
        alerts=read_alerts(section, "alerts"),
        model_discovery_timeout=float(section.number("model_discovery_timeout", DEFAULT_DISCOVERY_TIMEOUT, minimum=0, allow_equal=False)),
        metrics=read_metrics_settings(section),
    )
    return prefs, _read_timeouts(section)


def read_metrics_settings(preferences: Section) -> MetricsSettings:
    if not preferences.has("metrics"):
        return MetricsSettings()
    section = preferences.section("metrics")
    section.reject_unknown(METRICS_KEYS)
    return MetricsSettings(public=section.boolean("public", False), per_key=section.boolean("per_key", False))


def read_auto_retry(section: Section, default: bool | int) -> bool | int:
    """`AUTO_RETRY` as uni-api writes it: true (every route serving the model, in order), false
    (the first only), or a number N of retries after the first attempt (at most N + 1 routes)."""
    raw = section.raw("AUTO_RETRY")
    if raw is None:
        return default
    if isinstance(raw, bool) or (isinstance(raw, str) and not raw.strip().isdigit()):
        try:
            return section.boolean("AUTO_RETRY")
        except ConfigError:
            raise section.error("AUTO_RETRY", f"{section.where('AUTO_RETRY')} must be true, false or a number of retries, got '{raw}'") from None
    return section.integer("AUTO_RETRY", minimum=0)


def read_scheduling_algorithm(section: Section, default: str) -> str:
    """`SCHEDULING_ALGORITHM`: one of SCHEDULING_ALGORITHMS, or a uni-api name read as one (warned)."""
    if not section.has("SCHEDULING_ALGORITHM"):
        return default
    name = section.string("SCHEDULING_ALGORITHM")
    if name in SCHEDULING_ALIASES:
        section.warn(
            "SCHEDULING_ALGORITHM", f"uni-api's '{name}' is read as {SCHEDULING_ALIASES[name]} (upstream keys are rotated, not ordered by success rate)"
        )
        return SCHEDULING_ALIASES[name]
    return section.choice("SCHEDULING_ALGORITHM", SCHEDULING_ALGORITHMS)


def attempts_allowed(auto_retry: bool | int, routes: int) -> int:
    """How many of `routes` candidate routes a request may try under `auto_retry`."""
    return routes if auto_retry is True else min(routes, int(auto_retry) + 1)


def _read_timeouts(section: Section) -> dict[str, Decimal]:
    if not section.has("model_timeout"):
        return {}
    raw = section.raw("model_timeout")
    if not isinstance(raw, dict):
        return {"default": section.number("model_timeout", minimum=0, allow_equal=False)}
    table = section.section("model_timeout")
    return {str(name): table.number(name, minimum=0, allow_equal=False) for name in table.node}


def _infer_engine(base_url: str) -> str:
    """The engine a base_url implies, as uni-api infers it (its core/utils.py get_engine): by
    host, and by path for self-hosted APIs (`…/v1/messages`: Anthropic's; `…/v1beta`: Gemini's)."""
    parts = urlsplit(base_url.lower())
    host, path = parts.hostname or "", parts.path.rstrip("/")
    if host.endswith("volces.com") and path.endswith("/api/v3/responses"):
        return "doubao-translation"
    if path.endswith("/v1beta") or (host == "generativelanguage.googleapis.com" and "/v1beta/openai" not in path):
        return "gemini"
    if host.endswith("aiplatform.googleapis.com"):
        return "vertex"
    if host.endswith("openai.azure.com"):
        return "azure"
    if host.endswith("azuredatabricks.net"):
        return "azure-databricks"
    if host == "api.cloudflare.com":
        return "cloudflare"
    if host.endswith("anthropic.com") or path.endswith("/v1/messages"):
        return "anthropic"
    if host.endswith("amazonaws.com"):
        return "aws"
    if host == "api.cohere.com":
        return "cohere"
    return "openai"


# Where a provider serves nothing, and why nobody is warned twice: provider name → None (the
# whole provider: an engine Tollgate lacks) or the model names it does not serve.
Unserved = dict[str, frozenset[str] | None]
# uni-api's model of its /v1/search endpoint, which Tollgate does not have.
SEARCH_MODEL = "search"


def _read_providers(
    top: Section,
    global_timeouts: dict[str, Decimal],
    discovery: Discovery,
    discovery_timeout: float,
    prices: PriceBook,
    unpriced: list[ConfigError],
    global_proxy: UpstreamProxy | None = None,
) -> tuple[list[Provider], list[list[ModelRoute]], Unserved]:
    providers: list[Provider] = []
    all_routes: list[list[ModelRoute]] = []
    unserved: Unserved = {}
    to_discover: list[tuple[int, Section, Provider, PrefixTable[Decimal]]] = []
    seen: set[str] = set()
    items = items_of(top, "providers")
    if not items:
        raise top.error("providers", "providers must list at least one provider")
    for index, node in items:
        section = Section(node, top.file, f"providers[{index}]", top.node["providers"], index)
        name = section.string("provider")
        if name in seen:
            raise section.error("provider", f"duplicate provider name '{name}'")
        seen.add(name)
        engine = _read_engine(section)
        if engine in ENGINES_NOT_SUPPORTED:
            read_options(section, PROVIDER_KEYS, PROVIDER, warn=False)
            at = "engine" if section.has("engine") else "base_url" if section.has("base_url") else "provider"
            section.warn(at, f"uni-api engine '{engine}' is not supported: provider '{name}' loads but serves nothing")
            unserved[name] = None
            continue
        read_options(section, PROVIDER_KEYS, PROVIDER)
        base_url = _read_base_url(section, engine)
        prefs = section.section("preferences")
        read_options(prefs, PROVIDER_PREFERENCE_KEYS, PROVIDER_PREFERENCES)
        proxy = read_proxy(prefs, global_proxy)
        max_connections, max_connections_wait = read_connection_limit(prefs)
        provider = Provider(
            name=name,
            engine=engine,
            base_url=base_url,
            upstream_keys=_read_upstream_keys(section, engine),
            headers=_read_headers(prefs),
            weight=prefs.integer("weight", 1, minimum=1),
            api_version=prefs.string("api_version") if prefs.has("api_version") else None,
            default_max_tokens=prefs.integer("default_max_tokens", 4096, minimum=1),
            price_multiplier=read_multiplier(prefs),
            proxy=proxy.for_vendor(base_url) if proxy is not None else None,
            vendor=read_vendor_terms(prefs),
            max_connections=max_connections,
            max_connections_wait=max_connections_wait,
        )
        timeouts = PrefixTable({**global_timeouts, **_read_timeouts(prefs)})
        if items_of(section, "model"):
            routes, dropped = _read_models(section, provider, timeouts)
            provider, routes = _with_body_overrides(prefs, provider, routes)
            problem = _unpriced(section, routes, prices)
            if problem is not None:
                unpriced.append(problem)
            all_routes.append(routes)
            if dropped:
                unserved[name] = dropped
        else:
            _check_discoverable(section, engine)
            to_discover.append((len(all_routes), section, provider, timeouts))
            all_routes.append([])
        providers.append(provider)
    _discover_models(to_discover, all_routes, discovery, discovery_timeout, prices)
    for slot, section, _, _ in to_discover:  # per-model overrides name models known only now
        providers[slot], all_routes[slot] = _with_body_overrides(section.section("preferences"), providers[slot], all_routes[slot])
    return providers, all_routes, unserved


def _check_discoverable(section: Section, engine: str) -> None:
    """A provider without `model:` lists its upstream's models, except where no list says what to call."""
    if engine == "azure":
        reason = "Azure serves deployments, which its model list does not name: list them (`model: [my-deployment]`)"
        raise section.error("provider", f"{section.where('model')} is required for an Azure provider: {reason}")
    if engine == "echo":
        raise section.error("provider", f"{section.where('model')} must list at least one model")


def _discover_models(
    pending: list[tuple[int, Section, Provider, PrefixTable[Decimal]]],
    all_routes: list[list[ModelRoute]],
    discovery: Discovery,
    timeout: float,
    prices: PriceBook,
) -> None:
    """Fill in the routes of the providers without `model:` from their upstreams (asked at once),
    public name = upstream name; a failure is a warning at the provider, never an error. A
    discovered model nothing prices is not served (one warning lists them): fail closed,
    without refusing a config for what an upstream happens to list."""
    if not pending:
        return
    outcomes = discovery.models([provider for _, _, provider, _ in pending], timeout)
    for (slot, section, provider, timeouts), outcome in zip(pending, outcomes, strict=True):
        if outcome.problem is not None:
            section.warn("provider", f"provider '{provider.name}': {outcome.problem}")
        priced: list[str] = []
        unpriced: list[str] = []
        for name in outcome.models:
            (priced if prices.resolve_route(provider.engine, name, name).price is not None else unpriced).append(name)
        if unpriced:
            shown = ", ".join(unpriced[:20]) + (f" and {len(unpriced) - 20} more" if len(unpriced) > 20 else "")
            section.warn(
                "provider",
                f"provider '{provider.name}': {len(unpriced)} discovered model(s) have no price and are not served: {shown} "
                "(add model_price entries or a default)",
            )
        all_routes[slot] = [ModelRoute(provider, name, name, float(timeouts.get(name) or DEFAULT_TIMEOUT), discovered=True) for name in priced]


def read_connection_limit(prefs: Section) -> tuple[int | None, float]:
    """`max_connections` (a whole number >= 1; absent: no limit) and `max_connections_wait`
    (seconds >= 0). A wait without a limit is a warning: it would otherwise look in force."""
    limit = prefs.integer("max_connections", minimum=1) if prefs.has("max_connections") else None
    wait = float(prefs.number("max_connections_wait", DEFAULT_MAX_CONNECTIONS_WAIT, minimum=0))
    if limit is None and prefs.has("max_connections_wait"):
        prefs.warn("max_connections_wait", f"{prefs.where('max_connections_wait')} has no effect without max_connections (no limit, nobody waits)")
    return limit, wait


def read_proxy(prefs: Section, default: UpstreamProxy | None) -> UpstreamProxy | None:
    """`proxy` (uni-api's): an http:// or https:// proxy's URL and credentials, else `default`
    (a provider's: the global one). A socks5 proxy needs a library Tollgate lacks: a warning,
    as if unset. Messages never quote the URL, which may hold a password."""
    if not prefs.has("proxy"):
        return default
    raw = prefs.string("proxy")
    if raw.strip().lower().startswith("socks"):  # before parsing: uni-api's example, socks5://[username]:[password]@[ip]:[port], is no URL
        prefs.warn("proxy", "socks5 proxies are not supported (http:// and https:// are) and are ignored")
        return default
    try:
        url = urlsplit(raw)
        port = url.port
    except ValueError:
        url, port = None, None
    scheme = url.scheme.lower() if url is not None else ""
    if url is None or scheme not in ("http", "https") or not url.hostname:
        raise prefs.error("proxy", f"{prefs.where('proxy')} must be a proxy URL like http://host:port (http:// or https://)")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    headers = None
    if url.username:
        credentials = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        headers = {"Proxy-Authorization": f"Basic {base64.b64encode(credentials).decode()}"}
    return UpstreamProxy(f"{scheme}://{host}{f':{port}' if port else ''}", headers)


def _with_body_overrides(prefs: Section, provider: Provider, routes: list[ModelRoute]) -> tuple[Provider, list[ModelRoute]]:
    """The provider with its post_body_parameter_overrides (their per-model entries are named
    by its public model names, known once its models are read), and its routes pointing at it."""
    overrides = read_body_overrides(prefs, (route.public_name for route in routes))
    if overrides is None:
        return provider, routes
    provider = replace(provider, body_overrides=overrides)
    return provider, [replace(route, provider=provider) for route in routes]


def _read_engine(section: Section) -> str:
    """Tollgate's engine for the provider, uni-api's engine names read as the same formats
    (`gpt`, `openrouter`: openai; `claude`: anthropic); an engine only uni-api has is returned
    as is, for the caller to warn about."""
    if section.has("engine"):
        engine = section.string("engine")
        engine = ENGINE_ALIASES.get(engine, engine)
        if engine not in ENGINES and engine not in ENGINES_NOT_SUPPORTED:
            aliases = ", ".join(ENGINE_ALIASES)
            raise section.error("engine", f"{section.where('engine')} must be one of {', '.join(ENGINES)} (or uni-api's {aliases}); got '{engine}'")
    elif section.has("project_id"):  # uni-api: a Google Cloud service account is Vertex AI
        engine = "vertex"
    elif section.has("cf_account_id"):
        engine = "cloudflare"
    elif section.has("base_url"):
        engine = _infer_engine(section.string("base_url"))
    else:
        raise section.error("provider", f"{section.path} needs a base_url (or engine: echo)")
    return engine


# The endpoint paths a full-endpoint base_url may end with, per engine: what is left is the
# prefix the adapters append their endpoints to. uni-api writes base_url as the endpoint
# (`…/v1/chat/completions`, `…/v1/messages`); Tollgate's own examples write the prefix.
_OPENAI_ENDPOINTS = (
    "/chat/completions", "/completions", "/embeddings", "/responses/compact", "/responses", "/images/generations",
    "/images/edits", "/audio/transcriptions", "/audio/translations", "/audio/speech", "/moderations", "/messages",
)  # fmt: skip
_ENDPOINT_SUFFIXES = {"openai": _OPENAI_ENDPOINTS, "anthropic": ("/messages",)}


def _read_base_url(section: Section, engine: str) -> str:
    if engine == "echo":
        return section.string("base_url", "echo://local")
    url = section.string("base_url")
    if not url.startswith(("http://", "https://")):
        raise section.error("base_url", f"{section.where('base_url')} must start with http:// or https://, got '{url}'")
    return endpoint_prefix(url, engine)


def endpoint_prefix(url: str, engine: str) -> str:
    """The prefix of a base_url given as a prefix or as a full endpoint URL. Gemini's models
    hang below `…/v1beta` (`…/v1beta/models/x:generateContent` is cut at `/models`); Azure's
    deployments below the resource URL (`…/openai/deployments/…` is cut at `/openai`)."""
    url = url.rstrip("/")
    if engine == "gemini":
        head, found, _ = url.partition("/models/")
        return head if found else url.removesuffix("/models")
    if engine == "azure":
        head, found, _ = url.partition("/openai/")
        return head if found else url.removesuffix("/openai")
    for suffix in _ENDPOINT_SUFFIXES.get(engine, ()):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def _read_upstream_keys(section: Section, engine: str) -> tuple[str, ...]:
    raw = section.raw("api")
    if raw is None:
        if engine == "echo":
            return ("",)
        raise section.error("provider", f"{section.where('api')} is required: the upstream API key (or a list of keys)")
    values = raw if isinstance(raw, list) else [raw]
    keys = []
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            holder, at = (raw, index) if isinstance(raw, list) else (section.node, "api")
            raise error_at(section.file, holder, at, f"{section.where('api')} entries must be non-empty strings")
        keys.append(value.strip())
    return tuple(keys)


def _read_headers(prefs: Section) -> dict[str, str]:
    headers = prefs.section("headers")
    return {str(name): headers.string(name) for name in headers.node}


def _price_routes(routes_by_provider: list[list[ModelRoute]]) -> list[tuple[str, str, str, str, Decimal]]:
    return [(r.provider.name, r.provider.engine, r.upstream_name, r.public_name, r.provider.price_multiplier) for rs in routes_by_provider for r in rs]


def _read_models(section: Section, provider: Provider, timeouts: PrefixTable[Decimal]) -> tuple[list[ModelRoute], frozenset[str]]:
    """The provider's routes, and the model names it lists but does not serve (uni-api's
    `search`, a model of its /v1/search endpoint, which Tollgate has not)."""
    routes: list[ModelRoute] = []
    dropped: set[str] = set()
    seen: dict[str, str] = {}  # public name → upstream name
    items = items_of(section, "model")
    if not items:
        raise section.error("provider", f"{section.where('model')} must list at least one model")
    models_node = section.node["model"]
    for index, entry in items:
        if isinstance(entry, dict) and len(entry) == 1:
            upstream, public = next(iter(entry.items()))
        elif isinstance(entry, str):
            upstream = public = entry
        else:
            raise error_at(section.file, models_node, index, f"{section.where('model')}[{index}] must be a model name or 'upstream-name: alias'")
        upstream, public = str(upstream).strip(), str(public).strip()
        if not upstream or not public:
            raise error_at(section.file, models_node, index, f"{section.where('model')}[{index}] has an empty model name")
        if public in seen:
            if seen[public] != upstream:
                raise error_at(section.file, models_node, index, f"model '{public}' is listed twice for provider '{provider.name}'")
            section.warn_at(models_node, index, f"model '{public}' is listed twice for provider '{provider.name}' (the same model): read once")
            continue  # uni-api's README lists `gemini-2.5-flash: gemini-2.5-flash` and `gemini-2.5-flash`
        seen[public] = upstream
        if public == SEARCH_MODEL:
            section.warn_at(models_node, index, ignored(f"model: {SEARCH_MODEL}") + " (uni-api's /v1/search)")
            dropped.add(public)
            continue
        timeout = timeouts.get(public) or timeouts.get(upstream) or DEFAULT_TIMEOUT
        routes.append(ModelRoute(provider, public, upstream, float(timeout)))
    return routes, frozenset(dropped)


def _unpriced(section: Section, routes: list[ModelRoute], prices: PriceBook) -> ConfigError | None:
    """Fail closed: a model a provider lists that nothing prices would be billed $0, so the
    config must not load; the error points at the model's line. `_build` raises it once the
    rest of the config is known good, so a mistake elsewhere is reported as itself.
    (Discovered models nothing prices are left out instead: `_discover_models`.)"""
    for route in routes:
        if prices.resolve_route(route.provider.engine, route.upstream_name, route.public_name).price is None:
            return error_at(section.file, section.node["model"], _item_of(section.node["model"], route.public_name), unpriced_message(route.public_name))
    return None


def _item_of(models: list[Any], public: str) -> int:
    """The index of the model list item serving `public` (items read once or skipped make it
    differ from the route's position)."""
    for index, entry in enumerate(models):
        name = next(iter(entry.values())) if isinstance(entry, dict) and len(entry) == 1 else entry
        if str(name).strip() == public:
            return index
    return 0


def unpriced_message(model: str) -> str:
    return f"model '{model}' has no price: add a model_price entry or a default (the price catalog does not list it; '{model}: 0' marks it free)"


def _index_routes(routes_by_provider: list[list[ModelRoute]]) -> tuple[dict[str, tuple[ModelRoute, ...]], dict[str, ModelRoute]]:
    """Public name → every route serving it (config order), plus `provider/name` → that one
    route; and the labels a model literally named so holds instead (see `shadowed_labels`)."""
    index: dict[str, list[ModelRoute]] = {}
    for routes in routes_by_provider:
        for route in routes:
            index.setdefault(route.public_name, []).append(route)
    shadowed: dict[str, ModelRoute] = {}
    for routes in routes_by_provider:
        for route in routes:
            held = index.setdefault(route.label, [route])
            if held[0] is not route and route.label not in shadowed:
                shadowed[route.label] = route
    return {name: tuple(routes) for name, routes in index.items()}, shadowed


def _read_keys(
    top: Section,
    providers: dict[str, Provider],
    routes: dict[str, tuple[ModelRoute, ...]],
    preferences: Preferences,
    accounts: dict[str, ApiKey],
    unserved: Unserved,
) -> list[ApiKey]:
    keys: list[ApiKey] = []
    seen: set[str] = set()
    ids: set[str] = set()
    for index, node in items_of(top, "api_keys"):
        cooperate()
        section = Section(node, top.file, f"api_keys[{index}]", top.node["api_keys"], index)
        secret = section.string("api")
        if secret in seen:
            raise section.error("api", f"duplicate API key in {section.path} (keys must be unique)")
        seen.add(secret)
        line = line_of(top.node["api_keys"], index)
        key = read_key(section, providers, routes, preferences, accounts, secret=secret, line=line, unserved=unserved)
        if key.id in ids:
            raise section.error("id" if section.has("id") else "api", f"{section.path} has the id '{key.id}' of another key (ids must be unique)")
        ids.add(key.id)
        keys.append(key)
    return _with_an_admin(top, keys)


def _with_an_admin(top: Section, keys: list[ApiKey]) -> list[ApiKey]:
    """uni-api's rule: when no key has `role: admin`, the first key is the admin (its minimal
    example has one key and no role). Said as a warning, and written into the key's entry so
    that an edit through the keys API keeps it."""
    if not keys or any(key.is_admin for key in keys):
        return keys
    first = keys[0]
    Section(top.node["api_keys"][0], top.file, "api_keys[0]").warn(
        "api", "no key has role: admin, so the first key is the admin (as in uni-api); set role: admin on the key you mean"
    )
    return [replace(first, role="admin", entry={**first.entry, "role": "admin"}), *keys[1:]]


def read_key(
    section: Section,
    providers: dict[str, Provider],
    routes: dict[str, tuple[ModelRoute, ...]],
    preferences: Preferences,
    accounts: dict[str, ApiKey],
    *,
    secret: str | None,
    line: int | None = None,
    key_id: str | None = None,
    unserved: Unserved | None = None,
) -> ApiKey:
    """One key entry, validated: api.yaml's and the keys API's (which passes the stored id and
    no secret) share this, so both give the same messages for the same mistakes."""
    read_options(section, KEY_KEYS, KEY)
    prefs = section.section("preferences")
    read_options(prefs, KEY_PREFERENCE_KEYS, KEY_PREFERENCES)
    _refuse_per_model_limits(prefs)
    if key_id is None:
        key_id = read_key_id(section) if section.has("id") else ledger_id(secret or "")
    return ApiKey(
        secret=secret,
        id=key_id,
        name=section.string("name", mask_key(secret) if secret else key_id),
        role=_read_role(section),
        access=_read_access(section, providers, routes, unserved or {}),
        billing=_key_billing(section, prefs, accounts),
        limits=read_key_limits(prefs, preferences.timezone, preferences.alerts),
        line=line,
        account=accounts[section.string("account")] if section.has("account") else None,
        entry={name: value for name, value in section.node.items() if name != "api"},
        auto_retry=read_auto_retry(prefs, preferences.auto_retry),
        scheduling_algorithm=read_scheduling_algorithm(prefs, preferences.scheduling_algorithm),
        max_reserve_completion_tokens=read_reserve_cap(prefs, preferences.max_reserve_completion_tokens),
    )


def _read_role(section: Section) -> str:
    """`user` or `admin`; uni-api's other roles are names for its request log: a user here."""
    role = section.string("role", "user")
    if role not in ("user", "admin"):
        section.warn("role", ignored(f"role: {role}") + " (the key is a user key)")
        return "user"
    return role


def _refuse_per_model_limits(prefs: Section) -> None:
    """uni-api's per-model `rate_limit: {model: 10/min, default: 4/min}` would, ignored, leave
    the key unlimited: refused, saying how Tollgate writes it."""
    for name in ("rate_limit", "token_rate_limit"):
        if isinstance(prefs.raw(name), dict):
            raise prefs.error(name, f"{prefs.where(name)}: per-model limits are not supported; write one limit for the key, e.g. {name}: 15/min,1000/day")


def _key_billing(section: Section, prefs: Section, accounts: dict[str, ApiKey]) -> KeyBilling:
    """The key's own terms, or, for a key in an account, the account's balance (credits,
    count credits, billing window) in the key's billing mode (the account's by default)."""
    if not section.has("account"):
        return read_key_billing(prefs)
    name = section.string("account")
    account = accounts.get(name)
    if account is None:
        known = f" (accounts: {', '.join(accounts)})" if accounts else " (there is no accounts: section)"
        raise section.error("account", f"{section.where('account')} names account '{name}', which is not defined{known}")
    for own in ("credits", "count_credits", "created_at"):
        if prefs.has(own):
            raise prefs.error(own, f"{prefs.where(own)}: a key in an account draws on the account's balance; set {own} on account '{name}'")
    mode = prefs.choice("billing_mode", BILLING_MODES, account.billing.mode)
    multiplier = read_multiplier(prefs) if prefs.has("price_multiplier") else account.billing.price_multiplier
    return replace(account.billing, mode=mode, owner=account.id, price_multiplier=multiplier)


def read_key_id(section: Section) -> str:
    key_id = section.string("id")
    if not KEY_ID.fullmatch(key_id):
        raise section.error("id", f"{section.where('id')} must be 1-64 letters, digits, '_', '.', ':' or '-' (starting with a letter or digit), got '{key_id}'")
    return key_id


def ledger_id(secret: str) -> str:
    """The id of a key that names none: a hash of its secret (every key's id before ids could
    be set), so the database never holds a secret and existing ledgers keep their history."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _read_access(section: Section, providers: dict[str, Provider], routes: dict[str, tuple[ModelRoute, ...]], unserved: Unserved) -> ModelAccess:
    """A key's `model:` list, read as uni-api reads it: `provider/model` is that provider's
    model, `<provider/model>` the model literally named so, `model: []` every model. An entry
    that can only narrow what the key may use and that names nothing here (another config's
    provider, uni-api's API keys as channels) is ignored with a warning, never widened."""
    if not section.has("model"):
        return ModelAccess()
    raw = section.raw("model")
    entries, holder = (raw, raw) if isinstance(raw, list) else ([raw], None)
    if not entries:  # uni-api: an empty list is every model
        return ModelAccess()
    where = section.where("model")
    everything, by_provider, pairs, models = False, set(), set(), set()
    for index, entry in enumerate(entries):
        warn_here = functools.partial(section.warn_at, holder, index) if holder is not None else functools.partial(section.warn, "model")
        if isinstance(entry, dict) and len(entry) == 1:  # uni-api's channel weight: `- gcp1/*: 5`
            entry = next(iter(entry))
            warn_here(ignored("model weight"))
        name = str(entry).strip()
        provider, _, model = name.partition("/")
        if name.startswith("<") and name.endswith(">"):  # uni-api: the whole text is the model's name
            literal = name[1:-1].strip()
            if not any(route.public_name == literal for route in routes.get(literal, ())):
                raise section.error("model", f"{where} names model '{literal}', which no provider serves")
            models.add(literal)
        elif name in ("*", "all"):  # "all" as in uni-api configs
            everything = True
        elif model and provider in unserved and (unserved[provider] is None or model in (unserved[provider] or ())):
            continue  # a provider (or model) that serves nothing here: warned about where it is defined
        elif model and provider.startswith("sk-") and provider not in providers:
            warn_here(ignored("API key as a channel (sk-…/*)"))
        elif model and provider in providers:
            if model == "*":
                by_provider.add(provider)
            elif any(route.provider.name == provider for route in routes.get(model, ())):
                pairs.add((provider, model))
            else:
                raise section.error("model", f"{where} names '{name}', but provider '{provider}' has no model '{model}'")
        elif name in routes:
            models.add(name)
        elif model:
            warn_here(f"{where} names '{name}', but there is no provider '{provider}' and no model by that name: the entry is ignored")
        else:
            raise section.error("model", f"{where} names model '{name}', which no provider serves")
    return ModelAccess(everything, frozenset(by_provider), frozenset(pairs), frozenset(models))
