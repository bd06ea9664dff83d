"""`AnswerCache`: an engine's answers to requests it has already answered, reused without running the model.

A user's repeat call with nothing new (a feed refreshing, a page reloading, a second surface asking) builds
the same prompt: the same history, the same retrieved candidates, the same trend tokens (a new interaction,
another candidate list or a trend bucket that moved makes a different prompt). The per-user context KV cache
(`HFEngine`) still computes such a call's candidate lines, ~60 % of its tokens; this computes nothing. The
ranking engines are deterministic (greedy, constrained decoding), so a kept answer is exactly the one the
model would give again; it is keyed by a digest of everything the engine's answer depends on (mode, the
prompt's token ids, readout, labels, k, bias, logit weight) and lives as long as the engine (a new model
means a new engine, so no answer outlives the model that gave it). Only answers are kept: a failure, an
abort or a timeout is never cached. A generate request's constraint factory is part of the key when it is a
`functools.partial` over plain values (the server's); one that cannot be keyed (a lambda) is not cached.

Bounded by `answer_cache_size` entries (LRU; an entry is its answer and a 16-byte key: ~1 KB). Wraps any
`RankingEngine` (hf, ortgenai, trtllm, a ModeRouter), so every backend gains it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
import threading
import time
from collections.abc import Iterable

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
    """A generate request's constraint factory as bytes: a `functools.partial` of a named function over plain
    values (what `ranking_server.prompts` builds); None for anything else (a lambda, a closure: not keyable)."""
    if factory is None:
        return b"\xff"
    if not isinstance(factory, functools.partial) or "<" in factory.func.__qualname__:
        return None
    try:
        spec = (factory.func.__module__, factory.func.__qualname__, _plain(factory.args),
                _plain(sorted(factory.keywords.items())))
    except TypeError:
        return None
    return repr(spec).encode()


def answer_key(request: EngineRequest) -> bytes | None:
    """A digest of what the engine's answer to `request` depends on, or None when it cannot be cached.
    Score mode reads only the prompt up to its last readout (`run_ids`); the rest of a score request (k,
    bias, logit weight, constraint) changes nothing the engine returns."""
    readout = request.score_readout() if request.mode == "score" else request.readout
    parts = [request.mode.encode(), _ints(request.run_ids), _ints(request.label_token_ids),
             _ints(readout.positions) + _ints(readout.tokens) if readout is not None else b"\xff"]
    if request.mode != "score":
        constraint = constraint_part(request.constraint)
        if constraint is None:
            return None
        parts += [_ints([request.k]), _floats(request.bias), _floats([request.logit_weight]), constraint]
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(_ints([len(part)]) + part)
    return digest.digest()


class AnswerCache(RankingEngine):
    """`engine` behind an LRU of its answers (`size` entries; 0 keeps none)."""

    def __init__(self, engine: RankingEngine, size: int):
        self.engine = engine
        self.name = engine.name
        self._answers: LRU[EngineResult] = LRU(size)
        self._lock = threading.Lock()  # rank may be awaited from several event loops (the benchmark's threads)

    async def rank(self, request: EngineRequest) -> EngineResult:
        key = answer_key(request) if self._answers.capacity else None
        if key is None:
            return await self.engine.rank(request)
        started = time.perf_counter()
        with self._lock:
            kept = self._answers.get(key)
        if kept is not None:
            return _reused(kept, request.request_id, 1e3 * (time.perf_counter() - started))
        result = await self.engine.rank(request)
        with self._lock:
            self._answers.put(key, result)
        return result

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def check_health(self) -> bool:
        return self.engine.check_health()

    def stats(self) -> EngineStats:
        with self._lock:
            hits, misses, evictions = self._answers.hits, self._answers.misses, self._answers.evictions
        return dataclasses.replace(self.engine.stats(), answer_hits=hits, answer_misses=misses,
                                   answer_evictions=evictions)

    def close(self) -> None:
        self.engine.close()


def _reused(kept: EngineResult, request_id: str, total_ms: float) -> EngineResult:
    """The kept answer for a new request: no queue, no model time, every prompt token reused."""
    return dataclasses.replace(kept, request_id=request_id, order=list(kept.order),
                               scores=list(kept.scores) if kept.scores is not None else None,
                               cached_tokens=kept.prompt_tokens, generated_tokens=0,
                               timings=EngineTimings(0.0, 0.0, 0.0, total_ms), batch_size=0, answer_reused=True)


def with_answer_cache(engine: RankingEngine, size: int) -> RankingEngine:
    """`engine` behind an `AnswerCache` of `size` answers; `engine` itself when `size` is 0."""
    return AnswerCache(engine, size) if size > 0 else engine
