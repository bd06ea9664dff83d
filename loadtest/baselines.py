"""Baselines for the benchmark only: what in-flight batching is measured against.

- `SequentialEngine` (one-at-a-time): a FIFO worker that runs each request alone through the
  reference in `palr.llm`, reusing the same KV as the in-flight engine (the shared prefix, and each user's
  context within `context_cache_mb`), so the comparison measures batching only. An abort takes effect
  between requests: one already running completes.
- `StaticBatchingEngine`: collects up to `max_batch_size` requests (or waits `batch_timeout_ms`),
  prefills them as one right-padded batch, decodes them together until ALL are done, and only then
  takes the next batch. Same kernels and KV cache as the in-flight engine, so the comparison
  measures the scheduling only. (Rows that finish early stop being computed; with a common k they
  all finish together anyway.)

Both answer through the same interface as the serving engine.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from palr.llm import PrefixKV, compute_prefix, generate_constrained, score_candidates
from ranking_server.engines.base import EngineError
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.hf import HFEngine, Row, kv_bytes
from ranking_server.engines.loop import LoopEngine, Pending, StepRecord
from ranking_server.engines.lru import LRU


class SequentialEngine(LoopEngine):
    """One request at a time, through the reference implementation."""

    def __init__(self, model, config: EngineConfig | None = None, name: str = "sequential"):
        config = config or EngineConfig()
        super().__init__(name, vocab_size=model.config.get_text_config().vocab_size,
                         max_seq_len=config.max_seq_len, max_queue=config.max_queue,
                         num_threads=config.num_threads, score_first_ms=config.score_first_ms)
        self.config = config
        self.model = model
        self._prefixes: LRU[PrefixKV] = LRU(config.prefix_cache_size)
        self.contexts: LRU[PrefixKV] = LRU(config.context_cache_mb * 2 ** 20, weigh=lambda kv: kv_bytes(kv.layers))
        self.start()

    def _prefix(self, prefix_ids) -> PrefixKV | None:
        key = tuple(int(t) for t in prefix_ids)
        if not (self.config.prefix_reuse and key):
            return None
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = compute_prefix(self.model, key)
            self._count(prompt_tokens=len(key))
            self._prefixes.put(key, prefix)
        return prefix

    def _cached_start(self, request) -> tuple[PrefixKV | None, int]:
        """The longest start of the prompt whose KV is kept, and how many of its tokens were cached before this
        request: the user's context (computed from the shared prefix on a miss, a pass of its own; the in-flight
        engine snapshots it from the prompt's one pass), else the shared prefix, as the in-flight engine reuses
        them."""
        prefix = self._prefix(request.prefix_ids)
        if not (self.config.context_cache_mb and request.context_len):
            return prefix, len(prefix) if prefix else 0
        context = self.contexts.get(request.context_key)
        if context is not None:
            return context, len(context)
        context = compute_prefix(self.model, request.context_key, base=prefix)  # its tokens count in _step
        self.contexts.put(request.context_key, context)
        return context, len(prefix) if prefix else 0

    def stats(self):
        return dataclasses.replace(super().stats(), context_hits=self.contexts.hits, context_misses=self.contexts.misses,
                                   context_evictions=self.contexts.evictions, context_bytes=int(self.contexts.weight))

    def _step(self) -> bool:
        taken = self._take(1)
        if not taken:
            return False
        pending = taken[0]
        request = pending.request
        try:
            prefix, cached = self._cached_start(request)
            if request.mode == "score":
                scores = score_candidates(self.model, request.input_ids, request.score_readout(), prefix)
                order = sorted(range(len(scores)), key=lambda c: -scores[c])
            else:
                scores = None
                order = generate_constrained(self.model, request.input_ids, pending.constraint, request.bias, prefix,
                                             request.readout, request.logit_weight, self.config.draft_tokens)
        except Exception as e:  # noqa: BLE001 - fail this request, keep serving
            self._fail(pending, EngineError(f"reference run failed: {e!r}"))
            return True
        pending.prefilled = time.perf_counter() if request.mode == "score" else 0.0
        prompt = len(request.run_ids) - cached
        generated = len(order) if request.mode == "generate" else 0
        self._count(prompt_tokens=prompt, cached_tokens=cached, generated_tokens=generated)
        self._record_step(StepRecord(0, 1, prompt + generated, 1))
        self._finish(pending, order, scores, cached, generated)
        return True

    def _release(self, pending: Pending) -> None:
        """Nothing is held between requests."""


@dataclass
class StaticConfig(EngineConfig):
    """The engine limits plus the static baseline's own knob."""

    batch_timeout_ms: float = field(default=20.0, metadata={
        "help": "static batching baseline only: how long to wait for a batch to fill"})


class StaticBatchingEngine(HFEngine):
    """Batch-at-a-time: nobody joins a running batch."""

    def __init__(self, model, config: EngineConfig | None = None, name: str = "hf-static"):
        if not isinstance(config, StaticConfig):
            config = StaticConfig.of(config or EngineConfig())
        super().__init__(model, config, name)

    def _admit_new(self) -> None:
        if self._slots:
            return  # a batch is running
        waiting, oldest = self._queue_head()
        if not waiting:
            return
        left = oldest + self.config.batch_timeout_ms / 1e3 - time.perf_counter()
        if waiting < self.config.max_batch_size and left > 0:
            self._wait_for_arrivals(left)
            return
        for pending in self._take(self.config.max_batch_size):
            self._admit(pending)

    def _context_computed_ahead(self, pending) -> None:
        """Never wait for another row's context: the batch's prompts run in one pass, so a row waiting for a
        context its batch computes would never get it and would run its whole prompt, prefix included. Each row
        copies what is cached (the prefix, a context stored by an earlier batch) and computes the rest."""
        return None

    def _prefill_passes(self, budget: int) -> list[tuple[Row, int]]:
        """One padded pass over the whole batch's prompts, no token budget; nobody is admitted between passes."""
        chunks = [(row, len(row.todo)) for row in self._slots[self._n_decoding:]]
        if chunks:
            self._prefill(chunks)
        return chunks


# benchmark strategy -> engine class over an already loaded model (the same weights for all)
STRATEGIES: dict[str, type[LoopEngine]] = {
    "sequential": SequentialEngine,
    "static": StaticBatchingEngine,
    "inflight": HFEngine,
}


def strategy_engine(strategy: str, model, config: EngineConfig | None = None) -> LoopEngine:
    """An engine of the given benchmark strategy over an already loaded model."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown engine strategy {strategy!r}; choose from {tuple(STRATEGIES)}")
    return STRATEGIES[strategy](model, config)
