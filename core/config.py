"""api.yaml parsed into immutable, typed objects, built once per load.

The request path never touches YAML: everything it needs (model → routes, key index,
timeouts) is derived here. A `Config` is swapped atomically on reload.
"""

from __future__ import annotations

import base64
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
from core.config_billing import BILLING_MODES, DEFAULT_RESERVE_COMPLETION_TOKENS, KeyBilling, read_key_billing, read_price_book
from core.config_limits import LIMIT_KEYS, AlertSettings, IPNetwork, KeyLimits, read_alerts, read_key_limits, read_networks, read_timezone
from core.config_reader import Section, collecting_warnings, items_of
from core.cooperate import cooperate
from core.keys.index import KeyIndex, digest_of, mask_key
from core.lookup import PrefixTable
from core.pricing import PriceBook, build_price_book
from core.yamlsource import ConfigError, ConfigWarning, error_at, expand_env, line_of, parse_yaml

ENGINES = ("openai", "azure", "anthropic", "gemini", "echo")
SCHEDULING_ALGORITHMS = ("fixed_priority", "round_robin", "weighted_round_robin", "lottery", "random")
# uni-api's names Tollgate reads as one of its own: smart_round_robin also orders a provider's
# upstream keys by their success rate, which Tollgate does not (it rotates them).
SCHEDULING_ALIASES = {"smart_round_robin": "weighted_round_robin"}
DEFAULT_TIMEOUT = Decimal(100)

# Every setting api.yaml accepts, by place; a test checks that api.yaml.example documents each.
TOP_LEVEL_KEYS = ("providers", "accounts", "api_keys", "preferences")
PROVIDER_KEYS = ("provider", "base_url", "api", "engine", "model", "preferences")
PROVIDER_PREFERENCE_KEYS = ("model_timeout", "headers", "weight", "api_version", "default_max_tokens", "post_body_parameter_overrides", "proxy")
KEY_KEYS = ("api", "id", "name", "role", "account", "model", "preferences")
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # safe in a URL path, a CSV cell and a log line
ACCOUNT_KEYS = ("name", "preferences")
ACCOUNT_PREFERENCE_KEYS = (
    "billing_mode", "credits", "count_credits", "created_at", "rate_limit", "token_rate_limit", "concurrency_limit",
    "daily_cost_limit", "weekly_cost_limit", "monthly_cost_limit", "budget", "budget_period", "timezone", "alerts", "self_service_keys",
)  # fmt: skip
ACCOUNT_ID_PREFIX = "account:"  # an account's ledger id: `account:acme` (no key id has a ':')
ACCOUNT = "account"  # the role of the stand-in key an account is billed and limited as
FILE, API = "api.yaml", "api"  # where a key is defined: the operator's file, or the keys API
KEY_PREFERENCE_KEYS = ("billing_mode", "credits", "count_credits", "created_at", *LIMIT_KEYS, "AUTO_RETRY", "SCHEDULING_ALGORITHM")
PREFERENCE_KEYS = (
    "SCHEDULING_ALGORITHM", "AUTO_RETRY", "cooldown_period", "model_timeout", "max_request_body_bytes", "model_price", "count_billing",
    "reserve_completion_tokens", "timezone", "trusted_proxies", "alerts", "max_response_body_bytes", "auth_failure_limit",
    "proxy",
)  # fmt: skip
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BODY = 100 * 1024 * 1024  # an upstream answer (or stream) past this is cut off: 502
DEFAULT_AUTH_FAILURE_LIMIT = 30


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
    body_overrides: BodyOverrides | None = None  # post_body_parameter_overrides (core/body_overrides.py)
    proxy: UpstreamProxy | None = field(default=None, repr=False)  # `proxy`: what this provider is reached through


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One way to serve a public model name: this provider, under this upstream name."""

    provider: Provider
    public_name: str
    upstream_name: str
    timeout: float

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

    def __post_init__(self) -> None:
        if not self.digest and self.secret is not None:
            object.__setattr__(self, "digest", digest_of(self.secret))
            object.__setattr__(self, "masked", mask_key(self.secret))

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class Preferences:
    scheduling_algorithm: str = "fixed_priority"
    auto_retry: bool | int = True  # see read_auto_retry
    cooldown_period: float = 60.0
    max_request_body_bytes: int = DEFAULT_MAX_BODY
    prices: PriceBook = field(default_factory=lambda: build_price_book({}, {}, Decimal(0), True))
    reserve_completion_tokens: int = DEFAULT_RESERVE_COMPLETION_TOKENS
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    trusted_proxies: tuple[IPNetwork, ...] = ()
    alerts: AlertSettings = field(default_factory=AlertSettings)
    max_response_body_bytes: int = DEFAULT_MAX_RESPONSE_BODY
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT  # per client address per minute; 0: off


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


def load_config(path: str | Path) -> Config:
    """Read, validate and build the config at `path`; raises ConfigError with file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "config file not found (start from: cp api.yaml.example api.yaml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read config file: {exc}") from None
    return build_config(text, str(path), hashlib.sha256(raw).hexdigest())


def build_config(text: str, file: str, source_hash: str | None = None) -> Config:
    """Build from the fast, position-less parse; on an error or a warning, build again from
    a parse that knows line numbers, so the message can say where."""
    try:
        try:
            with collecting_warnings() as warnings:
                config = _build(parse_yaml(text, file, located=False), text, file, source_hash)
            if not warnings or all(warning.line is not None for warning in warnings):
                return replace(config, warnings=tuple(warnings))
        except ConfigError as fast_error:
            if fast_error.line is not None:
                raise
        with collecting_warnings() as warnings:  # again, with positions for the message
            config = _build(parse_yaml(text, file), text, file, source_hash)
        return replace(config, warnings=tuple(warnings))
    except RecursionError:  # lists or mappings nested thousands deep: refused, not a crash of the reloader
        raise ConfigError(file, None, "YAML error: nested too deeply") from None


def _build(tree: Any, text: str, file: str, source_hash: str | None) -> Config:
    expand_env(tree, file)
    top = Section(tree, file, "")
    top.reject_unknown(TOP_LEVEL_KEYS)
    preferences, global_timeouts = _read_preferences(top.section("preferences"))
    providers, routes_by_provider = _read_providers(top, global_timeouts, read_proxy(top.section("preferences"), None))
    routes = _index_routes(routes_by_provider)
    accounts = _read_accounts(top, preferences)
    keys = _read_keys(top, {p.name: p for p in providers}, routes, preferences, accounts)
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
    section.reject_unknown(PREFERENCE_KEYS)
    prefs = Preferences(
        scheduling_algorithm=read_scheduling_algorithm(section, "fixed_priority"),
        auto_retry=read_auto_retry(section, True),
        cooldown_period=float(section.number("cooldown_period", 60)),
        max_request_body_bytes=section.integer("max_request_body_bytes", DEFAULT_MAX_BODY, minimum=1),
        prices=read_price_book(section),
        reserve_completion_tokens=section.integer("reserve_completion_tokens", DEFAULT_RESERVE_COMPLETION_TOKENS),
        timezone=read_timezone(section, "timezone"),
        trusted_proxies=read_networks(section, "trusted_proxies"),
        max_response_body_bytes=section.integer("max_response_body_bytes", DEFAULT_MAX_RESPONSE_BODY, minimum=1),
        auth_failure_limit=section.integer("auth_failure_limit", DEFAULT_AUTH_FAILURE_LIMIT, minimum=0),
        alerts=read_alerts(section, "alerts"),
    )
    return prefs, _read_timeouts(section)


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
    url = base_url.lower()
    if "anthropic.com" in url:
        return "anthropic"
    if "googleapis.com" in url:
        return "gemini"
    if "openai.azure.com" in url:
        return "azure"
    return "openai"


def _read_providers(
    top: Section, global_timeouts: dict[str, Decimal], global_proxy: UpstreamProxy | None = None
) -> tuple[list[Provider], list[list[ModelRoute]]]:
    providers: list[Provider] = []
    all_routes: list[list[ModelRoute]] = []
    seen: set[str] = set()
    items = items_of(top, "providers")
    if not items:
        raise top.error("providers", "providers must list at least one provider")
    for index, node in items:
        section = Section(node, top.file, f"providers[{index}]", top.node["providers"], index)
        section.reject_unknown(PROVIDER_KEYS)
        name = section.string("provider")
        if name in seen:
            raise section.error("provider", f"duplicate provider name '{name}'")
        seen.add(name)
        engine = _read_engine(section)
        base_url = _read_base_url(section, engine)
        prefs = section.section("preferences")
        prefs.reject_unknown(PROVIDER_PREFERENCE_KEYS)
        proxy = read_proxy(prefs, global_proxy)
        provider = Provider(
            name=name,
            engine=engine,
            base_url=base_url,
            upstream_keys=_read_upstream_keys(section, engine),
            headers=_read_headers(prefs),
            weight=prefs.integer("weight", 1, minimum=1),
            api_version=prefs.string("api_version") if prefs.has("api_version") else None,
            default_max_tokens=prefs.integer("default_max_tokens", 4096, minimum=1),
            proxy=proxy.for_vendor(base_url) if proxy is not None else None,
        )
        timeouts = PrefixTable({**global_timeouts, **_read_timeouts(prefs)})
        routes = _read_models(section, provider, timeouts)
        provider, routes = _with_body_overrides(prefs, provider, routes)
        providers.append(provider)
        all_routes.append(routes)
    return providers, all_routes


def read_proxy(prefs: Section, default: UpstreamProxy | None) -> UpstreamProxy | None:
    """`proxy` (uni-api's): an http:// or https:// proxy's URL and credentials, else `default`
    (a provider's: the global one). A socks5 proxy needs a library Tollgate lacks: a warning,
    as if unset. Messages never quote the URL, which may hold a password."""
    if not prefs.has("proxy"):
        return default
    raw = prefs.string("proxy")
    try:
        url = urlsplit(raw)
        port = url.port
    except ValueError:
        url, port = None, None
    scheme = url.scheme.lower() if url is not None else ""
    if scheme.startswith("socks"):
        prefs.warn("proxy", "socks5 proxies are not supported (http:// and https:// are) and are ignored")
        return default
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
    if section.has("engine"):
        engine = section.choice("engine", ENGINES)
    elif section.has("base_url"):
        engine = _infer_engine(section.string("base_url"))
    else:
        raise section.error("provider", f"{section.path} needs a base_url (or engine: echo)")
    return engine


def _read_base_url(section: Section, engine: str) -> str:
    if engine == "echo":
        return section.string("base_url", "echo://local")
    url = section.string("base_url")
    if not url.startswith(("http://", "https://")):
        raise section.error("base_url", f"{section.where('base_url')} must start with http:// or https://, got '{url}'")
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/embeddings"):
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


def _read_models(section: Section, provider: Provider, timeouts: PrefixTable[Decimal]) -> list[ModelRoute]:
    routes: list[ModelRoute] = []
    seen: set[str] = set()
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
            raise error_at(section.file, models_node, index, f"model '{public}' is listed twice for provider '{provider.name}'")
        seen.add(public)
        timeout = timeouts.get(public) or timeouts.get(upstream) or DEFAULT_TIMEOUT
        routes.append(ModelRoute(provider, public, upstream, float(timeout)))
    return routes


def _index_routes(routes_by_provider: list[list[ModelRoute]]) -> dict[str, tuple[ModelRoute, ...]]:
    """Public name → every route serving it (config order), plus `provider/name` → that one route."""
    index: dict[str, list[ModelRoute]] = {}
    for routes in routes_by_provider:
        for route in routes:
            index.setdefault(route.public_name, []).append(route)
    for routes in routes_by_provider:
        for route in routes:
            index.setdefault(route.label, [route])
    return {name: tuple(routes) for name, routes in index.items()}


def _read_keys(
    top: Section, providers: dict[str, Provider], routes: dict[str, tuple[ModelRoute, ...]], preferences: Preferences, accounts: dict[str, ApiKey]
) -> list[ApiKey]:
    keys: list[ApiKey] = []
    seen: set[str] = set()
    ids: set[str] = set()
    for index, node in items_of(top, "api_keys"):
        cooperate()
        section = Section(node, top.file, f"api_keys[{index}]", top.node["api_keys"], index)
        section.reject_unknown(KEY_KEYS)
        secret = section.string("api")
        if secret in seen:
            raise section.error("api", f"duplicate API key in {section.path} (keys must be unique)")
        seen.add(secret)
        key = read_key(section, providers, routes, preferences, accounts, secret=secret, line=line_of(top.node["api_keys"], index))
        if key.id in ids:
            raise section.error("id" if section.has("id") else "api", f"{section.path} has the id '{key.id}' of another key (ids must be unique)")
        ids.add(key.id)
        keys.append(key)
    return keys


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
) -> ApiKey:
    """One key entry, validated: api.yaml's and the keys API's (which passes the stored id and
    no secret) share this, so both give the same messages for the same mistakes."""
    section.reject_unknown(KEY_KEYS)
    prefs = section.section("preferences")
    prefs.reject_unknown(KEY_PREFERENCE_KEYS)
    if key_id is None:
        key_id = read_key_id(section) if section.has("id") else ledger_id(secret or "")
    return ApiKey(
        secret=secret,
        id=key_id,
        name=section.string("name", mask_key(secret) if secret else key_id),
        role=section.choice("role", ("user", "admin"), "user"),
        access=_read_access(section, providers, routes),
        billing=_key_billing(section, prefs, accounts),
        limits=read_key_limits(prefs, preferences.timezone, preferences.alerts),
        line=line,
        account=accounts[section.string("account")] if section.has("account") else None,
        entry={name: value for name, value in section.node.items() if name != "api"},
        auto_retry=read_auto_retry(prefs, preferences.auto_retry),
        scheduling_algorithm=read_scheduling_algorithm(prefs, preferences.scheduling_algorithm),
    )


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
    return replace(account.billing, mode=mode, owner=account.id)


def read_key_id(section: Section) -> str:
    key_id = section.string("id")
    if not KEY_ID.fullmatch(key_id):
        raise section.error("id", f"{section.where('id')} must be 1-64 letters, digits, '_', '.', ':' or '-' (starting with a letter or digit), got '{key_id}'")
    return key_id


def ledger_id(secret: str) -> str:
    """The id of a key that names none: a hash of its secret (every key's id before ids could
    be set), so the database never holds a secret and existing ledgers keep their history."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _read_access(section: Section, providers: dict[str, Provider], routes: dict[str, tuple[ModelRoute, ...]]) -> ModelAccess:
    if not section.has("model"):
        return ModelAccess()
    entries = section.raw("model")
    entries = entries if isinstance(entries, list) else [entries]
    everything, by_provider, pairs, models = False, set(), set(), set()
    for entry in entries:
        name = str(entry).strip()
        provider, _, model = name.partition("/")
        if name in ("*", "all"):  # "all" as in uni-api configs
            everything = True
        elif model and provider in providers:
            if model == "*":
                by_provider.add(provider)
            elif name in routes:
                pairs.add((provider, model))
            else:
                raise section.error("model", f"{section.where('model')} names '{name}', but provider '{provider}' has no model '{model}'")
        elif name in routes:
            models.add(name)
        elif model:
            raise section.error("model", f"{section.where('model')} names '{name}', but there is no provider '{provider}' and no model by that name")
        else:
            raise section.error("model", f"{section.where('model')} names model '{name}', which no provider serves")
    return ModelAccess(everything, frozenset(by_provider), frozenset(pairs), frozenset(models))
