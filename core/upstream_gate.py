"""Per-provider connection limits: `providers[].preferences.max_connections`.

The one upstream HTTP session sets no ceiling of its own (core/upstream.py), so a vendor
sees as many calls at once as clients send. An operator whose vendor allows only so many
(a concurrency quota, a self-hosted model's batch size) sets `max_connections` on it. A call
holds one of the provider's slots for as long as it runs: a reply until it has been read, a
stream until it ends (MeteredStream.finish). A request that finds none free waits its turn,
first come first served, up to `max_connections_wait` seconds; then it fails as a provider
that could not be reached does (the next route, else 503 `upstream_busy`), except that the
provider is not cooled down: it is busy, not failing.

The counts are kept per provider *name* in a `Lane`, so they survive config reloads; the
limit is the one of the Provider the request holds, read when it asks for a slot, and each
reload hands every lane its new limit (UpstreamGate.reconfigure). A provider
without a limit (the default) costs a dict lookup and an integer increment per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

from core.config import Provider
from core.errors import GatewayError
from core.providers.base import UpstreamFailure

log = logging.getLogger("tollgate.upstream")

# The client's ASGI `receive`: while a request waits for a slot it is watched for the client
# hanging up (its body has been read, so the next message is `http.disconnect`).
ClientMessages = Callable[[], Awaitable[MutableMapping[str, Any]]]
REPORT_EVERY = 60.0  # seconds between the log lines of a provider that stays at its limit


class UpstreamBusy(UpstreamFailure):
    """No slot of the provider came free within its max_connections_wait: 503 `upstream_busy`,
    retryable (the next route may serve)."""

    def __init__(self, provider: Provider):
        message = (
            f"Provider '{provider.name}' is at its max_connections of {provider.max_connections}"
            f" and no call to it ended within the {provider.max_connections_wait:g}s wait (max_connections_wait)."
        )
        super().__init__(GatewayError(503, "api_error", "upstream_busy", message), retryable=True)


class ClientLeft(Exception):
    """The client hung up while its request waited for a slot: there is no one to answer."""


class Lane:
    """One provider's calls in flight and the requests queued for a slot, oldest first."""

    __slots__ = ("_loop", "_queue", "_refused", "_report", "_served", "in_flight", "limit", "name")

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop):
        self.name = name
        self.in_flight = 0
        self.limit: int | None = None  # the last limit a request brought (what wakes the queue)
        self._loop = loop
        # An OrderedDict, not a deque: a waiter that gives up leaves from the middle in O(1).
        self._queue: OrderedDict[asyncio.Future[None], None] = OrderedDict()
        self._report: asyncio.TimerHandle | None = None  # the next log line, while at the limit
        self._served = self._refused = 0  # since the last log line

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def take(self, limit: int | None) -> bool:
        """A slot now, if one is free and nobody queued first; False: `wait` for one."""
        if limit is None:
            self.in_flight += 1
            if self._queue:  # a reload removed the limit: the queued go too
                self.set_limit(None)
            return True
        if limit != self.limit:
            self.set_limit(limit)
        if self.in_flight < limit and not self._queue:
            self.in_flight += 1
            return True
        return False

    def leave(self) -> None:
        """A call ended: its slot goes to the oldest waiter, if the limit lets one in."""
        self.in_flight -= 1
        if self._queue:
            self._wake()

    async def wait(self, provider: Provider, client: ClientMessages | None) -> None:
        """Queue for a slot (held on return). UpstreamBusy past `max_connections_wait`,
        ClientLeft if `client` hangs up; then, as when cancelled, no slot is held."""
        self._met_limit(provider)
        if provider.max_connections_wait <= 0:
            self._refused += 1
            raise UpstreamBusy(provider)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._queue[waiter] = None
        expiry = self._loop.call_later(provider.max_connections_wait, _fail, waiter, UpstreamBusy, provider)
        watcher = self._loop.create_task(_until_gone(client, waiter)) if client is not None else None
        try:
            await waiter
        except BaseException as exc:
            self._give_up(waiter)
            if isinstance(exc, UpstreamBusy):
                self._refused += 1
            raise
        finally:
            expiry.cancel()
            if watcher is not None:
                watcher.cancel()
        self._served += 1

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        if waiter in self._queue:  # never handed a slot: it only leaves the queue
            del self._queue[waiter]
        elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.leave()  # handed a slot just as it was cancelled: passed on, never kept

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        if self._queue:
            self._wake()

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters (those given up on are dropped on the way)."""
        queue, limit = self._queue, self.limit
        while queue and (limit is None or self.in_flight < limit):
            waiter, _ = queue.popitem(last=False)
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _met_limit(self, provider: Provider) -> None:
        """A request found the provider full: said at once, then once a minute while it lasts."""
        if self._report is not None:
            return
        log.warning(
            "provider '%s' reached max_connections %s: requests wait for a slot up to %gs (max_connections_wait), then 503 upstream_busy",
            self.name,
            provider.max_connections,
            provider.max_connections_wait,
        )
        self._report = self._loop.call_later(REPORT_EVERY, self.report)

    def report(self) -> None:
        """The minute's log line, with exact counts; a quiet minute ends the reports (the next
        request that finds the provider full starts them again)."""
        served, refused, waiting = self._served, self._refused, len(self._queue)
        self._served = self._refused = 0
        if not (served or refused or waiting):
            self._report = None
            return
        log.warning(
            "provider '%s' is at max_connections %s; in the last minute: %d waited and got a slot, %d refused with 503 upstream_busy; %d waiting now",
            self.name,
            self.limit,
            served,
            refused,
            waiting,
        )
        self._report = self._loop.call_later(REPORT_EVERY, self.report)


class Connections(NamedTuple):
    """A provider's calls in this process, for the Providers page and its API: in flight, its
    max_connections (None: unlimited), and requests waiting for a slot."""

    in_flight: int
    limit: int | None
    waiting: int

    @property
    def full(self) -> bool:
        return self.limit is not None and self.in_flight >= self.limit


class UpstreamGate(dict[str, Lane]):
    """Every provider's lane, by provider name, made on first use (`gate[name]`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.loop = loop

    def __missing__(self, name: str) -> Lane:
        lane = self[name] = Lane(name, self.loop)
        return lane

    def reconfigure(self, providers: Iterable[Provider]) -> None:
        """A reload: each lane takes its provider's new limit at once (a raised or removed one
        lets the waiting in now, not at the next request); a provider gone has no limit."""
        limits = {provider.name: provider.max_connections for provider in providers}
        for name, lane in self.items():
            lane.set_limit(limits.get(name))

    def connections(self, providers: Iterable[Provider]) -> dict[str, Connections]:
        """Each provider's calls in flight, limit and waiting requests, now (no lane is made)."""
        found = {}
        for provider in providers:
            lane = self.get(provider.name)
            found[provider.name] = Connections(lane.in_flight if lane else 0, provider.max_connections, lane.waiting if lane else 0)
        return found

    @contextlib.asynccontextmanager
    async def slot(self, provider: Provider) -> AsyncIterator[None]:
        """One of the provider's slots for the block; UpstreamBusy past its wait. For the calls
        off the hot path (token counts, stored responses): proxied requests take theirs in
        place (core/proxy.py), without this wrapper's objects."""
        lane = self[provider.name]
        if not lane.take(provider.max_connections):
            await lane.wait(provider, None)
        try:
            yield
        finally:
            lane.leave()


def _fail(waiter: asyncio.Future[None], error: Callable[..., BaseException], *args: Any) -> None:
    if not waiter.done():
        waiter.set_exception(error(*args))


async def _until_gone(client: ClientMessages, waiter: asyncio.Future[None]) -> None:
    """Fail the waiter when the client hangs up (or its channel breaks: no one to answer)."""
    try:
        while (await client())["type"] != "http.disconnect":
            pass
    except Exception:
        pass
    _fail(waiter, ClientLeft)
