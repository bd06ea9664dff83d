"""The micro-batcher and the direct runner on a real (pure Python) batch function: batch sizes,
result routing, failures and cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from retrieval_server.batcher import DirectRunner, MicroBatcher, RunnerStopped


class Squares:
    """A batch function that remembers its batches and the threads it ran on."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, items):
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.fail_on in items:
            raise ValueError(f"cannot square {self.fail_on}")
        return [x * x for x in items]


async def _submit_all(runner, items):
    runner.start()
    try:
        return await asyncio.gather(*(runner.submit(x) for x in items), return_exceptions=True)
    finally:
        await runner.close()


def test_concurrent_submissions_share_calls_up_to_the_max_batch_size_and_get_their_own_results():
    fn = Squares()
    results = asyncio.run(_submit_all(MicroBatcher(fn, max_batch_size=4, window_s=0.05), range(10)))
    assert results == [x * x for x in range(10)]
    assert [len(b) for b in fn.batches] == [4, 4, 2]
    assert sorted(x for b in fn.batches for x in b) == list(range(10))
    assert fn.threads == {"micro-batcher_0"}  # off the event loop's thread


def test_without_a_window_it_takes_what_has_queued_and_does_not_wait_for_more():
    fn = Squares()

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=32, window_s=0.0)
        batcher.start()
        try:
            together = await asyncio.gather(*(batcher.submit(x) for x in range(5)))  # queued before it woke
            alone = await batcher.submit(7)  # a full window would be 32 requests: it does not wait
            return together, alone
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) == ([x * x for x in range(5)], 49)
    assert fn.batches == [[0, 1, 2, 3, 4], [7]]


def test_a_failed_batch_fails_its_callers_only_and_the_batcher_goes_on():
    fn = Squares(fail_on=2)

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=4, window_s=0.05)
        batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit(x) for x in range(4)), return_exceptions=True)
            second = await asyncio.gather(*(batcher.submit(x) for x in (5, 6)))
            return first, second
        finally:
            await batcher.close()

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == [25, 36]


def test_a_cancelled_submission_leaves_the_others_alone():
    fn = Squares()

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=8, window_s=0.1)
        batcher.start()
        try:
            doomed = asyncio.ensure_future(batcher.submit(100))
            kept = [asyncio.ensure_future(batcher.submit(x)) for x in (1, 2)]
            await asyncio.sleep(0.01)
            doomed.cancel()
            return await asyncio.gather(*kept)
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) == [1, 4]
    assert 100 not in [x for b in fn.batches for x in b]


def test_close_fails_the_batch_that_is_running_instead_of_leaving_its_callers_waiting():
    """close() cancels the loop while a call runs: that batch's callers get RunnerStopped, not a wait forever."""
    gate = threading.Event()

    def held(items):
        gate.wait(5)
        return list(items)

    async def scenario():
        batcher = MicroBatcher(held, max_batch_size=4)
        batcher.start()
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # its call holds the worker
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        with pytest.raises(RunnerStopped):
            await asyncio.wait_for(running, 5)
        with pytest.raises(RunnerStopped):
            await batcher.submit(2)

    asyncio.run(scenario())


def test_direct_runner_makes_one_call_per_request():
    fn = Squares()
    results = asyncio.run(_submit_all(DirectRunner(fn, workers=2), range(6)))
    assert results == [x * x for x in range(6)]
    assert sorted(fn.batches) == [[x] for x in range(6)]


@pytest.mark.parametrize("runner", [MicroBatcher, DirectRunner])
def test_nothing_is_lost_under_many_concurrent_submissions(runner):
    fn = Squares()
    make = (lambda: MicroBatcher(fn, max_batch_size=16)) if runner is MicroBatcher else (lambda: DirectRunner(fn, 2))
    assert asyncio.run(_submit_all(make(), range(500))) == [x * x for x in range(500)]


def test_requests_cancelled_while_queued_take_no_place_in_a_batch():
    """Two of six queued requests are cancelled (their deadlines passed) while a call runs: the next call takes
    four live requests, not four entries of which two are dead."""
    gate, batches = threading.Event(), []

    def held(items):
        batches.append(list(items))
        gate.wait(5)
        return [x * x for x in items]

    async def scenario():
        batcher = MicroBatcher(held, max_batch_size=4)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(0))
            await asyncio.sleep(0.05)  # the first call is running and holds the worker
            queued = [asyncio.create_task(batcher.submit(x)) for x in range(1, 7)]
            await asyncio.sleep(0.01)
            queued[0].cancel()
            queued[1].cancel()
            gate.set()
            return await asyncio.gather(first, *queued[2:])
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) == [0, 9, 16, 25, 36]
    assert batches == [[0], [3, 4, 5, 6]]


def test_a_dead_batch_loop_fails_waiting_requests_instead_of_leaving_them_hanging(caplog):
    """A bug inside the loop itself (not in the batch function, whose errors go to its callers) ends the loop:
    the waiting request fails at once with the reason in the log, later ones are refused, close() still works."""
    async def broken_next_batch():
        await asyncio.sleep(0.05)  # the request below is waiting by then
        raise KeyError("a bug")

    async def scenario():
        batcher = MicroBatcher(Squares(), max_batch_size=4)
        batcher._next_batch = broken_next_batch
        batcher.start()
        try:
            with pytest.raises(RunnerStopped, match="micro-batcher stopped"):
                await asyncio.wait_for(batcher.submit(1), 2)
            with pytest.raises(RunnerStopped, match="micro-batcher stopped: KeyError"):
                await batcher.submit(2)
        finally:
            await batcher.close()

    with caplog.at_level("ERROR", logger="retrieval_server.batcher"):
        asyncio.run(scenario())
    assert "micro-batcher stopped" in caplog.text


def test_requests_cancelled_while_queued_do_not_fill_a_batch():
    """Three requests queue and are cancelled; then A and B, a batch of two (the window is long: only a full batch
    ends it early): A and B run together, not A alone because three dead entries made the batch look full."""
    fn = Squares()

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=2, window_s=30.0)
        batcher.start()
        try:
            gone = [asyncio.ensure_future(batcher.submit(x)) for x in (100, 101, 102)]
            await asyncio.sleep(0)
            for task in gone:
                task.cancel()
            await asyncio.gather(*gone, return_exceptions=True)
            return await asyncio.wait_for(asyncio.gather(batcher.submit(2), batcher.submit(3)), 10)
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) == [4, 9]
    assert [b for b in fn.batches if 2 in b or 3 in b] == [[2, 3]]


def test_a_requests_deadline_ends_the_window_early_enough_for_its_call():
    """A 30 s window waits for more requests, but not past a waiting request's deadline less twice the last call's
    duration (0.5 s here): the batch starts by then and answers it in time, taking the others waiting with it."""
    import time

    starts: list[float] = []

    def slow_squares(items):
        starts.append(time.monotonic())
        time.sleep(0.5)
        return [x * x for x in items]

    async def scenario():
        batcher = MicroBatcher(slow_squares, max_batch_size=8, window_s=30.0)
        batcher.start()
        try:
            assert await batcher.submit(3, deadline=time.monotonic()) == 9  # no wait; it measures a 0.5 s call
            first = asyncio.ensure_future(batcher.submit(1))  # no deadline: would wait out the 30 s window
            await asyncio.sleep(0.05)
            deadline = time.monotonic() + 2.0
            second = await batcher.submit(2, deadline=deadline)
            return deadline, await first, second, time.monotonic()
        finally:
            await batcher.close()

    deadline, first, second, answered = asyncio.run(scenario())
    assert (first, second) == (1, 4) and answered <= deadline
    assert len(starts) == 2 and starts[1] <= deadline - 0.8  # the window closed ~1 s before the deadline


def test_the_direct_runner_takes_a_deadline_and_ignores_it():
    assert asyncio.run(_submit_all(DirectRunner(Squares()), [2])) == [4]
    runner = DirectRunner(Squares())

    async def one():
        try:
            return await runner.submit(3, deadline=0.0)
        finally:
            await runner.close()
    assert asyncio.run(one()) == 9


class Compared:
    """A request that counts how often it is compared by value (a real Query compares its whole history)."""

    comparisons = 0

    def __init__(self, value: int):
        self.value = value

    def __eq__(self, other):
        Compared.comparisons += 1
        return isinstance(other, Compared) and other.value == self.value

    __hash__ = None


def test_a_cancel_takes_its_own_entry_out_of_the_queue_without_comparing_the_requests_ahead_of_it():
    """Under overload, newer callers give up first: each cancel found its entry with `deque.remove`, which compared
    every request queued ahead of it by value (whole histories, on the event loop). Now by identity: equal requests
    queued ahead are not compared, stay queued and are answered; the cancelled one is not run."""
    gate = threading.Event()
    batches = []

    def held(items):
        batches.append([item.value for item in items])
        gate.wait(5)
        return [item.value for item in items]

    async def scenario():
        batcher = MicroBatcher(held, max_batch_size=8)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(Compared(0)))
            await asyncio.sleep(0.05)  # the first call holds the worker
            queued = [asyncio.create_task(batcher.submit(Compared(7))) for _ in range(5)]  # equal requests
            await asyncio.sleep(0.01)
            Compared.comparisons = 0
            queued[-1].cancel()
            await asyncio.gather(queued[-1], return_exceptions=True)
            compared = Compared.comparisons
            gate.set()
            return compared, await asyncio.gather(first, *queued[:-1])
        finally:
            await batcher.close()

    compared, answers = asyncio.run(scenario())
    assert compared == 0
    assert answers == [0, 7, 7, 7, 7]
    assert batches == [[0], [7, 7, 7, 7]]
