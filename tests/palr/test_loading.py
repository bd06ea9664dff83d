"""`in_load_thread`: a load's result or exception reaches the awaiting task; a cancelled await abandons the
thread (listed by `unfinished_loads` until it returns) instead of waiting for it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.fixtures.serving import eventually, wait_until

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
    wait_until(lambda: not unfinished_loads(), what="the load thread to end")


def test_what_an_abandoned_load_built_is_handed_to_its_cleanup():
    """A stop during the engine's build abandoned the load; the engine it then finished (its thread already
    running) was dropped, never closed: a leaked engine thread and model for the rest of the process."""
    release, closed = threading.Event(), threading.Event()

    class Engine:
        def close(self) -> None:
            closed.set()

    def build() -> Engine:
        release.wait(60)
        return Engine()

    async def scenario() -> None:
        load = asyncio.create_task(in_load_thread(build, on_abandoned=Engine.close))
        await asyncio.sleep(0.05)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        release.set()  # the build ends while the loop still runs: its engine goes to the cleanup
        await eventually(closed.is_set, what="the abandoned engine's close")

    asyncio.run(scenario())
    wait_until(lambda: not unfinished_loads(), what="the cleanup thread to end")


def test_a_stop_between_the_result_and_the_callers_wakeup_still_hands_it_to_the_cleanup():
    """The cancel landed after the result was set but before the awaiting task resumed (one loop iteration):
    the task raised CancelledError, `settle` had seen no cancel, and the engine built was never closed."""
    closed = threading.Event()

    class Engine:
        def close(self) -> None:
            closed.set()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        load = None
        call_soon_threadsafe = loop.call_soon_threadsafe

        def then_cancel(callback, *args):  # the stop's cancel right after the result's delivery, in one callback
            def deliver_then_cancel():
                callback(*args)
                load.cancel()
            return call_soon_threadsafe(deliver_then_cancel)

        loop.call_soon_threadsafe = then_cancel
        load = asyncio.create_task(in_load_thread(Engine, on_abandoned=Engine.close))
        with pytest.raises(asyncio.CancelledError):
            await load
        await eventually(closed.is_set, what="the abandoned engine's close")

    asyncio.run(scenario())
    wait_until(lambda: not unfinished_loads(), what="the cleanup thread to end")
