"""Model discovery: a provider written without `model:` serves what its upstream lists.

As uni-api does (update_initial_model), the list comes from the upstream's `/models` when the
config is built: OpenAI-style `data[].id`, Anthropic's paged `data[].id`, Gemini's
`models[].name` (those that generate content or embed). Building a config is synchronous and
runs off the event loop (a worker thread on reload, before the server starts at start-up),
so this is plain urllib, one thread per provider, all under one hard deadline.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from core.config import Config, Provider

DEFAULT_TIMEOUT = 10.0  # seconds per load, all providers at once; preferences.model_discovery_timeout
MAX_PAGES = 10  # Anthropic and Gemini page their lists; 10 pages of 1,000 is every model they have
MAX_BODY = 8 * 1024 * 1024  # one page of a model list is a few KB
ANTHROPIC_VERSION = "2023-06-01"
GEMINI_METHODS = frozenset({"generateContent", "embedContent"})  # what Tollgate can call a Gemini model for
USER_AGENT = "tollgate"


class DiscoveryFailed(Exception):
    """Why a provider's models could not be listed; the message never holds an upstream key."""


@dataclass(frozen=True, slots=True)
class Discovered:
    """One provider's outcome: the models to serve, and the problem to warn about (None: asked and answered)."""

    models: tuple[str, ...]
    problem: str | None = None
    kept_previous: bool = False


class Discovery:
    """The discoveries of one config load. The load may build twice (the second time to
    locate a warning), so each provider is asked once; a failure falls back to the list
    the config being replaced discovered for that provider."""

    def __init__(self, previous: Config | None = None):
        self._previous = previous_lists(previous)
        self._asked: dict[tuple[Any, ...], Discovered] = {}

    def models(self, providers: Sequence[Provider], timeout: float) -> list[Discovered]:
        """Each provider's outcome, in order; the upstreams not asked yet are asked at once."""
        new = [provider for provider in providers if _identity(provider) not in self._asked]
        for provider, outcome in zip(new, discover_all(new, timeout), strict=True):
            self._asked[_identity(provider)] = self._with_fallback(provider, outcome)
        return [self._asked[_identity(provider)] for provider in providers]

    def _with_fallback(self, provider: Provider, outcome: tuple[str, ...] | DiscoveryFailed) -> Discovered:
        if not isinstance(outcome, DiscoveryFailed):
            return Discovered(outcome)
        problem = f"model discovery from {public_url(models_url(provider))} failed: {outcome}"
        before = self._previous.get(provider.name)
        if before:
            return Discovered(before, f"{problem}; still serving the {len(before)} models discovered before", kept_previous=True)
        return Discovered((), f"{problem}; provider '{provider.name}' serves no models (list them under model:, or reload once the upstream answers)")


def previous_lists(previous: Config | None) -> dict[str, tuple[str, ...]]:
    """Provider name → the upstream names it discovered, in the config being replaced."""
    lists: dict[str, dict[str, None]] = {}
    for routes in previous.routes.values() if previous is not None else ():
        for route in routes:
            if route.discovered:
                lists.setdefault(route.provider.name, {})[route.upstream_name] = None
    return {name: tuple(models) for name, models in lists.items()}


def discover_all(providers: Sequence[Provider], timeout: float) -> list[tuple[str, ...] | DiscoveryFailed]:
    """Ask every provider at once, each in a thread; whoever has not answered by the deadline
    has failed (its thread is left to end at its own socket timeout, which is no later)."""
    deadline = time.monotonic() + timeout
    outcomes: list[tuple[str, ...] | DiscoveryFailed] = [DiscoveryFailed(f"no answer within {timeout:g} s")] * len(providers)

    def ask(index: int, provider: Provider) -> None:
        try:
            outcomes[index] = discover(provider, deadline)
        except DiscoveryFailed as failure:
            outcomes[index] = failure

    threads = [threading.Thread(target=ask, args=(i, p), name=f"discover-{p.name}", daemon=True) for i, p in enumerate(providers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
    return list(outcomes)


def discover(provider: Provider, deadline: float) -> tuple[str, ...]:
    """The model names `provider`'s upstream lists (following pages), by `deadline` (monotonic)."""
    models: dict[str, None] = {}
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        url, headers = page_request(provider, cursor)
        page = _get_json(url, headers, deadline, provider)
        names, cursor = read_page(provider.engine, page)
        models.update(dict.fromkeys(names))
        if cursor is None:
            break
    return tuple(models)


def models_url(provider: Provider) -> str:
    """`{base_url}/models`: the provider's stored base_url is OpenAI's and Anthropic's `…/v1`
    and Gemini's `…/v1beta`, which is where each lists its models."""
    return f"{provider.base_url}/models"


def page_request(provider: Provider, cursor: str | None) -> tuple[str, dict[str, str]]:
    """The URL and headers of one page, authenticated as the provider's requests are (its first key)."""
    key = provider.upstream_keys[0]
    query: dict[str, str] = {}
    if provider.engine == "anthropic":
        headers = {"x-api-key": key, "anthropic-version": provider.api_version or ANTHROPIC_VERSION}
        query["limit"] = "1000"
        if cursor:
            query["after_id"] = cursor
    elif provider.engine == "gemini":
        headers = {"x-goog-api-key": key}  # as the Gemini adapter sends it: never in a URL a message could show
        query["pageSize"] = "1000"
        if cursor:
            query["pageToken"] = cursor
    else:
        headers = {"Authorization": f"Bearer {key}"}
    url = models_url(provider)
    if query:
        url += ("&" if "?" in url else "?") + urlencode(query)
    return url, {"User-Agent": USER_AGENT, "Accept": "application/json", **headers, **provider.headers}


def read_page(engine: str, page: Any) -> tuple[list[str], str | None]:
    """A page's model names and the cursor of the next page (None: the last)."""
    if not isinstance(page, dict):
        raise DiscoveryFailed("the answer is not a JSON object")
    if engine == "gemini":
        entries = page.get("models")
        if not isinstance(entries, list):
            raise DiscoveryFailed("the answer has no 'models' list")
        names = [_gemini_name(entry) for entry in entries if _gemini_callable(entry)]
        token = page.get("nextPageToken")
        return [name for name in names if name], token if isinstance(token, str) and token else None
    entries = page.get("data")
    if not isinstance(entries, list):
        raise DiscoveryFailed("the answer has no 'data' list")
    names = [entry["id"].strip() for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"].strip()]
    last = page.get("last_id")
    more = engine == "anthropic" and page.get("has_more") is True and isinstance(last, str) and last
    return names, last if more else None


def _gemini_callable(entry: Any) -> bool:
    methods = entry.get("supportedGenerationMethods") if isinstance(entry, dict) else None
    return isinstance(methods, list) and not GEMINI_METHODS.isdisjoint(m for m in methods if isinstance(m, str))


def _gemini_name(entry: dict[str, Any]) -> str:
    name = entry.get("name")
    return name.removeprefix("models/").strip() if isinstance(name, str) else ""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the upstream key to wherever it points: refused instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def _opener_for(provider: Provider) -> tuple[urllib.request.OpenerDirector, dict[str, str]]:
    """The opener reaching the provider as its requests do: through its `proxy` when it has
    one, with the proxy's credentials (urllib sends them to the CONNECT of an https vendor,
    with the request to a plain http one)."""
    proxy = provider.proxy
    if proxy is None:
        return _opener, {}
    opener = urllib.request.build_opener(_NoRedirects, urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))
    return opener, dict(proxy.connect_headers or proxy.request_headers or {})


def _get_json(url: str, headers: dict[str, str], deadline: float, provider: Provider) -> Any:
    """GET `url` and parse its JSON, all by `deadline`; every failure as DiscoveryFailed."""
    secrets = tuple(key for key in provider.upstream_keys if key)
    opener, proxy_headers = _opener_for(provider)
    try:
        with opener.open(urllib.request.Request(url, headers={**headers, **proxy_headers}), timeout=_left(deadline)) as response:
            body = _read_by(response, deadline)
    except urllib.error.HTTPError as error:
        raise DiscoveryFailed(_scrub(f"HTTP {error.code}{_vendor_message(error)}", secrets)) from None
    except (urllib.error.URLError, OSError, ValueError) as error:  # refused, DNS, TLS, timeout, bad URL
        reason = getattr(error, "reason", None) or error
        raise DiscoveryFailed(_scrub(f"{type(error).__name__}: {reason}" if str(reason) else type(error).__name__, secrets)) from None
    try:
        return json.loads(body)
    except ValueError:
        raise DiscoveryFailed("the answer is not JSON") from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DiscoveryFailed("timed out")
    return left


def _read_by(response: Any, deadline: float) -> bytes:
    """The body, read in pieces so that an upstream trickling bytes is cut at the deadline too."""
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise DiscoveryFailed(f"the answer is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
        _left(deadline)
    return b"".join(chunks)


def _vendor_message(error: urllib.error.HTTPError) -> str:
    """The vendor's own short reason (`error.message`), when its error body has one."""
    try:
        data = json.loads(error.read(65536))
    except (ValueError, OSError):
        return ""
    detail = data.get("error") if isinstance(data, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else detail
    return f" ({message[:200]})" if isinstance(message, str) and message else ""


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "…")
    return text


def public_url(url: str) -> str:
    """`url` as a message may show it: no user:password, no query (a `?key=` would be a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _identity(provider: Provider) -> tuple[Any, ...]:
    """What a discovery depends on: the same in both builds of one load."""
    return (provider.name, provider.engine, provider.base_url, provider.upstream_keys[:1], tuple(provider.headers.items()), provider.api_version)
