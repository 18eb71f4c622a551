"""Each budgeted provider's vendor cost this calendar month, read synchronously on the
request path: routing skips a provider whose `budget_action: stop` budget is spent, and
alerts compare it with the budget after every charge.

A month's spend is the ledger's sum up to a point in its write order (`marker`) plus what
settled after that point in this process, exactly as key budget periods are kept
(core.limits.PeriodSpend). In fleet mode every instance's charges count: the sum is kept in
the database in the same transaction as the charges (core.ledger.postgres), and each
instance reads it again every REFRESH_SECONDS, adding its own charges in between (each read
waits until this instance's charges counted so far are written: one still queued would
otherwise drop out of the figure until a later read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from core.alerts import Alerts
from core.config import Config, ModelRoute
from core.config.limits import AlertSettings
from core.errors import GatewayError
from core.ledger import Ledger, UsageRecord
from core.limits import period_bounds

log = logging.getLogger("tollgate.vendors")

REFRESH_SECONDS = 0.5  # fleet mode: how soon another instance's vendor cost is seen here
BUDGET_EXHAUSTED = "provider_budget_exhausted"


@dataclass(slots=True)
class MonthSpend:
    """One provider's vendor cost in the month [start, end): the ledger's up to `marker`, and
    what settled here since."""

    start: float
    end: float
    ready: asyncio.Future[None]
    label: str  # YYYY-MM in the config's time zone
    zone: ZoneInfo
    marker: int = 0
    db_nanos: int = 0
    live_nanos: int = 0
    # As the config said at the last request through the provider (a reload applies then).
    budget: int | None = None
    alerts: AlertSettings = field(default_factory=AlertSettings)

    @property
    def spent(self) -> int:
        return self.db_nanos + self.live_nanos

    @property
    def loaded(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None


def _loading() -> GatewayError:
    return GatewayError(503, "api_error", "provider_budget_loading", "A provider's monthly spend is being loaded; retry in a moment.", {"Retry-After": "1"})


@dataclass
class VendorMonths:
    """The month's vendor cost of every provider with a `monthly_budget`, as this process knows it."""

    ledger: Ledger
    clock: Callable[[], float]
    alerts: Alerts | None = None  # set by the app once the sender runs
    _months: dict[str, MonthSpend] = field(default_factory=dict)

    def spent(self, provider: str) -> int | None:
        """The month's vendor cost in nano-dollars, or None if not loaded (no request of a
        budgeted provider this month in this process yet)."""
        month = self._months.get(provider)
        return month.spent if month is not None and month.loaded else None

    def month(self, provider: str) -> MonthSpend | None:
        month = self._months.get(provider)
        return month if month is not None and month.loaded else None

    async def prepare(self, config: Config, provider: str, now: float) -> MonthSpend:
        """The provider's spend this month, loaded from the ledger once per month."""
        zone = config.preferences.timezone
        month = self._months.get(provider)
        if month is not None and month.zone is zone and month.start <= now < month.end and month.loaded:  # every request but the month's first
            return self._configured(config, provider, month)
        start, end = period_bounds("monthly", zone, now)
        if month is None or month.start != start or month.end != end:
            label = datetime.fromtimestamp(start, zone).strftime("%Y-%m")
            month = MonthSpend(start, end, asyncio.get_running_loop().create_future(), label, zone)
            self._months[provider] = month
            month.marker, result = self.ledger.vendor_month(provider, start, end)
            try:
                month.db_nanos = await result
                month.ready.set_result(None)
            except Exception as exc:  # the next request tries again
                log.warning("loading provider %s's vendor cost this month failed: %r", provider, exc)
                if self._months.get(provider) is month:
                    del self._months[provider]
                month.ready.set_exception(exc)
                month.ready.exception()  # retrieved: waiters see it through `loaded`
                raise _loading() from None
        if not month.ready.done():
            with contextlib.suppress(Exception):  # a failed load: answered below
                await asyncio.shield(month.ready)
        if not month.loaded:
            raise _loading()
        month.zone = zone
        return self._configured(config, provider, month)

    @staticmethod
    def _configured(config: Config, provider: str, month: MonthSpend) -> MonthSpend:
        """The month with the budget and alert settings of `config` (a reload applies at once)."""
        terms = config.preferences.prices.vendor_terms.get(provider)
        month.budget = terms[0].monthly_budget_nanos if terms is not None else None
        month.alerts = config.preferences.alerts
        return month

    def count(self, record: UsageRecord, seq: int) -> None:
        """Add a settled charge's vendor cost to its provider's month, if loaded (a charge queued
        before the load's marker is in the ledger's sum already)."""
        cost = record.vendor_cost_nanos
        if not cost:
            return
        month = self._months.get(record.provider)
        if month is not None and (self.ledger.shared or seq > month.marker) and month.start <= record.ts < month.end:
            month.live_nanos += cost
            self._check_alerts(record.provider, month)

    def _check_alerts(self, provider: str, month: MonthSpend) -> None:
        if self.alerts is not None and month.budget is not None and month.alerts.thresholds:
            self.alerts.check_provider(provider, month.spent, month.budget, month.label, month.alerts)

    async def usable(self, config: Config, routes: tuple[ModelRoute, ...]) -> tuple[ModelRoute, ...]:
        """The routes whose provider may still be used this month: a `budget_action: stop`
        provider whose month has reached its budget is left out; 503 when none is left.
        Every budgeted provider's month is loaded on the way, for its alerts."""
        now = self.clock()
        kept = []
        for route in routes:
            terms = route.provider.vendor
            budget = terms.monthly_budget_nanos
            if budget is not None:
                month = await self.prepare(config, route.provider.name, now)
                if terms.stops and month.spent >= budget:
                    continue
            kept.append(route)
        if not kept:
            provider = routes[0].provider
            resets = datetime.fromtimestamp(self._months[provider.name].end, config.preferences.timezone).isoformat()
            names = ", ".join(sorted({route.provider.name for route in routes}))
            raise GatewayError(
                503,
                "api_error",
                BUDGET_EXHAUSTED,
                f"Every provider of the model '{routes[0].public_name}' has reached its monthly budget ({names}); it resets at {resets}.",
            )
        return tuple(kept) if len(kept) != len(routes) else routes

    async def refresh_forever(self) -> None:
        """Fleet mode: read every loaded month's sum again, so other instances' charges count."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            for provider, month in list(self._months.items()):
                if not month.loaded:
                    continue
                live_before = month.live_nanos
                try:
                    # The charges counted here so far must be in the figure read, or they would be
                    # dropped from it until a later read: wait until they are written.
                    await self.ledger.flush()
                    _, result = self.ledger.vendor_month(provider, month.start, month.end)
                    total = await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database away: keep counting here, read again later
                    log.debug("refreshing provider %s's vendor cost failed: %r", provider, exc)
                    continue
                if self._months.get(provider) is month:
                    month.db_nanos = total
                    month.live_nanos -= live_before  # what settled here while reading stays counted
                    self._check_alerts(provider, month)  # other instances' charges may have crossed a threshold
