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


def test_the_candidate_screen_counts_what_only_another_tier_sends_and_drops_unsent_old_history_uncounted(caplog):
    """A stored history longer than the request's fields hold: its oldest items are not sent (retrieval_lists), so a
    retrieval tier of this very bundle may return them. They are dropped, but not counted or warned about as the
    sign of a tier of another bundle; what was sent (history, exclusions), duplicates and extras are, warned once."""
    from palr.serving.validation import MAX_ITEM_IDS
    from ranking_server.metrics import RETRIEVAL_DROPPED
    from ranking_server.planner import Plan, retrieval_lists
    from ranking_server.servicer import CandidateScreen

    history = [f"h{n}" for n in range(2 * MAX_ITEM_IDS + 5)]  # with "x" excluded, the 6 oldest fit in neither
    plan = Plan("rid", "u", history, "stored", ["x"], k=3, num_candidates=3, mode="score")
    sent_history, sent_exclude = retrieval_lists(plan)
    assert "h5" not in sent_history + sent_exclude and "h6" in sent_exclude
    counted = lambda reason: RETRIEVAL_DROPPED.labels(reason)._value.get()  # noqa: E731
    before = {r: counted(r) for r in ("history_or_excluded", "duplicate", "over_num_candidates")}
    warned: set[str] = set()
    for _ in range(2):
        screen = CandidateScreen(plan, sent_history, sent_exclude)
        kept = screen.keep([("h0", 9.0), ("a", 5.0), ("x", 4.0), ("a", 4.0), (history[-1], 3.0), ("b", 2.0),
                            ("c", 1.0), ("d", 0.5)])
        assert kept == [("a", 5.0), ("b", 2.0), ("c", 1.0)]
        with caplog.at_level("DEBUG", logger="ranking_server.servicer"):
            screen.report("rid", warned)
    assert {r: counted(r) - before[r] for r in before} == {"history_or_excluded": 4, "duplicate": 2,
                                                           "over_num_candidates": 2}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3  # one per counted reason, not per request
    assert "older than the request sent" in caplog.text
