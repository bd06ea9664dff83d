"""`AnswerCache`: an engine's answers to requests it has already answered, reused without running the model.

A user's repeat call with nothing new (a feed refreshing, a page reloading, a second surface asking) builds
the same prompt: the same history, the same retrieved candidates, the same trend tokens (a new interaction,
another candidate list or a trend bucket that moved makes a different prompt). The per-user context KV cache
(`HFEngine`) still computes such a call's candidate lines, ~60 % of its tokens; this computes nothing. The
ranking engines are deterministic (greedy, constrained decoding), so a kept answer is the one the model gives
again (in fp32 exactly; a bf16 build or a GPU may differ in the last bits between batch shapes and between a
cached and a computed context, as any two runs of the request may). It is keyed by a digest of the request as
the engine sees it (all but its id; score mode leaves out k and the logit weight, which it never reads) and
lives as long as the engine (a new model means a new engine, so no answer outlives the model that gave it).
Only answers are kept: a failure or an abort is never cached (a run kept going for identical requests after its
first caller's deadline passed is an answer, and is kept), and a failed engine (health false)
answers nothing from it either. A generate request's constraint factory is part of the key when it is a
`functools.partial` of a module-level function over plain values (the server's); one that cannot be keyed (a
lambda) is not cached.

Bounded by `answer_cache_size` entries (LRU; an entry is its answer and a 16-byte key: ~1 KB). Wraps any
`RankingEngine` (hf, ortgenai, trtllm, a ModeRouter), so every backend gains it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ranking_server.engines.base import EngineRequest, EngineResult, EngineStats, EngineTimings, RankingEngine
from ranking_server.engines.lru import LRU


def _ints(values: Iterable[int]) -> bytes:
    values = [int(v) for v in values]
    return struct.pack(f"<I{len(values)}q", len(values), *values)


def _floats(values: Iterable[float] | None) -> bytes:
    if values is None:
        return b"\xff"
    values = [float(v) for v in values]
    return struct.pack(f"<I{len(values)}d", len(values), *values)


def _plain(value):
    """`value` as nested tuples of str/int/float/bool/None, or raise TypeError (not a plain value)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    raise TypeError(type(value).__name__)


def constraint_part(factory) -> bytes | None:
    """A generate request's constraint factory as bytes: a `functools.partial` of a module-level function over
    plain values (what `ranking_server.prompts` builds); None for anything else (a lambda, a closure, a bound
    method: what they hold is not in the key)."""
    if factory is None:
        return b"\xff"
    func = getattr(factory, "func", None)
    if not isinstance(factory, functools.partial) or not inspect.isfunction(func) or "<" in func.__qualname__:
        return None
    try:
        spec = (func.__module__, func.__qualname__, _plain(factory.args), _plain(sorted(factory.keywords.items())))
    except TypeError:
        return None
    return repr(spec).encode()


def answer_key(request: EngineRequest) -> bytes | None:
    """A digest of the request as the engine sees it, or None when it cannot be cached. Two requests with the
    same key are the same request but for its id, so a kept answer is valid for both (the first one passed the
    engine's checks); score mode leaves out k and the logit weight, which it never reads."""
    try:
        readout = request.readout
        parts = [request.mode.encode(), _ints(request.prefix_ids), _ints(request.suffix_ids),
                 _ints(request.label_token_ids), _ints([request.context_len]), _floats(request.bias),
                 _ints(readout.positions) + _ints(readout.tokens) if readout is not None else b"\xff"]
        if request.mode != "score":
            constraint = constraint_part(request.constraint)
            if constraint is None:
                return None
            parts += [_ints([request.k]), _floats([request.logit_weight]), constraint]
    except (struct.error, TypeError, ValueError, OverflowError):  # not plain numbers: the engine will say why
        return None
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(_ints([len(part)]) + part)
    return digest.digest()


@dataclass(eq=False)
class _Shared:
    """The engine run of a request that identical requests wait on: its task, the answer handed to them (a copy, or
    None when the run failed or was cancelled), and who still wants it."""

    task: asyncio.Task
    answer: asyncio.Future
    submitted: float = 0.0     # time.perf_counter() when the run was handed to the engine
    waiters: int = 0           # identical requests waiting on it now
    owner_gone: bool = False   # the request that started it was cancelled (its caller's deadline, or gone)


class AnswerCache(RankingEngine):
    """`engine` behind an LRU of its answers (`size` entries; 0 keeps none). A request identical to one the
    engine is running now waits for that one's answer instead of running too (two surfaces of a page asking at
    once). The run outlives the request that started it while identical ones wait on it (that one's caller gave
    up, theirs did not: a short deadline no longer costs the others their place); it is aborted once nobody wants
    it. If it fails, a waiting request runs itself."""

    def __init__(self, engine: RankingEngine, size: int):
        self.engine = engine
        self.name, self.version = engine.name, engine.version
        self._answers: LRU[EngineResult] = LRU(size)
        self._running: dict[bytes, _Shared] = {}  # key -> the identical request's run going on now
        self._joined = 0  # requests answered by an identical request that was running (counted as hits)
        self._lock = threading.Lock()  # rank may be awaited from several event loops (the benchmark's threads)

    async def rank(self, request: EngineRequest) -> EngineResult:
        key = answer_key(request) if self._answers.capacity else None
        if key is None or not self.engine.check_health():  # a failed engine answers nothing, kept or not
            return await self.engine.rank(request)  # (and its failures are not counted as answer hits)
        started = time.perf_counter()
        with self._lock:
            kept = self._answers.get(key)
            shared = self._running.get(key)
        joined = None  # the run this request joined, when it did
        while kept is None and shared is not None and shared.answer.get_loop() is asyncio.get_running_loop():
            kept = await self._wait_on(shared)  # None: it failed or was cancelled; then one of its waiters runs
            with self._lock:
                if kept is not None:
                    self._joined += 1
                    joined = shared
                shared = self._running.get(key)  # the waiter that runs it again (the others join it)
        if kept is not None:
            # joined: queued from its arrival until the run it joined was admitted (0 if it came later)
            queued_ms = None if joined is None else 1e3 * (joined.submitted - started) + kept.timings.queue_ms
            return _reused(kept, request.request_id, 1e3 * (time.perf_counter() - started), queued_ms)
        return await self._run(key, request)

    async def _wait_on(self, shared: _Shared) -> EngineResult | None:
        with self._lock:
            shared.waiters += 1
        try:
            return await asyncio.shield(shared.answer)
        finally:
            with self._lock:
                shared.waiters -= 1
                unwanted = shared.owner_gone and shared.waiters == 0 and not shared.task.done()
            if unwanted:  # the last one waiting gave up too
                shared.task.cancel()

    async def _run(self, key: bytes, request: EngineRequest) -> EngineResult:
        """Run `request` on the engine, keep its answer, and hand it to identical requests that came meanwhile."""
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        task = loop.create_task(self.engine.rank(request))
        shared = _Shared(task, loop.create_future(), submitted)
        with self._lock:
            mine = self._running.setdefault(key, shared) is shared
        task.add_done_callback(functools.partial(self._finished, key, shared if mine else None))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with self._lock:
                shared.owner_gone = True
                wanted = mine and shared.waiters > 0
            if not wanted:
                task.cancel()  # aborts the engine request
            raise

    def _finished(self, key: bytes, shared: _Shared | None, task: asyncio.Task) -> None:
        """A run ended: keep its answer and hand it to the requests waiting on it (None to them when it failed or
        was cancelled)."""
        result = None if task.cancelled() or task.exception() is not None else task.result()
        with self._lock:
            if result is not None:
                self._answers.put(key, _copy(result))
            if shared is not None:
                del self._running[key]
        if shared is not None:
            shared.answer.set_result(_copy(result) if result is not None else None)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def check_health(self) -> bool:
        return self.engine.check_health()

    def stats(self) -> EngineStats:
        with self._lock:  # a request that joined a running one missed the LRU first: it counts as a hit only
            hits, misses = self._answers.hits + self._joined, self._answers.misses - self._joined
            evictions = self._answers.evictions
        return dataclasses.replace(self.engine.stats(), answer_hits=hits, answer_misses=misses,
                                   answer_evictions=evictions)

    def close(self) -> None:
        self.engine.close()


def _copy(result: EngineResult, **changes) -> EngineResult:
    """`result` with lists of its own (neither the caller nor the cache can change the other's)."""
    scores = list(result.scores) if result.scores is not None else None
    return dataclasses.replace(result, order=list(result.order), scores=scores, **changes)


def _reused(kept: EngineResult, request_id: str, total_ms: float, queued_ms: float | None = None) -> EngineResult:
    """The kept answer for a new request: no model time of its own, every prompt token reused. A kept one
    (`queued_ms` None) waited for nothing; one that joined an identical running request waited for that run's slot
    (`queued_ms`: from its arrival to the run's admission, within its own wait) and passes (the rest)."""
    joined = queued_ms is not None
    queue_ms = min(max(queued_ms, 0.0), total_ms) if joined else 0.0
    return _copy(kept, request_id=request_id, cached_tokens=kept.prompt_tokens, generated_tokens=0,
                 timings=EngineTimings(queue_ms, 0.0, 0.0, total_ms), batch_size=0, answer_reused=True,
                 answer_joined=joined)


def with_answer_cache(engine: RankingEngine, size: int) -> RankingEngine:
    """`engine` behind an `AnswerCache` of `size` answers; `engine` itself when `size` is 0."""
    return AnswerCache(engine, size) if size > 0 else engine
