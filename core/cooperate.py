"""Background work in a thread that steps aside while the event loop is busy.

A config reload is pure Python for most of a second (YAML construction, validation) and
shares the GIL with the event loop: under load the loop got half the CPU and p99 latency
tripled (bench/reload_bench.py --under-load). The loop beats a pulse every PULSE_SECONDS;
while a beat is late the loop has work waiting, and the worker sleeps a moment at its next
`cooperate()` call. An idle loop beats on time, so a reload alone runs at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

PULSE_SECONDS = 0.002
LATE_SECONDS = 0.004  # a beat this late means the loop is busy
YIELD_SECONDS = 0.002

_worker = threading.local()


class LoopPulse:
    """Beats on the event loop while a worker runs; `busy()` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._last = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._beat()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def busy(self) -> bool:
        return time.monotonic() - self._last > LATE_SECONDS

    def _beat(self) -> None:
        self._last = time.monotonic()
        self._handle = self._loop.call_later(PULSE_SECONDS, self._beat)


@contextlib.contextmanager
def cooperating(pulse: LoopPulse) -> Iterator[None]:
    """Within this block, `cooperate()` in this thread yields to `pulse`'s loop when it is busy."""
    _worker.pulse = pulse
    try:
        yield
    finally:
        _worker.pulse = None


def cooperate() -> None:
    """A point where a worker may pause for the loop (a no-op outside `cooperating`)."""
    pulse: LoopPulse | None = getattr(_worker, "pulse", None)
    if pulse is not None and pulse.busy():
        time.sleep(YIELD_SECONDS)
