"""Per-key limits enforced at admission: access rules, concurrency, request and token
rates, quota, and period budgets.

Everything is checked and held in one synchronous step on the event loop (after the
awaited loads), so concurrent requests cannot slip past a limit: 50 requests against a
limit of 10 admit exactly 10. Rate windows are fixed windows aligned to the epoch (a
`/min` window starts at every whole minute, a `/day` window at 00:00 UTC). Period budgets
start at local midnight, Monday or the 1st in the key's time zone.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from core.config import ACCOUNT, ApiKey
from core.config.limits import IPNetwork, RateRule
from core.errors import GatewayError, forbidden
from core.ledger import Account
from core.ledger.sums import Window, account_totals, window_totals
from core.money_format import count_text, usd_text
from core.pricing import format_usd

QUOTA_CODE = "API_KEY_QUOTA_EXHAUSTED"
T = TypeVar("T")


class OrderedReads(Protocol):
    """What the limiter needs of a ledger: a read in write order (budget period spend)."""

    def query_in_order(self, query: Callable[[Any], Awaitable[T]]) -> tuple[int, asyncio.Future[T]]: ...


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The caller's address: `X-Forwarded-For` counts only when the peer is a trusted proxy."""
    if not peer or not forwarded_for or not trusted or not _in(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):  # the last hop not added by one of our own proxies
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _in(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def check_key_usable(key: ApiKey, now: float, ip: str | None) -> None:
    """Enabled, not expired, from an allowed address: what holds for the key anywhere, its
    holder's pages included. (`allowed_clients` names the programs that may call the API;
    a browser opening the usage page is not an API call.)"""
    limits = key.limits
    if not limits.enabled:
        raise forbidden("This API key is disabled.", "key_disabled")
    if limits.expires_at is not None and now >= limits.expires_at:
        raise forbidden("This API key has expired.", "key_expired")
    if limits.allowed_ips and (ip is None or not _in(ip, limits.allowed_ips)):
        raise forbidden("Requests from this address are not allowed for this API key.", "ip_not_allowed")


def check_access(key: ApiKey, now: float, ip: str | None, user_agent: str | None) -> None:
    """The key's access rules for an API call: `check_key_usable`, and the calling program."""
    check_key_usable(key, now, ip)
    limits = key.limits
    if limits.allowed_clients and not any(fnmatch.fnmatchcase((user_agent or "").lower(), p.lower()) for p in limits.allowed_clients):
        raise forbidden("This client is not allowed for this API key.", "client_not_allowed")


def period_bounds(period: str, zone: ZoneInfo, now: float) -> tuple[float, float]:
    """[start, end) of the daily, weekly (from Monday) or monthly period containing `now`."""
    local = datetime.fromtimestamp(now, zone)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "weekly":
        start -= timedelta(days=start.weekday())
    elif period == "monthly":
        start = start.replace(day=1)
    if period == "daily":
        end = start + timedelta(days=1)
    elif period == "weekly":
        end = start + timedelta(days=7)
    else:
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    # Rebuild in the zone so a DST change inside the period gives the right offset at the end.
    start = datetime(start.year, start.month, start.day, tzinfo=zone)
    end = datetime(end.year, end.month, end.day, tzinfo=zone)
    return start.timestamp(), end.timestamp()


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1s`, `20ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


@dataclass(slots=True)
class RateWindow:
    start: float
    used: int = 0
    reserved: int = 0


@dataclass(slots=True)
class PeriodSpend:
    """Spend in one budget period: what the ledger held up to a point in the write order
    (`marker`), plus what settled after that point."""

    start: float
    end: float
    marker: int = 0
    db_nanos: int = 0
    live_nanos: int = 0
    reserved_nanos: int = 0
    ready: asyncio.Future[None] | None = None

    @property
    def spent(self) -> int:
        return self.db_nanos + self.live_nanos


@dataclass(slots=True)
class KeyState:
    in_flight: int = 0
    quota_reserved: int = 0
    windows: dict[tuple[str, int], RateWindow] = field(default_factory=dict)
    periods: dict[str, PeriodSpend] = field(default_factory=dict)


@dataclass(slots=True)
class Holds:
    """What one admitted request holds; released exactly once at settlement."""

    key: ApiKey
    tokens: int
    nanos: int
    rate_windows: list[tuple[str, int, float]] = field(default_factory=list)  # (kind, seconds, window start)
    periods: list[tuple[str, float]] = field(default_factory=list)  # (name, period start)
    open: bool = True


def _whose(key: ApiKey, capital: bool = True) -> str:
    """Who a limit belongs to, for the message: the key, or the account it shares with others."""
    text = f"this key's account '{key.name}'" if key.role == ACCOUNT else "this API key"
    return text[0].upper() + text[1:] if capital else text


def _period_unavailable() -> GatewayError:
    return GatewayError(503, "api_error", "budget_period_loading", "This key's budget spend is being loaded; retry in a moment.", {"Retry-After": "1"})


class Limiter:
    def __init__(self, ledger: OrderedReads, clock: Callable[[], float]):
        self.ledger = ledger
        self.clock = clock
        self._state: dict[str, KeyState] = {}

    def state(self, key: ApiKey) -> KeyState:
        state = self._state.get(key.id)
        if state is None:
            state = self._state[key.id] = KeyState()
        return state

    async def prepare(self, key: ApiKey, now: float) -> None:
        """Load this period's spend for each budget (awaits the ledger only at a new period)."""
        state = self.state(key)
        for limit in key.limits.period_limits:
            start, end = period_bounds(limit.period, key.limits.timezone, now)
            spend = state.periods.get(limit.name)
            if spend is None or spend.start != start or spend.end != end:
                spend = PeriodSpend(start, end, ready=asyncio.get_running_loop().create_future())
                state.periods[limit.name] = spend
                await self._load(key, limit.name, spend)  # concurrent requests wait on spend.ready meanwhile
            if spend.ready is not None and not spend.ready.done():
                await asyncio.shield(spend.ready)
            if spend.ready is not None and spend.ready.exception() is not None:
                raise _period_unavailable() from spend.ready.exception()

    async def _load(self, key: ApiKey, name: str, spend: PeriodSpend) -> None:
        assert spend.ready is not None
        windows = [Window(key.id, max(spend.start, key.billing.created_at))]
        totals_of = account_totals if key.role == ACCOUNT else window_totals  # an account's spend is its keys'
        spend.marker, result = self.ledger.query_in_order(lambda db: totals_of(db, windows))
        try:
            totals = await result
            spend.db_nanos = totals[(key.id,)].cost_nanos if (key.id,) in totals else 0
            spend.ready.set_result(None)
        except Exception as exc:  # the next request tries again
            if self.state(key).periods.get(name) is spend:
                del self.state(key).periods[name]
            spend.ready.set_exception(exc)

    def acquire(self, key: ApiKey, account: Account, nanos: int, tokens: int, now: float, state: KeyState | None = None) -> Holds:
        """Check every limit, then hold them all; raises the first limit that refuses. `state`:
        the key's state as read from a shared ledger (default: this process's own)."""
        limits = key.limits
        if state is None:
            state = self.state(key)
        if limits.concurrency_limit is not None and state.in_flight >= limits.concurrency_limit:
            raise GatewayError(
                429,
                "rate_limit_error",
                "concurrency_limit_exceeded",
                f"{_whose(key)} already has {state.in_flight} requests in flight (limit {limits.concurrency_limit}).",
                {"Retry-After": "1"},
            )
        windows = [("requests", rule, self._window(state, "requests", rule, now)) for rule in limits.rate_limits]
        windows += [("tokens", rule, self._window(state, "tokens", rule, now)) for rule in limits.token_rate_limits]
        for kind, rule, window in windows:
            if window.used + window.reserved >= rule.limit:
                retry = window.start + rule.seconds - now
                headers = {"Retry-After": str(max(1, math.ceil(retry)))}
                headers.update(self.headers(key, account, now))
                raise GatewayError(
                    429,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    f"Rate limit reached for {_whose(key, capital=False)}: {rule.text} {kind}. Try again in {openai_duration(retry)}.",
                    headers,
                )
        if limits.quota is not None:
            used = self.quota_used(key, account)
            if used + state.quota_reserved >= limits.quota:
                raise GatewayError(
                    402, "insufficient_quota", QUOTA_CODE, f"This API key has used its quota ({self._quota_text(key, used)}).", self.quota_headers(key, account)
                )
        for limit in limits.period_limits:
            spend = state.periods.get(limit.name)
            if spend is None or spend.ready is None or not spend.ready.done() or spend.ready.exception() is not None:
                # Another request started a new period (or its load failed) after this one was
                # prepared: its spend is not known yet, and guessing could overspend the budget.
                raise _period_unavailable()
            if spend.spent + spend.reserved_nanos >= limit.limit_nanos:
                reset = datetime.fromtimestamp(spend.end, limits.timezone).isoformat()
                raise GatewayError(
                    402,
                    "insufficient_quota",
                    limit.code,
                    f"{_whose(key)} reached its {limit.period} limit of {usd_text(limit.limit_nanos)}; it resets at {reset}.",
                )
        holds = Holds(key, tokens, nanos)
        state.in_flight += 1
        for kind, rule, window in windows:
            window.reserved += 1 if kind == "requests" else tokens
            holds.rate_windows.append((kind, rule.seconds, window.start))
        if limits.quota is not None:
            state.quota_reserved += tokens if limits.quota_type == "tokens" else nanos
        for limit in limits.period_limits:
            state.periods[limit.name].reserved_nanos += nanos
            holds.periods.append((limit.name, state.periods[limit.name].start))
        return holds

    def release(self, holds: Holds, cost_nanos: int, tokens: int, at: float, seq: int, counted: bool = True, state: KeyState | None = None) -> None:
        """Free what the request held and record what it really used (once). `at` and `seq`
        are the ledger record's time and position in the write order; `state`: the one the
        holds were taken from, when not this process's own (a shared ledger's read)."""
        if not holds.open:
            return
        holds.open = False
        key = holds.key
        if state is None:
            state = self.state(key)
        state.in_flight -= 1
        for kind, seconds, start in holds.rate_windows:
            window = state.windows.get((kind, seconds))
            if window is not None and window.start == start:
                window.reserved -= 1 if kind == "requests" else holds.tokens
                if counted:
                    window.used += 1 if kind == "requests" else tokens
        if key.limits.quota is not None:
            state.quota_reserved -= holds.tokens if key.limits.quota_type == "tokens" else holds.nanos
        for name, start in holds.periods:
            spend = state.periods.get(name)
            if spend is not None and spend.start == start:
                spend.reserved_nanos -= holds.nanos
        self.count_spend(key.id, cost_nanos, at, seq)

    def count_spend(self, key_id: str, cost_nanos: int, at: float, seq: int) -> None:
        """Add a charge to the budget periods already loaded (a charge queued before a period's
        load marker is in its ledger sum already)."""
        state = self._state.get(key_id)
        if state is None:
            return
        for spend in state.periods.values():
            if seq > spend.marker and spend.start <= at < spend.end:
                spend.live_nanos += cost_nanos

    def _window(self, state: KeyState, kind: str, rule: RateRule, now: float) -> RateWindow:
        start = math.floor(now / rule.seconds) * rule.seconds
        window = state.windows.get((kind, rule.seconds))
        if window is None or window.start != start:
            window = state.windows[(kind, rule.seconds)] = RateWindow(start)
        return window

    @staticmethod
    def quota_used(key: ApiKey, account: Account) -> int:
        return account.tokens_used if key.limits.quota_type == "tokens" else account.total_cost_nanos

    def _quota_text(self, key: ApiKey, used: int) -> str:
        limits = key.limits
        assert limits.quota is not None
        if limits.quota_type == "tokens":
            return f"{count_text(used)} of {count_text(limits.quota)} tokens"
        return f"{usd_text(used)} of {usd_text(limits.quota)}"

    def quota_headers(self, key: ApiKey, account: Account) -> dict[str, str]:
        limits = key.limits
        if limits.quota is None:
            return {}
        used = self.quota_used(key, account)
        if limits.quota_type == "usd":
            return {"X-Quota-Used": format_usd(used), "X-Quota-Limit": format_usd(limits.quota)}
        return {"X-Quota-Used": str(used), "X-Quota-Limit": str(limits.quota)}

    def headers(self, key: ApiKey, account: Account, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers (the tightest rule of each kind) and the quota headers."""
        headers = self.quota_headers(key, account)
        state = self.state(key)
        for kind, rules in (("requests", key.limits.rate_limits), ("tokens", key.limits.token_rate_limits)):
            if not rules:
                continue
            best = None
            for rule in rules:
                window = self._window(state, kind, rule, now)
                remaining = max(0, rule.limit - window.used - window.reserved)
                if best is None or remaining < best[1]:
                    best = (rule, remaining, window.start + rule.seconds - now)
            assert best is not None
            headers[f"x-ratelimit-limit-{kind}"] = str(best[0].limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(best[1])
            headers[f"x-ratelimit-reset-{kind}"] = openai_duration(best[2])
        return headers
