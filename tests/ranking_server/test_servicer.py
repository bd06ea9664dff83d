"""The servicer's wait on the engine: its budget, and a cancel that lands as the engine answers."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ranking_server.servicer import within


async def answered_as_cancelled(wait) -> object:
    """A call whose answer and its task's cancel land in the same loop iteration (the engine's answer arrives
    with call_soon_threadsafe as gRPC cancels the handler: its client went, or the server's stop)."""
    answer = asyncio.get_running_loop().create_future()

    async def engine_call():
        return await answer

    handler = asyncio.ensure_future(wait(engine_call(), 5.0))
    await asyncio.sleep(0.01)  # the handler waits on the engine
    answer.set_result(42)
    handler.cancel()
    try:
        return await handler
    except asyncio.CancelledError:
        return "cancelled"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 has no asyncio.timeout: within() is wait_for there")
def test_a_cancel_that_lands_as_the_engine_answers_cancels_the_handler():
    """On Python 3.11 asyncio.wait_for returned the answer and swallowed the cancel: the handler went on for a
    client that had gone, and was counted OK."""
    assert asyncio.run(answered_as_cancelled(within)) == "cancelled"


def test_the_budget_cancels_the_call_and_raises_timeout():
    cancelled = []

    async def slow_call():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)  # the engine call sees its cancel: it aborts the engine request
            raise

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await within(slow_call(), 0.05)
        assert await within(asyncio.sleep(0, result="in time"), 1.0) == "in time"

    asyncio.run(scenario())
    assert cancelled == [True]


def test_the_engine_health_gauge_reads_0_while_no_engine_is_attached():
    """Loading (or detached at shutdown): no engine series at all was exported, so an alert on
    ranking_engine_healthy == 0 never fired for a replica whose engine never loaded."""
    from ranking_server.metrics import EngineCollector

    families = list(EngineCollector().collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("ranking_engine_healthy", [0.0])]
