"""The plumbing every in-process engine shares: a bounded admission queue on the asyncio side, one
dedicated engine thread running blocking torch work, results handed back to each caller's event
loop with `call_soon_threadsafe`, aborts, health, close and counters.

Where a request goes:  `rank()` (caller's event loop) validates it, appends it to `waiting` (or raises
EngineOverloaded at once) and awaits a future (a generate request at logit weight 0 that reads no prompt
position is answered there and then: `EngineRequest.reads_prompt`);  the engine thread takes it from
`waiting` when its scheduler (`_step`, per backend) admits it, runs it, and settles the future.

Who goes first: `_priority` (arrival order, with requests that end with their prompt moved `score_first_ms`
ahead: a score request, or a generate one at logit weight 0, is done when its prompt is, while a decoding
generate request goes on, so the former should not queue behind decoding prompts that arrived just before
it; the bound keeps decoding requests from starving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from abc import abstractmethod
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import NamedTuple

from palr.decoding import DecodingConstraint
from ranking_server.engines.base import (
    EngineAborted, EngineError, EngineOverloaded, EngineRequest, EngineResult, EngineStats,
    EngineTimings, InvalidRequest, RankingEngine, answer_by_bias, emit_answer)

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 30.0  # the longest a close waits for the step running (the pods' termination grace budgets it)


class DeviceTurns:
    """Engine threads that share one device take turns on it, in the order they asked (a FIFO ticket lock).

    Two engine threads computing at once on a CPU (a `ModeRouter` of ortgenai and torch) each run a thread pool
    sized for all the cores, so both slow down and neither engine's priorities (score first) hold across them;
    a plain Lock would let the thread that just released it take it straight back. An engine holds a turn for
    one step (handing it over between the passes of a step measured worse: docs/serving.md)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next_ticket = 0  # the ticket the next thread to ask gets
        self._serving = 0      # the ticket whose holder computes now

    @contextlib.contextmanager
    def turn(self):
        with self._cv:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            while self._serving != ticket:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._serving += 1
                self._cv.notify_all()

    def waiting(self) -> int:
        """How many threads wait for a turn (besides the one holding it)."""
        return max(0, self._next_ticket - self._serving - 1)


class StepRecord(NamedTuple):
    """One engine step: rows decoded, rows that ran a prompt chunk, tokens run, most slots held at once."""

    decoding: int
    prefilling: int
    tokens: int
    held: int

    @property
    def batch(self) -> int:
        """Requests in the running batch during the step: those that ran, at most the slots held at once. A step
        admits arrivals between its prompt passes, so under load one-at-a-time requests can each run a pass of
        the same step, one after another, without ever sharing one (counted 1, not their number)."""
        return min(self.decoding + self.prefilling, self.held)


@dataclass(eq=False)
class Pending:
    """One request between `rank()` and its answer, with the times the engine records."""

    request: EngineRequest
    constraint: DecodingConstraint | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    prefilled: float = 0.0
    peak_batch: int = 0  # most requests in the running batch in a step this request took part in
    settled: bool = False  # answered or failed (once: a close that timed out and the engine thread may both try)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def timings(self, now: float) -> EngineTimings:
        admitted = self.admitted or now
        prefilled = self.prefilled or now
        return EngineTimings(queue_ms=1e3 * (admitted - self.submitted),
                             prefill_ms=1e3 * (prefilled - admitted),
                             decode_ms=1e3 * (now - prefilled),
                             total_ms=1e3 * (now - self.submitted))


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled) meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LoopEngine(RankingEngine):
    """Base of the in-process engines. Subclasses implement the scheduler: `_step()` admits from
    `waiting` (via `_take`), runs one iteration of model work and settles what finished (`_finish`,
    `_fail`); `_release(pending)` frees what an aborted running request holds (its batch slot)."""

    def __init__(self, name: str, *, vocab_size: int, max_seq_len: int, max_queue: int,
                 num_threads: int | None = None, score_first_ms: float = 0.0, step_log_size: int = 4096):
        if max_seq_len < 1:  # 0 means "size it to the bundle": the server resolves it before building an engine
            raise ValueError(f"max_seq_len must be >= 1 when an engine is built, got {max_seq_len}")
        if max_queue < 1:  # every request waits in the queue before the engine thread admits it
            raise ValueError(f"--max-queue must be >= 1 for the in-process engines (each request waits there "
                             f"until the engine thread admits it), got {max_queue}")
        self.name = name
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.num_threads = num_threads
        self.score_first_s = score_first_ms / 1e3
        self._cv = threading.Condition()
        self._waiting: deque[Pending] = deque()
        self._running: dict[str, Pending] = {}  # admitted, not settled; guarded by _cv
        self._aborts: set[str] = set()
        self._closed = False
        self._crash: BaseException | None = None
        self._counts: Counter[str] = Counter()
        self._batch_hist: Counter[int] = Counter()
        self._token_hist: Counter[int] = Counter()
        self._max = Counter()  # "active", "step_tokens"
        self._busy_s = 0.0
        self.device_turns = DeviceTurns()  # this engine's alone unless `share_device` gives it one it shares
        self.step_log: deque[StepRecord] = deque(maxlen=step_log_size)  # the latest steps, oldest first
        self._thread = threading.Thread(target=self._main, name=f"{name}-engine", daemon=True)

    def start(self) -> "LoopEngine":
        self._thread.start()
        return self

    def share_device(self, turns: DeviceTurns) -> None:
        """Compute only in turns with the other engines holding `turns` (from the next step on)."""
        self.device_turns = turns

    # ---- asyncio side -------------------------------------------------------------------------

    async def rank(self, request: EngineRequest) -> EngineResult:
        if not self.check_health():
            raise EngineError(f"{self.name} engine is not running"
                              + (f" (crashed: {self._crash!r})" if self._crash else ""))
        constraint = request.validate(self.vocab_size, self.max_seq_len)
        if not request.reads_prompt:  # generate at logit weight 0 reading the labels: the bias's order, no pass
            try:
                result = answer_by_bias(request, constraint, time.perf_counter())
            except EngineError:
                self._count(failed=1)
                raise
            self._count(completed=1, written_tokens=result.generated_tokens)  # no model pass: not the model's
            return result
        loop = asyncio.get_running_loop()
        pending = Pending(request, constraint, loop.create_future(), loop)
        with self._cv:
            if not self.check_health():  # again under the lock: a loop that died or closed meanwhile drains
                raise EngineError(f"{self.name} engine is not running")  # no queue any more
            if len(self._waiting) >= self.max_queue:
                self._counts["rejected"] += 1
                raise EngineOverloaded(f"{self.name} engine queue is full ({self.max_queue} waiting)")
            if self._known(request.request_id):
                raise InvalidRequest(f"request_id {request.request_id!r} is already in flight")
            self._waiting.append(pending)
            self._cv.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self.abort(request.request_id)
            raise

    def abort(self, request_id: str) -> bool:
        """A queued request leaves the queue at once (it holds nothing of the engine's, and must not count
        against `max_queue` while a long step runs); a running one is released at the next step."""
        with self._cv:
            queued = next((p for p in self._waiting if p.request_id == request_id), None)
            if queued is not None:
                self._waiting.remove(queued)
            elif request_id in self._running:
                self._aborts.add(request_id)
                self._cv.notify()
            else:
                return False
        if queued is not None:
            self._fail(queued, EngineAborted(f"request {request_id} aborted while queued"))
        return True

    def check_health(self) -> bool:
        return self._thread.is_alive() and not self._closed and self._crash is None

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_everything(EngineError(f"{self.name} engine is closed"))

    def stats(self) -> EngineStats:
        with self._cv:
            c = self._counts
            return EngineStats(
                engine=self.name, healthy=self.check_health(), active=len(self._running),
                queued=len(self._waiting), completed=c["completed"], failed=c["failed"],
                aborted=c["aborted"], rejected=c["rejected"], steps=c["steps"],
                prompt_tokens=c["prompt_tokens"], cached_tokens=c["cached_tokens"],
                generated_tokens=c["generated_tokens"], written_tokens=c["written_tokens"], busy_s=self._busy_s,
                max_active=self._max["active"], max_step_tokens=self._max["step_tokens"],
                batch_size_hist=dict(self._batch_hist), step_tokens_hist=dict(self._token_hist))

    # ---- engine thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with self._engine_context():
                self._run()
        except BaseException as e:  # noqa: BLE001 - a dead loop must fail everyone, whatever killed it
            log.exception("%s engine loop crashed", self.name)
            with self._cv:
                self._crash = e
            self._fail_everything(EngineError(f"{self.name} engine loop crashed: {e!r}"))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._aborts or self._waiting or self._running):
                    self._cv.wait()
                if self._closed:
                    return
            self._drain_aborts()
            with self.device_turns.turn():
                if self._closed:  # closed while waiting for the turn
                    return
                self._drain_aborts()  # and those aborted while it waited (another engine's step): not run for nobody
                started = time.perf_counter()
                ran = self._step()
            if ran:
                self._busy_s += time.perf_counter() - started

    def _drain_aborts(self) -> None:
        """Release and fail the running requests aborted since the last look (engine thread): before each step, and
        between the passes of one (`HFEngine._prefill_passes`), so an aborted prompt is not run for nobody."""
        with self._cv:
            aborted, self._aborts = self._aborts, set()
            running = [self._running[i] for i in aborted if i in self._running]
        for pending in running:
            self._release(pending)
            self._fail(pending, EngineAborted(f"request {pending.request_id} aborted while running"))

    def _priority(self, pending: Pending) -> float:
        """Scheduling key, lowest first: the arrival time, `score_first_s` earlier for a request that ends with
        its prompt (`EngineRequest.decodes` false: score mode, or generate mode at logit weight 0)."""
        return pending.submitted - (0.0 if pending.request.decodes else self.score_first_s)

    def _take(self, n: int) -> list[Pending]:
        """Admit up to n waiting requests in `_priority` order, stamping their admission time."""
        if n <= 0:  # every step asks, also when no slot is free: no sort then
            return []
        now = time.perf_counter()
        with self._cv:
            taken = sorted(self._waiting, key=self._priority)[:n]
            for pending in taken:
                self._waiting.remove(pending)
                pending.admitted = now
                self._running[pending.request_id] = pending
        return taken

    def _queue_head(self) -> tuple[int, float]:
        """(how many wait, when the oldest was submitted; 0.0 if none)."""
        with self._cv:
            return len(self._waiting), (self._waiting[0].submitted if self._waiting else 0.0)

    def _wait_for_arrivals(self, timeout: float) -> None:
        """Sleep until a new request, an abort or close arrives (or the timeout)."""
        with self._cv:
            if not (self._closed or self._aborts):
                self._cv.wait(timeout)

    def _record_step(self, record: StepRecord) -> None:
        with self._cv:
            self._counts["steps"] += 1
            self._batch_hist[record.batch] += 1
            self._token_hist[record.tokens] += 1
            self._max["active"] = max(self._max["active"], record.held)
            self._max["step_tokens"] = max(self._max["step_tokens"], record.tokens)
            self.step_log.append(record)
            for pending in self._running.values():
                pending.peak_batch = max(pending.peak_batch, record.held)

    def _count(self, **amounts: int) -> None:
        with self._cv:
            self._counts.update(amounts)

    def _finish(self, pending: Pending, order: list[int], scores: list[float] | None,
                cached_tokens: int, generated_tokens: int) -> None:
        now = time.perf_counter()
        request = pending.request
        with self._cv:  # the batch of the step finishing it: everything still admitted now
            batch = max(pending.peak_batch, len(self._running))
        result = EngineResult(request.request_id, request.mode, order, scores,
                              prompt_tokens=len(request.prefix_ids) + len(request.suffix_ids),
                              cached_tokens=cached_tokens, generated_tokens=generated_tokens,
                              timings=pending.timings(now), batch_size=batch)
        self._deliver(pending, result, None, completed=1)

    def _finish_by_bias(self, pending: Pending, bias: list[float] | None, cached_tokens: int) -> None:
        """Generate mode at logit weight 0, once the prompt's pass has run and the caller has freed the
        request's slot: the constrained answer in the bias's order, no decode pass (`palr.llm.emit_by_bias`)."""
        try:
            written = emit_answer(pending.constraint, bias)
        except EngineError as e:
            log.exception("rid=%s constrained decoding failed", pending.request_id)
            self._fail(pending, e)
            return
        self._count(written_tokens=written)
        self._finish(pending, pending.constraint.emitted(), None, cached_tokens, written)

    def _fail(self, pending: Pending, error: EngineError) -> None:
        self._deliver(pending, None, error, **{"aborted" if isinstance(error, EngineAborted) else "failed": 1})

    def _deliver(self, pending: Pending, result, error, **counts: int) -> None:
        """Settles `pending` and counts it, once: a second settling (close's, after its join timed out, and the
        engine thread's for the same request) is dropped, so no request is counted failed and completed."""
        with self._cv:
            if pending.settled:
                return
            pending.settled = True
            self._running.pop(pending.request_id, None)
            self._counts.update(counts)  # before the caller hears: its stats include its own request
        try:
            pending.loop.call_soon_threadsafe(_settle, pending.future, result, error)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass

    def _fail_everything(self, error: EngineError) -> None:
        with self._cv:
            pending = [*self._waiting, *self._running.values()]
            self._waiting.clear()
        for p in pending:
            self._fail(p, error)

    def _known(self, request_id: str) -> bool:
        return request_id in self._running or any(p.request_id == request_id for p in self._waiting)

    # ---- the scheduler, per backend -----------------------------------------------------------

    def _engine_context(self) -> contextlib.AbstractContextManager:
        """Entered once on the engine thread around the whole loop: thread count, inference mode."""
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        return torch.inference_mode()

    @abstractmethod
    def _step(self) -> bool:
        """Admit what the policy allows and run one iteration; True if model work ran. It runs inside a device
        turn (`DeviceTurns`), so it must not wait for arrivals when its engine shares the device."""

    @abstractmethod
    def _release(self, pending: Pending) -> None:
        """Free what a running request holds (it was aborted); called on the engine thread."""
