"""Background work in a thread that gives way while the event loop is busy.

A config reload is pure Python for most of a second (YAML construction, validation) and
shares the GIL with the event loop. Under load the loop got half the CPU while a reload ran,
and p99 latency tripled (bench/reload_bench.py --under-load).

The worker calls `cooperate()` often (every YAML scalar, every key). At most once per
SLICE_SECONDS it looks at how much CPU the event loop's thread used since the last look: a
loop that used more than BUSY_SHARE of the time has requests to serve, and the worker then
sleeps REST_SECONDS, which leaves the loop most of the CPU until the load passes. An idle
loop uses almost none, so a reload alone runs at full speed.

(An earlier version measured how late a timer on the loop fired. With the GIL changing hands
every 0.5 ms during a reload, a busy loop's timer was rarely late enough to tell, and a
tighter threshold also slowed reloads on an idle loop threefold.)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

SLICE_SECONDS = 0.001  # how often the worker looks
BUSY_SHARE = 0.3  # of one CPU, used by the loop's thread: it has work waiting
REST_SECONDS = 0.005  # the worker's pause while the loop is busy

_worker = threading.local()


class LoopLoad:
    """How busy the event loop's thread is, as seen from a worker thread.

    Create it on the loop's thread; the worker then calls `give_way()` (through cooperate())."""

    def __init__(self) -> None:
        self._cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        self._next_look = 0.0
        self._at = time.monotonic()
        self._cpu = time.clock_gettime(self._cpu_clock)

    def busy(self, now: float) -> bool:
        """Whether the loop used more than BUSY_SHARE of a CPU since the previous call."""
        cpu = time.clock_gettime(self._cpu_clock)
        share = (cpu - self._cpu) / max(now - self._at, 1e-6)
        self._at, self._cpu = now, cpu
        return share > BUSY_SHARE

    def give_way(self) -> None:
        """Rest REST_SECONDS if the loop was busy; looks at most once per SLICE_SECONDS."""
        now = time.monotonic()
        if now < self._next_look:
            return
        if self.busy(now):
            time.sleep(REST_SECONDS)
            now = time.monotonic()
            self.busy(now)  # the next look measures the loop from here, not across the rest
        self._next_look = now + SLICE_SECONDS


@contextlib.contextmanager
def cooperating(load: LoopLoad) -> Iterator[None]:
    """Within this block, `cooperate()` in this thread gives way while `load`'s loop is busy."""
    _worker.load = load
    try:
        yield
    finally:
        _worker.load = None


def cooperate() -> None:
    """A point where a worker may pause for the loop (a no-op outside `cooperating`)."""
    load: LoopLoad | None = getattr(_worker, "load", None)
    if load is not None:
        load.give_way()
