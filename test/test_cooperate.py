"""Background work gives way to a busy event loop, and runs freely beside an idle one."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from core.cooperate import LoopLoad


def _samples(load: LoopLoad, seconds: float) -> list[bool]:
    """busy() as a worker thread sees it, every 20 ms for `seconds`."""
    seen: list[bool] = []
    load.busy(time.monotonic())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
        seen.append(load.busy(time.monotonic()))
    return seen


def test_the_worker_sees_a_busy_loop_as_busy_and_an_idle_one_as_idle():
    async def scenario() -> tuple[list[bool], list[bool]]:
        load = LoopLoad()  # created on the loop's thread, as the reload does
        result: dict[str, list[bool]] = {}

        worker = threading.Thread(target=lambda: result.setdefault("busy", _samples(load, 0.4)))
        worker.start()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # the loop computing: requests to serve
            sum(range(1000))
        worker.join()

        worker = threading.Thread(target=lambda: result.setdefault("idle", _samples(load, 0.4)))
        worker.start()
        await asyncio.sleep(0.5)  # the loop waiting for work
        worker.join()
        return result["busy"], result["idle"]

    busy, idle = asyncio.run(scenario())
    assert sum(busy) >= len(busy) * 0.7, busy
    assert sum(idle) <= len(idle) * 0.3, idle


def _cooperate_for(load: LoopLoad, seconds: float, measured: dict[str, float]) -> None:
    """A worker calling cooperate() in a tight loop for `seconds`; its CPU time and the share
    of the time it spent neither on a CPU nor waiting for one (asleep: resting)."""
    from core.cooperate import cooperate, cooperating

    started, cpu, (on_cpu, waiting) = time.monotonic(), time.thread_time(), _schedstat()
    with cooperating(load):
        while time.monotonic() < started + seconds:
            cooperate()
    wall, (on_cpu_after, waiting_after) = time.monotonic() - started, _schedstat()
    measured["cpu"] = time.thread_time() - cpu
    measured["asleep"] = (wall - (on_cpu_after - on_cpu) - (waiting_after - waiting)) / wall


def _schedstat() -> tuple[float, float]:
    """This thread's seconds on a CPU and waiting in the run queue for one (Linux)."""
    on_cpu, waiting, _ = Path("/proc/thread-self/schedstat").read_text().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


@pytest.mark.skipif(not Path("/proc/thread-self/schedstat").exists(), reason="needs Linux's per-thread scheduler statistics")
def test_a_worker_rests_while_the_loop_is_busy_and_runs_while_it_is_idle():
    """Shares of CPU time, not of the clock: on a machine busy with other processes both
    threads get less of the clock, and a worker's wait for a core is not a rest."""

    async def scenario() -> tuple[float, float]:
        load = LoopLoad()
        busy: dict[str, float] = {}
        loop_cpu = time.thread_time()
        worker = threading.Thread(target=_cooperate_for, args=(load, 1.0, busy))
        worker.start()
        while worker.is_alive():  # the loop computing
            sum(range(1000))
        loop_cpu = time.thread_time() - loop_cpu
        idle: dict[str, float] = {}
        worker = threading.Thread(target=_cooperate_for, args=(load, 0.4, idle))
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.05)  # the loop waiting for work
        return busy["cpu"] / (busy["cpu"] + loop_cpu), idle["asleep"]

    worker_share, asleep_beside_idle_loop = asyncio.run(scenario())
    # Without the rest the GIL splits the CPU evenly (0.43-0.51 with two busy processes
    # beside, 0.44-0.49 without); resting leaves the loop about three quarters.
    assert worker_share < 0.4, worker_share
    assert asleep_beside_idle_loop < 0.2, asleep_beside_idle_loop
