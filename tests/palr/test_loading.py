"""`in_load_thread`: a load's result or exception reaches the awaiting task; a cancelled await abandons the
thread (listed by `unfinished_loads` until it returns) instead of waiting for it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from palr.serving.loading import in_load_thread, unfinished_loads


def test_the_result_and_the_exception_of_a_load_reach_the_caller():
    def fail() -> None:
        raise OSError("weights are missing")

    async def scenario():
        assert await in_load_thread(sum, [1, 2, 3]) == 6
        with pytest.raises(OSError, match="weights are missing"):
            await in_load_thread(fail)

    asyncio.run(scenario())
    assert unfinished_loads() == []


def test_a_cancelled_load_is_abandoned_not_waited_for():
    release = threading.Event()

    def slow_load() -> str:
        release.wait(60)
        return "model"

    async def scenario() -> None:
        load = asyncio.create_task(in_load_thread(slow_load))
        await asyncio.sleep(0.05)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load

    asyncio.run(scenario())  # returns at once: the loop does not join the load thread
    assert unfinished_loads() == ["load-slow_load"]
    release.set()  # it finishes after its loop has closed: its outcome is dropped, quietly
    for _ in range(100):
        if not unfinished_loads():
            break
        threading.Event().wait(0.05)
    assert unfinished_loads() == []
