"""Background work gives way to a busy event loop, and runs freely beside an idle one."""

from __future__ import annotations

import asyncio
import threading
import time

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


def _time_resting(load: LoopLoad, seconds: float) -> float:
    """A worker calling cooperate() in a tight loop for `seconds`: the share of it spent resting."""
    from core.cooperate import cooperate, cooperating

    rested = 0.0
    with cooperating(load):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            before = time.monotonic()
            cooperate()
            rested += max(0.0, time.monotonic() - before - 0.0005)  # count only real pauses
    return rested / seconds


def test_a_worker_rests_while_the_loop_is_busy_and_runs_while_it_is_idle():
    async def scenario() -> tuple[float, float]:
        load = LoopLoad()
        result: dict[str, float] = {}
        worker = threading.Thread(target=lambda: result.setdefault("busy", _time_resting(load, 0.4)))
        worker.start()
        while worker.is_alive():  # the loop computing
            sum(range(1000))
        worker.join()
        worker = threading.Thread(target=lambda: result.setdefault("idle", _time_resting(load, 0.4)))
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.05)  # the loop waiting for work
        return result["busy"], result["idle"]

    busy, idle = asyncio.run(scenario())
    assert busy > 0.5, busy
    assert idle < 0.2, idle
