"""`ortgenai` engine: an onnxruntime-genai build (`compile build --target ortgenai-cpu`) behind the
same `RankingEngine` interface, for the ranking modes where it measured faster than torch on CPU.

onnxruntime-genai runs one `Generator` per request here (batch 1, its own KV cache). We never let it
sample: each step we read the next-token logits (`get_logits`), apply the request's constraint
exactly as the torch engines do (`palr.llm.pick_allowed`: argmax of logit + bias over the allowed
tokens), and append the chosen token (`append_tokens`). Score mode reads the label logits after the
prompt (`palr.llm.label_log_probs`). So the answers match the one-at-a-time reference up to the
numerics of the ONNX graph (fp32: ~1e-5; int4: see the build report).

Scheduling (in-flight, on the engine thread of `loop.LoopEngine`): up to `max_batch_size` requests
hold a generator; every step gives each generating request one token, then spends what is left of
`max_tokens_per_step` on prompt chunks, oldest first. onnxruntime-genai has no batched decode over
requests that joined at different times with per-token control (its `Engine` continuous batching
takes only grammars, which cannot say "each label at most once"), so batching here buys fairness,
not throughput.

Prefix and context reuse: an idle generator keeps its KV cache. A request whose user context (prefix +
profile + history: a repeat call of the same user) or shared prefix is what that cache starts with
rewinds to it (`Generator.rewind_to`) and runs only the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palr.llm import label_log_probs, pick_allowed
from palr.ortgenai_runtime import GeneratorSlot, genai_config, load_model
from palr.ranking import decoding_bias
from ranking_server.engines.base import EngineError
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.loop import LoopEngine, Pending, StepRecord

log = logging.getLogger(__name__)

@dataclass(eq=False)
class Running:
    pending: Pending
    slot: GeneratorSlot
    todo: list[int]                  # prompt tokens not fed yet
    cached: int = 0
    next_token: int | None = None    # generate mode: chosen, not fed yet
    generated: int = 0
    length: int = 0                  # tokens in the generator's cache
    readout: object = None           # palr.prompt.Readout: what score mode reads (None: nothing)
    read: list | None = None         # each candidate's readout logit, once its position has run
    bias: list | None = None         # generate mode: request bias (+ readouts)

    def chunks(self, budget: int) -> list[int]:
        """Sizes of the prompt chunks to feed now, in order, within `budget` tokens in all: each ends at the next
        readout position if one comes (a generator's logits are its last position's), so a candidate-readout
        prompt takes a chunk per candidate, all of them in one step when the budget allows."""
        sizes, length, left = [], self.length, len(self.todo)
        ahead = sorted(p for p in self.readout.positions if p >= length) if self.readout is not None else []
        while left and budget > 0:
            n = min(left, budget)
            nearest = next((p for p in ahead if p >= length), None)
            if nearest is not None:
                n = min(n, nearest - length + 1)
            sizes.append(n)
            length, left, budget = length + n, left - n, budget - n
        return sizes


def pick_idle(cached: list[list[int]], starts: list[list[int]]) -> tuple[int | None, list[int]]:
    """Which idle generator a request takes, given each one's cached tokens (least recently used first) and the
    request's starts worth finding (longest first): (index, the start it reuses) of the first whose cache begins
    with the longest start; else (0, the shortest start): the least recently used, so the contexts most likely
    asked for again stay (it took the most recent one, the last user's context, before); (None, ...) when none
    is idle."""
    for start in starts:
        for i, tokens in enumerate(cached):
            if tokens[:len(start)] == start:
                return i, start
    return (0 if cached else None), (starts[-1] if starts else [])


class OrtGenaiEngine(LoopEngine):
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, name: str = "ortgenai"):
        config = config or EngineConfig()
        model_dir = Path(model_dir)
        meta = genai_config(model_dir)["model"]
        max_seq_len = min(config.max_seq_len, int(meta.get("context_length") or config.max_seq_len))
        super().__init__(name, vocab_size=int(meta["vocab_size"]), max_seq_len=max_seq_len,
                         max_queue=config.max_queue, score_first_ms=config.score_first_ms)
        self.config = config
        self.model = load_model(model_dir, config.num_threads)
        self._idle: list[GeneratorSlot] = []
        self._active: list[Running] = []
        self._context_hits = self._context_misses = 0  # requests with a context: found it in an idle generator or not
        log.info("ortgenai engine: %s, vocab %d, max_seq_len %d, <= %d generators", model_dir, self.vocab_size,
                 max_seq_len, config.max_batch_size)
        self.start()

    # ---- scheduling ---------------------------------------------------------------------------

    def _step(self) -> bool:
        for pending in self._take(self.config.max_batch_size - len(self._active)):
            self._admit(pending)
        if not self._active:
            return False
        held = len(self._active)
        decoding = [r for r in self._active if not r.todo]
        budget = self.config.max_tokens_per_step - len(decoding)
        prefilling = []  # (request, its chunk sizes this step)
        for running in [r for r in self._active if r.todo]:
            if budget <= 0:
                break
            sizes = running.chunks(budget)
            budget -= sum(sizes)
            prefilling.append((running, sizes))
        prompt_tokens = sum(sum(sizes) for _, sizes in prefilling)
        # logged before the work: a request that finishes in this step finds its step in the log when it returns
        self._record_step(StepRecord(len(decoding), len(prefilling), len(decoding) + prompt_tokens, held))
        for running in decoding:
            self._feed(running, [running.next_token])
        for running, sizes in prefilling:
            self._drain_aborts()  # between requests' prompt chunks, as hf does between passes: none fed for nobody
            for n in sizes:
                if running not in self._active:  # its forward failed: it has left
                    break
                chunk, running.todo = running.todo[:n], running.todo[n:]
                self._feed(running, chunk)
        self._count(prompt_tokens=prompt_tokens)
        return True

    def _admit(self, pending: Pending) -> None:
        request = pending.request
        starts = []  # cached starts worth finding, longest first
        if self.config.context_cache_mb and request.context_len:
            starts.append(list(request.context_key))
        if self.config.prefix_reuse and request.prefix_ids:
            starts.append([int(t) for t in request.prefix_ids])
        try:
            slot, start = self._generator_for(starts)
            cached = slot.start(start)
            if self.config.context_cache_mb and request.context_len:  # what hf's context cache counts
                hit = start == starts[0] and cached == len(start)
                self._context_hits, self._context_misses = self._context_hits + hit, self._context_misses + (not hit)
        except Exception as e:  # noqa: BLE001 - a generator that cannot start fails this request only
            log.exception("ortgenai: cannot start a generator")
            self._fail(pending, EngineError(f"ortgenai generator: {e!r}"))
            return
        readout = request.score_readout() if request.mode == "score" or request.readout is not None else None
        self._active.append(Running(pending, slot, todo=request.run_ids[cached:], cached=cached, length=cached,
                                    readout=readout, read=[None] * len(readout) if readout is not None else None,
                                    bias=list(request.bias) if request.bias is not None else None))

    def stats(self):
        """The loop's counts, with the context reuse of the generators kept idle (its hits and misses; the idle
        generators are not bounded in bytes, so no evictions or bytes)."""
        return dataclasses.replace(super().stats(), context_hits=self._context_hits,
                                   context_misses=self._context_misses)

    def _generator_for(self, starts: list[list[int]]) -> tuple[GeneratorSlot, list[int]]:
        """An idle generator whose cache starts with the longest of `starts` (and that start), else the least
        recently used idle one, else a new one."""
        i, start = pick_idle([slot.tokens for slot in self._idle], starts)
        if i is not None:
            return self._idle.pop(i), start
        return GeneratorSlot(self.model, self.max_seq_len), start

    def _leave(self, running: Running, healthy: bool = True) -> None:
        """`running` leaves the batch; its generator is kept for reuse unless a pass on it failed (then dropped), at
        the end of the idle list (most recently used last)."""
        self._active.remove(running)
        if healthy:
            self._idle.append(running.slot)

    def _release(self, pending: Pending) -> None:
        for running in self._active:
            if running.pending is pending:
                self._leave(running)
                return

    # ---- model work ---------------------------------------------------------------------------

    def _feed(self, running: Running, tokens: list[int]) -> None:
        """Feed `tokens`; when the prompt is done, score or pick the next token."""
        try:
            logits = running.slot.feed(tokens)
        except Exception as e:  # noqa: BLE001 - fail this request, drop its generator, keep serving
            log.exception("rid=%s ortgenai forward failed", running.pending.request_id)
            self._leave(running, healthy=False)
            self._fail(running.pending, EngineError(f"ortgenai forward failed: {e!r}"))
            return
        running.length += len(tokens)
        if running.readout is not None and running.next_token is None:
            last = running.length - 1
            for c, (position, token) in enumerate(zip(running.readout.positions, running.readout.tokens)):
                if position == last:
                    running.read[c] = float(logits[int(token)])
        if running.todo:
            return
        request = running.pending.request
        try:  # non-finite readouts (palr.ranking.finite_readout) fail this request only
            if running.next_token is None and request.mode == "generate" and request.readout is not None:
                running.bias = decoding_bias(running.bias, running.read)
            scores = label_log_probs(torch.tensor(running.read)) if (
                running.next_token is None and request.mode == "score") else None
        except EngineError as e:
            log.error("rid=%s ortgenai readout failed: %s", running.pending.request_id, e)
            self._leave(running)
            self._fail(running.pending, e)
            return
        if scores is not None:
            running.pending.prefilled = time.perf_counter()
            self._count(cached_tokens=running.cached)
            self._leave(running)
            self._finish(running.pending, sorted(range(len(scores)), key=lambda c: -scores[c]), scores,
                         running.cached, 0)
            return
        if running.next_token is None:
            running.pending.prefilled = time.perf_counter()
            self._count(cached_tokens=running.cached)
            if not request.decodes:  # logit weight 0: the answer is the bias's order, no decode step
                self._leave(running)
                self._finish_by_bias(running.pending, running.bias, running.cached)
                return
        self._emit(running, logits)

    def _emit(self, running: Running, logits: np.ndarray) -> None:
        constraint = running.pending.constraint
        try:
            allowed = constraint.allowed_tokens()
            token = pick_allowed(allowed, torch.from_numpy(logits[allowed]), constraint, running.bias,
                                 running.pending.request.logit_weight)
            constraint.advance(token)
        except Exception as e:  # noqa: BLE001 - a bad constraint fails its own request only
            self._leave(running)
            self._fail(running.pending, EngineError(f"constrained decoding failed: {e!r}"))
            return
        running.generated += 1
        self._count(generated_tokens=1)
        if constraint.done:
            self._leave(running)
            self._finish(running.pending, constraint.emitted(), None, running.cached, running.generated)
        else:
            running.next_token = token

