"""Background work in a thread that gives way while the event loop is busy.

A config reload is pure Python for most of a second (YAML construction, validation) and
shares the GIL with the event loop. Under load the loop got half the CPU while a reload ran,
and p99 latency tripled (bench/reload_bench.py --under-load).

The worker calls `cooperate()` often (every YAML scalar, every key). At most once per
SLICE_SECONDS it looks at how much CPU the event loop's thread used since the last look: a
loop that took more than BUSY_SHARE of the CPU time it and the worker got has requests to
serve, and the worker then sleeps REST_SECONDS, which leaves the loop most of the CPU until
the load passes. An idle loop uses almost none, so a reload alone runs at full speed.

(The share used to be of the wall clock. On a machine whose cores other processes want too,
a loop with work waiting is on a core only part of the time: it used 15-25% of the clock and
looked idle, and the reload stopped giving way just when CPU was scarcest.)

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
BUSY_SHARE = 0.3  # of the CPU time the loop's thread and the worker got: the loop has work waiting
MIN_CPU_OF_WALL = 0.1  # a worker that mostly waits still measures the loop against this much of the clock
REST_SECONDS = 0.005  # the worker's pause while the loop is busy

_worker = threading.local()


class LoopLoad:
    """How busy the event loop's thread is, as seen from a worker thread.

    Create it on the loop's thread; the worker then calls `give_way()` (through cooperate())."""

    def __init__(self) -> None:
        self._loop_clock = time.pthread_getcpuclockid(threading.get_ident())
        self._next_look = 0.0
        self._at = time.monotonic()
        self._loop_cpu = time.clock_gettime(self._loop_clock)
        self._worker: int | None = None  # the thread that looked last, and its CPU time then
        self._worker_cpu = 0.0

    def busy(self, now: float) -> bool:
        """Whether the loop took more than BUSY_SHARE of the CPU time that it and the calling
        thread got since the previous call (the first call from a thread counts the loop's alone)."""
        loop_cpu, worker_cpu, worker = time.clock_gettime(self._loop_clock), time.thread_time(), threading.get_ident()
        used = loop_cpu - self._loop_cpu
        ran = used + (worker_cpu - self._worker_cpu if worker == self._worker else 0.0)
        # A worker that sleeps between looks gets next to no CPU: an idle loop's stray
        # microseconds must not count as a large share of that.
        share = used / max(ran, MIN_CPU_OF_WALL * (now - self._at), 1e-9)
        self._at, self._loop_cpu, self._worker, self._worker_cpu = now, loop_cpu, worker, worker_cpu
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
