"""Upstream call timeouts with one shared ticker per event loop instead of a timer per call.

`asyncio.timeout` arms and disarms a loop timer on every call; at thousands of calls a
second that was ~2% of the gateway's CPU (bench/run.py, py-spy). Upstream timeouts are
seconds long, so checking the calls in flight every TICK_SECONDS is precise enough: a call
times out between `seconds` and `seconds + TICK_SECONDS` after it started.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from types import TracebackType

TICK_SECONDS = 0.05


class Deadline:
    """`with Deadline(seconds):` raises TimeoutError in the block once `seconds` have passed.

    Like `asyncio.timeout`, it cancels the task and turns that cancellation back into a
    TimeoutError; a cancellation from anyone else passes through unchanged.
    """

    __slots__ = ("_cancelling", "_loop", "_task", "_watch", "expired", "expires")

    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop | None = None):
        self.expires = time.monotonic() + seconds
        self.expired = False
        self._loop = loop

    def __enter__(self) -> Deadline:
        # Given the loop, asyncio need not look for the running one: in Python 3.11 that
        # lookup is a getpid() syscall, which on this VM cost 3.6% of the gateway's time
        # (py-spy --gil, bench/run.py JSON).
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._watch = _watch_for(task.get_loop())
        self._watch.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._watch.calls.pop(self, None)
        if self.expired and exc_type is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()


class _Watch:
    """The calls in flight on one loop, and the task that expires them (running only while
    there are any)."""

    __slots__ = ("__weakref__", "calls", "loop", "ticker")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.calls: dict[Deadline, None] = {}  # an ordered set
        self.ticker: asyncio.Task[None] | None = None

    def add(self, call: Deadline) -> None:
        self.calls[call] = None
        if self.ticker is None:
            self.ticker = self.loop.create_task(self._tick())

    async def _tick(self) -> None:
        try:
            while self.calls:
                await asyncio.sleep(TICK_SECONDS)
                now = time.monotonic()
                for call in [c for c in self.calls if c.expires <= now and not c.expired]:
                    call.expire()
        finally:
            self.ticker = None


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = weakref.WeakKeyDictionary()


def _watch_for(loop: asyncio.AbstractEventLoop) -> _Watch:
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _Watch(loop)
    return watch
