"""Per-key limits from api.yaml: access rules, quota, rate and concurrency limits, period
budgets, and alert settings. Parsed once per load into frozen values."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.config.reader import MAX_NUMBER, MAX_NUMBER_TEXT, Section
from core.pricing import to_nanos
from core.timeutil import to_unix

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400,
                "w": 7 * 86400, "week": 7 * 86400,
                # As uni-api counts them: a month is 30 days and a year 365, not the calendar's.
                "mo": 30 * 86400, "month": 30 * 86400, "y": 365 * 86400, "year": 365 * 86400}  # fmt: skip
_RATE = re.compile(r"^\s*([0-9]+)\s*/\s*([0-9]*)\s*([a-z]+?)s?\s*$")
PERIODS = ("daily", "weekly", "monthly")
ALERT_KEYS = ("thresholds", "webhook_url")
QUOTA_TYPES = ("tokens", "usd")
LIMIT_KEYS = (
    "enabled", "expires_at", "allowed_ips", "allowed_clients", "quota", "quota_type", "rate_limit", "token_rate_limit", "concurrency_limit",
    "daily_cost_limit", "weekly_cost_limit", "monthly_cost_limit", "budget", "budget_period", "timezone", "alerts",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RateRule:
    limit: int
    seconds: int
    text: str


@dataclass(frozen=True, slots=True)
class PeriodLimit:
    name: str  # daily_cost_limit | weekly_cost_limit | monthly_cost_limit | budget
    period: str  # daily | weekly | monthly
    limit_nanos: int

    @property
    def code(self) -> str:
        return "budget_exceeded" if self.name == "budget" else f"{self.name}_exceeded"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    thresholds: tuple[float, ...] = ()
    webhook_url: str | None = None


@dataclass(frozen=True, slots=True)
class KeyLimits:
    enabled: bool = True
    expires_at: float | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    allowed_clients: tuple[str, ...] = ()
    quota: int | None = None  # tokens, or nano-dollars for quota_type usd
    quota_type: str = "tokens"
    rate_limits: tuple[RateRule, ...] = ()
    token_rate_limits: tuple[RateRule, ...] = ()
    concurrency_limit: int | None = None
    period_limits: tuple[PeriodLimit, ...] = ()
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    alerts: AlertSettings = field(default_factory=AlertSettings)

    # Whether admission needs the limiter at all (most keys: no); derived once, at load.
    meters_anything: bool = field(init=False)

    def __post_init__(self) -> None:
        metered = bool(self.quota or self.rate_limits or self.token_rate_limits or self.concurrency_limit or self.period_limits)
        object.__setattr__(self, "meters_anything", metered)


def read_timezone(section: Section, key: str, default: ZoneInfo | None = None) -> ZoneInfo:
    if not section.has(key):
        return default or ZoneInfo("UTC")
    name = section.string(key)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise section.error(key, f"{section.where(key)} is not a known time zone: '{name}' (use an IANA name like Europe/Berlin)") from None


def read_networks(section: Section, key: str) -> tuple[IPNetwork, ...]:
    raw = section.raw(key)
    if raw is None:
        return ()
    entries = raw if isinstance(raw, list) else [raw]
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise section.error(key, f"{section.where(key)} has '{entry}', which is not an IP address or CIDR range") from None
    return tuple(networks)


def read_alerts(section: Section, key: str, default: AlertSettings | None = None) -> AlertSettings:
    if not section.has(key):
        return default or AlertSettings()
    alerts = section.section(key)
    alerts.reject_unknown(ALERT_KEYS)
    base = default or AlertSettings()
    thresholds = base.thresholds
    if alerts.has("thresholds"):
        raw = alerts.raw("thresholds")
        values = raw if isinstance(raw, list) else [raw]
        parsed = []
        for value in values:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = -1.0
            if not 0 < number <= 1:
                raise alerts.error("thresholds", f"{alerts.where('thresholds')} must be fractions in (0, 1], got '{value}'")
            parsed.append(number)
        thresholds = tuple(sorted(set(parsed)))
    url = alerts.string("webhook_url") if alerts.has("webhook_url") else base.webhook_url
    if url is not None and not url.startswith(("http://", "https://")):
        raise alerts.error("webhook_url", f"{alerts.where('webhook_url')} must be an http(s) URL")
    return AlertSettings(thresholds, url)


def _rates(section: Section, key: str) -> tuple[RateRule, ...]:
    if not section.has(key):
        return ()
    rules = []
    for part in str(section.raw(key)).split(","):
        match = _RATE.match(part.lower())
        unit = UNIT_SECONDS.get(match.group(3)) if match else None
        if match is not None and any(len(digits) > len(str(MAX_NUMBER)) or int(digits) > MAX_NUMBER for digits in match.group(1, 2) if digits):
            raise section.error(key, f"{section.where(key)} numbers must be at most {MAX_NUMBER_TEXT}; got '{part.strip()}'")
        if match is None or unit is None or int(match.group(1)) <= 0:
            raise section.error(
                key, f"{section.where(key)} must look like '60/min,1000/day' (units s, min, hour, day, week, month, year); got '{part.strip()}'"
            )
        rules.append(RateRule(int(match.group(1)), unit * int(match.group(2) or 1), part.strip()))
    return tuple(rules)


def read_key_limits(prefs: Section, default_timezone: ZoneInfo, default_alerts: AlertSettings) -> KeyLimits:
    quota_type = prefs.choice("quota_type", QUOTA_TYPES, "tokens")
    quota_number = prefs.number("quota", 0)
    quota = None if quota_number == 0 else (int(quota_number) if quota_type == "tokens" else to_nanos(quota_number))
    if quota_type == "tokens" and quota_number != quota_number.to_integral_value():
        raise prefs.error("quota", f"{prefs.where('quota')} must be a whole number of tokens")
    periods = [PeriodLimit(f"{period}_cost_limit", period, to_nanos(prefs.number(f"{period}_cost_limit", minimum=0, allow_equal=False)))
               for period in PERIODS if prefs.has(f"{period}_cost_limit")]  # fmt: skip
    if prefs.has("budget"):
        periods.append(PeriodLimit("budget", prefs.choice("budget_period", PERIODS, "monthly"), to_nanos(prefs.number("budget", minimum=0, allow_equal=False))))
    clients = prefs.raw("allowed_clients")
    try:
        expires_at = to_unix(prefs.raw("expires_at")) if prefs.has("expires_at") else None
    except ValueError:
        raise prefs.error("expires_at", f"{prefs.where('expires_at')} must be a timestamp like 2025-01-01T00:00:00Z") from None
    return KeyLimits(
        enabled=prefs.boolean("enabled", True),
        expires_at=expires_at,
        allowed_ips=read_networks(prefs, "allowed_ips"),
        allowed_clients=tuple(str(c) for c in (clients if isinstance(clients, list) else [clients])) if clients is not None else (),
        quota=quota,
        quota_type=quota_type,
        rate_limits=_rates(prefs, "rate_limit"),
        token_rate_limits=_rates(prefs, "token_rate_limit"),
        concurrency_limit=prefs.integer("concurrency_limit", minimum=1) if prefs.has("concurrency_limit") else None,
        period_limits=tuple(periods),
        timezone=read_timezone(prefs, "timezone", default_timezone),
        alerts=read_alerts(prefs, "alerts", default_alerts),
    )
