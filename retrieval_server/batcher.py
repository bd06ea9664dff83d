"""How concurrent requests reach a blocking batch function (ONNX Runtime) from the event loop.

Two runners with the same interface (`start`, `await submit(item, deadline)`, `close`):

- `MicroBatcher` keeps one call in flight; requests that arrive meanwhile queue up and go
  together in the next call (up to `max_batch_size`; optionally waiting `window_s` for more, but
  never past the moment a waiting request's deadline needs its call to start).
  With window 0 it adds no latency when idle and batches exactly when the machine is busy.
- `DirectRunner` makes one call per request, `workers` of them at a time.

Both run the function in their own worker threads, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
BatchFn = Callable[[Sequence[Item]], Sequence[Result]]
DEADLINE_RESERVE_S = 0.05  # the least a deadline's window keeps back for its call and the answer's way back


class RunnerStopped(RuntimeError):
    """This replica cannot run the model: the runner is not running (its loop died, or it is closing; the request
    was not run), or the model has failed call after call (it was, and failed). Either way another replica can take
    the request as it is."""


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: BatchFn, max_batch_size: int, window_s: float = 0.0,
                 on_stopped: Callable[[str], None] | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.on_stopped = on_stopped  # called with the reason if the loop dies (the server turns NOT_SERVING)
        # (item, its caller's future, time.monotonic() by which the caller needs the answer: inf without a deadline)
        self._pending: collections.deque[tuple[Item, asyncio.Future, float]] = collections.deque()
        self._call_s = 0.0  # how long the last call took (a deadline's call starts twice that before it)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="micro-batcher")
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: list[tuple[Item, asyncio.Future, float]] = []  # the batch in the worker now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop only ends by `close`; if it died, say so and fail the waiting requests (they would
        otherwise wait for their deadlines, or forever)."""
        if task.cancelled() or task.exception() is None:
            return
        reason = self._stop_reason()
        log.error("%s; requests fail until the server restarts", reason)
        self._fail_pending(RunnerStopped(reason))
        if self.on_stopped is not None:
            self.on_stopped(reason)

    def _stop_reason(self) -> str:
        """Why the loop (done) no longer runs: the exception it died of, or a close."""
        if self._task.cancelled() or self._task.exception() is None:
            return "micro-batcher is closed"
        return f"micro-batcher stopped: {self._task.exception()!r}"

    def _fail_pending(self, error: Exception) -> None:
        """Every request not answered yet, queued or in the batch that was running, gets `error`."""
        waiting = [*self._pending, *self._running]
        self._pending.clear()
        for _, future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    async def submit(self, item: Item, deadline: float | None = None) -> Result:
        """`item`'s result; `deadline` (time.monotonic()) ends the batch window early enough for its call."""
        if self._task is not None and self._task.done():
            raise RunnerStopped(self._stop_reason())
        future = asyncio.get_running_loop().create_future()
        entry = (item, future, math.inf if deadline is None else deadline)
        self._pending.append(entry)
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:  # leaves the queue at once: it must not count towards a full batch
            self._unqueue(entry)
            raise

    def _unqueue(self, entry: tuple[Item, asyncio.Future, float]) -> None:
        """Takes `entry` out of the queue if it is still there, found by identity: `deque.remove` compares the
        entries before it by value, i.e. their requests' whole histories (10,000 items each at most), on the event
        loop, so under overload, when callers ahead of one also gave up, each cancel took milliseconds."""
        for position, queued in enumerate(self._pending):
            if queued is entry:
                del self._pending[position]
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        self._fail_pending(RunnerStopped("server is shutting down"))
        await asyncio.to_thread(self._executor.shutdown, True)  # a running call may take a while: not on the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = []
            batch = await self._next_batch()
            if not batch:
                continue
            self._running = batch  # until answered: a close or a dying loop fails these too
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _, _ in batch])
            except Exception as e:  # the callers get the error; the loop goes on
                log.exception("batch of %d failed", len(batch))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self._call_s = time.monotonic() - started
            for (_, future, _), result in zip(batch, results):
                if not future.done():  # else cancelled while the batch ran
                    future.set_result(result)

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future, float]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        if self.window_s > 0:
            await self._window(time.monotonic() + self.window_s)
        batch = []
        while self._pending and len(batch) < self.max_batch_size:  # requests cancelled meanwhile take no place
            entry = self._pending.popleft()
            if not entry[1].cancelled():
                batch.append(entry)
        return batch

    async def _window(self, end: float) -> None:
        """Waits for more requests until the batch is full or `end`, or, sooner, until a waiting request's deadline
        less twice the last call's duration (a bigger batch takes longer, and the answer still has to travel), and
        at least DEADLINE_RESERVE_S (before any call was timed)."""
        while len(self._pending) < self.max_batch_size:
            earliest = min((deadline for _, _, deadline in self._pending), default=math.inf)  # all cancelled: none
            close = min(end, earliest - max(2 * self._call_s, DEADLINE_RESERVE_S))
            remaining = close - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # not the builtin TimeoutError before 3.11
                await asyncio.wait_for(self._arrived.wait(), remaining)


class DirectRunner(Generic[Item, Result]):
    def __init__(self, run_batch: BatchFn, workers: int = 1):
        self.run_batch = run_batch
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="ort-direct")

    def start(self) -> None:
        pass

    async def submit(self, item: Item, deadline: float | None = None) -> Result:  # noqa: ARG002 - no window to end
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, [item])
        return results[0]

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, True)  # a running call may take a while: not on the loop
