"""Threshold alerts: when a key's credits, count credits, quota or a period budget crosses
a configured fraction, record an event and POST it to the webhook, once per crossing. A
provider's monthly vendor budget (core/vendors) is watched the same way, under the id
`provider:NAME`, once per crossing per month.

Checking is synchronous and cheap (it runs right after settlement); recording and delivery
happen in the ledger's write order and a background task, never on the request's path. A
top-up that lifts a key back under a threshold re-arms it; a new budget period is a new
metric and starts armed.

The database, not a process's memory, decides, so that a fleet sharing one ledger fires and
delivers once (each process's `_fired` only spares it needless writes):
- A crossing is recorded by whoever inserts its `alert_fired` row (ON CONFLICT DO NOTHING);
  only that insert adds the event, in the same transaction. Re-arming deletes the row only
  when it was fired against a lower limit (a top-up or a raised limit since) or before the
  key's billing window began: a process whose view of the key lags behind (its last charges
  not yet written, another's not yet read) must not re-arm what another just fired.
- A delivery is claimed (`claimed_at`, renewed at every attempt) by the process sending it;
  a claim not renewed for CLAIM_SECONDS is a dead process's and may be taken over. Every
  process queues what is owed when it starts, and in a fleet looks every SWEEP_SECONDS for
  deliveries nobody is sending; the claim makes sure one of them sends each. A process that
  dies after the webhook answered but before it wrote "sent" leaves it to be sent again.
  With one process per ledger file, every claim found at start is a previous run's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosqlite

from core.config import ApiKey
from core.config.billing import KeyBilling
from core.config.limits import AlertSettings
from core.ledger import Account, Ledger
from core.limits import Limiter
from core.money_format import count_text, usd_text
from core.pricing import format_usd

log = logging.getLogger("tollgate.alerts")

DELIVERY_ATTEMPTS = 5
FIRST_RETRY_SECONDS = 1.0
DELIVERY_TIMEOUT = 10.0
CLAIM_SECONDS = 60.0  # a delivery claim not renewed for this long (attempts renew it) was a dead process's
SWEEP_SECONDS = 30.0
PROVIDER_ID_PREFIX = "provider:"  # alert rows of a provider's budget: key_id `provider:NAME`, key_name NAME
PROVIDER_BUDGET = "provider_monthly_budget"


@dataclass(frozen=True, slots=True)
class Reading:
    """One watched quantity of a key: how much of `limit` is used."""

    metric: str
    used: int
    limit: int
    unit: str  # "usd" (nanos) or "count"/"tokens"
    armed_as: str = ""  # the crossing's identity when not the metric (a provider's budget month)

    @property
    def crossing(self) -> str:
        return self.armed_as or self.metric

    def shown(self, value: int) -> str:
        """As stored and sent to webhooks: a plain decimal (`0.06`) or a whole number."""
        return format_usd(value) if self.unit == "usd" else str(value)

    def text(self, value: int) -> str:
        """As people read it (the log): `$0.06`, `1,000`."""
        return usd_text(value) if self.unit == "usd" else count_text(value)


def readings(key: ApiKey, account: Account, limiter: Limiter) -> list[Reading]:
    terms, limits = key.billing, key.limits
    out = []
    if account.owner is not None:  # a key in an account: the balance is the account's, watched as its alerts
        terms = KeyBilling(terms.mode, None, 0)
    if terms.credits_nanos is not None:
        given = terms.credits_nanos + account.granted_nanos
        if given > 0:
            out.append(Reading("credits", given - (account.remaining_nanos(terms) or 0), given, "usd"))
    given_count = terms.count_credits + account.count_granted
    if given_count > 0:
        out.append(Reading("count_credits", given_count - account.remaining_count(terms), given_count, "count"))
    if limits.quota:
        out.append(Reading("quota", Limiter.quota_used(key, account), limits.quota, "tokens" if limits.quota_type == "tokens" else "usd"))
    state = limiter.state(key)
    for limit in limits.period_limits:
        spend = state.periods.get(limit.name)
        if spend is not None and spend.ready is not None and spend.ready.done() and spend.ready.exception() is None:
            out.append(Reading(f"{limit.name}:{datetime.fromtimestamp(spend.start, UTC).date().isoformat()}", spend.spent, limit.limit_nanos, "usd"))
    return out


@dataclass(frozen=True, slots=True)
class Watched:
    """Whose readings an alert is about: a key (an account), or a provider's monthly budget."""

    id: str  # alert rows' key_id: the key's ledger id, or `provider:NAME`
    name: str
    shown: str  # as the log names it (a key's masked secret)
    webhook_url: str | None
    window_start: float = 0.0  # a crossing fired before this was another billing window's

    @classmethod
    def key(cls, key: ApiKey) -> Watched:
        return cls(key.id, key.name, f"key {key.masked}", key.limits.alerts.webhook_url, key.billing.created_at)


class Alerts:
    def __init__(self, ledger: Ledger, limiter: Limiter, clock: Callable[[], float], http: Callable[[], aiohttp.ClientSession]):
        self.ledger = ledger
        self.limiter = limiter
        self.clock = clock
        self.http = http
        self.retry_seconds = FIRST_RETRY_SECONDS
        self._fired: dict[str, set[tuple[str, float]]] = {}
        self._deliveries: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()  # what `_deliveries` holds (a sweep finds it again)
        self.on_fired: Callable[[str], None] = lambda metric: None  # told of each crossing this process recorded

    async def load(self) -> None:
        """Which crossings have fired (survives restarts), and deliveries still owed."""

        async def read(db: aiosqlite.Connection) -> tuple[list[Any], list[Any]]:
            async with db.execute("SELECT key_id, metric, threshold FROM alert_fired") as cursor:
                fired = list(await cursor.fetchall())
            async with db.execute("SELECT id FROM alert_events WHERE status = 'pending' ORDER BY id") as cursor:
                pending = list(await cursor.fetchall())
            return fired, pending

        _, result = self.ledger.query_in_order(read)
        fired, pending = await result
        for key_id, metric, threshold in fired:
            self._fired.setdefault(key_id, set()).add((metric, threshold))
        for (event_id,) in pending:
            self._queue(event_id)

    def check(self, key: ApiKey, account: Account) -> None:
        """Compare the key's readings with its thresholds; fire new crossings, re-arm cleared ones."""
        thresholds = key.limits.alerts.thresholds
        if thresholds:
            self._compare(Watched.key(key), readings(key, account, self.limiter), thresholds)

    def check_provider(self, provider: str, spent: int, budget: int, month: str, settings: AlertSettings) -> None:
        """A provider's vendor cost this month (`month`: YYYY-MM) against its `monthly_budget`,
        at `preferences.alerts`' thresholds and webhook: a new month starts armed."""
        if settings.thresholds:
            watched = Watched(f"{PROVIDER_ID_PREFIX}{provider}", provider, f"provider {provider}", settings.webhook_url)
            reading = Reading(PROVIDER_BUDGET, spent, budget, "usd", f"{PROVIDER_BUDGET}:{month}")
            self._compare(watched, [reading], settings.thresholds)

    def _compare(self, watched: Watched, current: list[Reading], thresholds: tuple[float, ...]) -> None:
        fired = self._fired.setdefault(watched.id, set())
        for reading in current:
            fraction = Decimal(reading.used) / Decimal(reading.limit)
            for threshold in thresholds:
                crossed = fraction >= Decimal(str(threshold))
                armed = (reading.crossing, threshold) not in fired
                if crossed and armed:
                    fired.add((reading.crossing, threshold))
                    self._record(watched, reading, threshold)
                elif not crossed and not armed:
                    fired.discard((reading.crossing, threshold))
                    self._rearm(watched, reading, threshold)

    def _record(self, watched: Watched, reading: Reading, threshold: float) -> None:
        """Record the crossing unless another process did (then this one only remembers it)."""
        now = self.clock()
        url = watched.webhook_url
        event = (
            watched.id,
            watched.name,
            reading.metric,
            threshold,
            reading.shown(reading.used),
            reading.shown(reading.limit),
            now,
            url,
            "pending" if url else "recorded",
        )

        async def write(db: aiosqlite.Connection) -> int | None:
            async with db.execute(
                "INSERT INTO alert_fired (key_id, metric, threshold, fired_at, fired_limit) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key_id, metric, threshold) DO NOTHING RETURNING fired_at",
                (watched.id, reading.crossing, threshold, now, reading.limit),
            ) as cursor:
                if await cursor.fetchone() is None:
                    return None
            async with db.execute(
                "INSERT INTO alert_events (key_id, key_name, metric, threshold, used, limit_value, ts, webhook_url, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                event,
            ) as cursor:
                row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        def recorded(done: asyncio.Future[int | None]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.error("alert for %s %s not recorded: %r", watched.shown, reading.metric, None if done.cancelled() else done.exception())
                return
            event_id = done.result()
            if event_id is None:
                return  # another process fired this crossing
            self.on_fired(reading.metric)
            log.info(
                "alert: %s %s crossed %.0f%% (%s of %s)",
                watched.shown,
                reading.metric,
                threshold * 100,
                reading.text(reading.used),
                reading.text(reading.limit),
            )
            if url:
                self._queue(event_id)

        _, done = self.ledger.query_in_order(write)
        done.add_done_callback(recorded)

    def _rearm(self, watched: Watched, reading: Reading, threshold: float) -> None:
        """Forget the crossing if the key really is back under it (see the module's docstring)."""

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM alert_fired WHERE key_id = ? AND metric = ? AND threshold = ? AND (fired_limit < ? OR fired_at < ?)",
                (watched.id, reading.crossing, threshold, reading.limit, watched.window_start),
            )

        _, done = self.ledger.query_in_order(write)
        done.add_done_callback(_log_failure)

    def _queue(self, event_id: int) -> None:
        if event_id not in self._queued:
            self._queued.add(event_id)
            self._deliveries.put_nowait(event_id)

    async def deliver_forever(self) -> None:
        """The background sender: one delivery at a time, each retried with backoff (and, in a
        fleet, a sweep for deliveries whose sender died)."""
        sweeper = asyncio.create_task(self._sweep_forever()) if self.ledger.shared else None
        try:
            while True:
                event_id = await self._deliveries.get()
                try:
                    await self._deliver(event_id)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let one event stop the sender
                    log.exception("alert delivery %d failed unexpectedly", event_id)
                finally:
                    self._queued.discard(event_id)
        finally:
            if sweeper is not None:
                sweeper.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                for event_id in await self._unsent():
                    self._queue(event_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: the next sweep tries again
                log.warning("looking for alert deliveries nobody is sending failed: %r", exc)

    async def _unsent(self) -> list[int]:
        """Deliveries owed whose claim is stale, or that nobody claimed for as long (their
        recorder may have died before it claimed them)."""
        stale = self.clock() - CLAIM_SECONDS

        async def read(db: aiosqlite.Connection) -> list[int]:
            async with db.execute("SELECT id FROM alert_events WHERE status = 'pending' AND COALESCE(claimed_at, ts) < ? ORDER BY id", (stale,)) as cursor:
                return [int(row[0]) for row in await cursor.fetchall()]

        _, result = self.ledger.query_in_order(read)
        return await result

    async def _deliver(self, event_id: int) -> None:
        claim = await self._claim(event_id)
        if claim is None:
            return  # sent, failed, or being sent by another process
        claimed_at, row = claim
        key_id, key_name, metric, threshold, used, limit_value, ts, url, attempts = row
        if not url:
            return
        whose = {"provider": key_name} if key_id.startswith(PROVIDER_ID_PREFIX) else {"key_id": key_id, "key_name": key_name}
        payload = {
            "event": "threshold_crossed",
            "id": event_id,
            **whose,
            "metric": metric,
            "threshold": threshold,
            "used": used,
            "limit": limit_value,
            "time": datetime.fromtimestamp(ts, UTC).isoformat(),
        }
        delay = self.retry_seconds
        error = None
        while attempts < DELIVERY_ATTEMPTS:
            attempts += 1
            try:
                async with self.http().post(
                    url, data=json.dumps(payload), headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
                ) as response:
                    if response.status < 300:
                        await self._set_status(event_id, claimed_at, "sent", attempts, None)
                        return
                    error = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            renewed = await self._set_status(event_id, claimed_at, "pending", attempts, error)
            if renewed is None:
                log.warning("alert %d was taken over by another process (this one seemed stopped); it sends it", event_id)
                return
            claimed_at = renewed
            if attempts < DELIVERY_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        # The host only: webhook URLs often carry a secret token in their path or query.
        log.warning("alert %d to %s failed after %d attempts: %s", event_id, urlsplit(url).hostname, attempts, error)
        await self._set_status(event_id, claimed_at, "failed", attempts, error)

    async def _claim(self, event_id: int) -> tuple[float, Any] | None:
        """Take the event for sending if it is owed and nobody (alive) is sending it: the time
        of the claim and the event, or None."""
        now = self.clock()
        stale = now - CLAIM_SECONDS if self.ledger.shared else math.inf  # alone: any claim is a previous run's

        async def write(db: aiosqlite.Connection) -> Any:
            async with db.execute(
                "UPDATE alert_events SET claimed_at = ? WHERE id = ? AND status = 'pending' AND (claimed_at IS NULL OR claimed_at < ?)"
                " RETURNING key_id, key_name, metric, threshold, used, limit_value, ts, webhook_url, attempts",
                (now, event_id, stale),
            ) as cursor:
                return await cursor.fetchone()

        _, result = self.ledger.query_in_order(write)
        row = await result
        return None if row is None else (now, row)

    async def _set_status(self, event_id: int, claimed_at: float, status: str, attempts: int, error: str | None) -> float | None:
        """Write how the delivery went and renew the claim; None when the claim was lost."""
        now = self.clock()

        async def write(db: aiosqlite.Connection) -> Any:
            async with db.execute(
                "UPDATE alert_events SET status = ?, attempts = ?, last_error = ?, claimed_at = ? WHERE id = ? AND claimed_at = ? RETURNING id",
                (status, attempts, error, now, event_id, claimed_at),
            ) as cursor:
                return await cursor.fetchone()

        _, done = self.ledger.query_in_order(write)
        return None if await done is None else now


def _log_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("alert re-arm not written: %r", done.exception())


async def recent_alerts(ledger: Ledger, key_id: str | None, limit: int = 20, providers: bool = False) -> list[dict[str, Any]]:
    """The newest alerts: of one key (`key_id`), of providers' budgets (`providers`), or all."""
    await ledger.flush()
    sql = "SELECT ts, key_id, key_name, metric, threshold, used, limit_value, status, attempts, last_error FROM alert_events"
    params: list[Any] = []
    if key_id is not None:
        sql += " WHERE key_id = ?"
        params.append(key_id)
    elif providers:
        sql += " WHERE key_id LIKE ?"  # no key id has a colon (core.config.KEY_ID)
        params.append(PROVIDER_ID_PREFIX + "%")
    async with ledger.reader.execute(sql + " ORDER BY ts DESC, id DESC LIMIT ?", [*params, limit]) as cursor:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
