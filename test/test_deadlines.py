"""Deadline: the shared-ticker timeout used for upstream calls."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.deadlines import TICK_SECONDS, Deadline


@pytest.mark.parametrize("loop_given", [False, True], ids=["loop looked up", "loop given"])
def test_a_call_past_its_deadline_raises_timeout_error_soon_after(loop_given):
    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with Deadline(0.2, asyncio.get_running_loop() if loop_given else None):
                await asyncio.sleep(10)
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert 0.2 <= elapsed < 0.2 + TICK_SECONDS + 1.0  # (slack for a busy CI machine)


def test_a_call_within_its_deadline_is_untouched_and_not_cancelled_later():
    async def scenario() -> str:
        with Deadline(0.2):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # past the deadline, outside the block: nothing happens
        return "done"

    assert asyncio.run(scenario()) == "done"


def test_an_outside_cancellation_is_not_turned_into_a_timeout():
    async def scenario() -> None:
        async def call() -> None:
            with Deadline(10):
                await asyncio.sleep(10)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_many_calls_expire_independently():
    async def scenario() -> list[str]:
        async def call(seconds: float, work: float) -> str:
            try:
                with Deadline(seconds):
                    await asyncio.sleep(work)
                return "ok"
            except TimeoutError:
                return "timeout"

        return await asyncio.gather(call(0.1, 1), call(1, 0.05), call(0.2, 0.5), call(5, 0.3))

    assert asyncio.run(scenario()) == ["timeout", "ok", "timeout", "ok"]


def test_each_event_loop_gets_its_own_ticker():
    for _ in range(2):  # a second loop after the first has closed still times calls out

        async def scenario() -> None:
            with pytest.raises(TimeoutError):
                with Deadline(0.05):
                    await asyncio.sleep(5)

        asyncio.run(scenario())
