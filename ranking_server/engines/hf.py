"""`hf` engine: the transformers model with in-flight (continuous) batching, CPU and CUDA.

One engine thread runs the scheduler. Every step it
  1. admits waiting requests into free slots (up to `max_batch_size`), copying the longest cached start
     of the prompt into the slot: the user's context (profile + history, an LRU bounded by
     `context_cache_mb`: a user's repeat call runs only its candidates), else the shared instruction
     prefix (`prefix_reuse`); what was not cached is stored once the slot has computed it. A request whose
     user's context another running request, ahead of it in turn, is computing waits for that one's pass
     and copies the context then (a page reloading while its first call is in flight);
  2. runs ONE batched decode pass for every request that is generating: each feeds its next token and a
     draft of the bias's own next picks (`draft_tokens` a pass, shared by the generating rows; the fused
     scores decide most picks when the label-logit weight is small), keeps what its constrained picks
     confirm and drops the rest's KV (exact: the answers of one token a pass, in fewer passes);
  3. spends what is left of `max_tokens_per_step` on prompt chunks of requests still prefilling
     (long prompts are chunked, so decodes keep flowing while a new prompt goes in), score requests
     first (`score_first_ms`: a score request is done when its prompt is); when a queue builds a pass
     takes the first prompt and other waiting prompts of about its length (`SHARE_FROM`, `PAD_WASTE`,
     `shared_pass_tokens`); between passes it admits what arrived and plans again, so a new score
     request waits for the pass that is running, not for the rest of the step;
  4. finishes what is done: score mode reads each candidate's readout logit (a label after the prompt, or
     the score row at the candidate's own last token, taken from whichever chunk held that position);
     generate mode picks each row's next token under its own constraint. Finished requests leave.

KV layout (`SlotKVCache`): slots `[0, n_decoding)` hold generating requests, the next slots hold
requests still prefilling, the rest are free; so a decode pass reads one contiguous view. Moving
between regions swaps two rows once per request (a few MB), never per step.

Logits are computed only for the tokens a request may emit (the labels), not the whole vocabulary:
the LM head is ~20 % of this model's weights, so this is ~20 % of a decode step saved.

The one-at-a-time reference in `palr.llm` defines the answers; tests check this engine reproduces them.
"""

from __future__ import annotations

import logging
import time
import dataclasses
from dataclasses import dataclass, field

import torch

from palr.decoding import DecodingConstraint
from palr.llm import (
    accept_draft, draft_by_bias, label_log_probs, model_device, next_draft_limit, pick_allowed, readout_logits,
    token_logits)
from palr.precision import layer_dtypes
from palr.prompt import Readout
from palr.ranking import decoding_bias
from palr.serving.streak import LIMIT, FailureStreak
from ranking_server.engines.base import EngineError
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.kv import SlotKVCache, pass_input_ids, pass_width
from ranking_server.engines.loop import LoopEngine, Pending, StepRecord
from ranking_server.engines.lru import LRU

log = logging.getLogger(__name__)

MAX_FAILED_PASSES = LIMIT  # forward passes failing in a row that stop the engine (the device, not the requests)
# Prompts share a pass when a queue builds: with at least SHARE_FROM prompts waiting, a pass takes the first one
# and the others that fit whole, while padding every row to the longest adds at most PAD_WASTE of the pass's
# tokens and the pass as it runs (its rows at `pass_width`) stays within `EngineConfig.shared_pass_tokens` (768:
# about two fresh prompts or four context hits). Each pass has a fixed cost (~9 ms on the quick bundle's 4-layer
# bf16 build, 2 CPU cores) and wider matmuls run faster: one pass over two 190-token prompts took 0.78x the time of
# two passes, four 350-token prompts 0.83x. A bigger pass makes a score request arriving during it wait longer, so
# fewer waiting prompts keep one pass each and the pass is capped: on the 80/20 score / decoding-generate mix (open
# loop, 2 rounds) this kept score p95 within the single-pass figures at 0.6-0.9 of capacity and took closed-loop
# throughput 1.17x (docs/serving.md).
SHARE_FROM = 3
PAD_WASTE = 0.25


@dataclass(eq=False)
class Row:
    """A running request's state in the batch."""

    pending: Pending
    slot: int
    todo: list[int]                # prompt tokens not yet in the KV cache
    length: int = 0                # tokens in the KV cache
    cached: int = 0                # prompt tokens copied from the prefix or context cache
    snapshots: list = field(default_factory=list)  # (length, key, cache): store the KV once `length` reaches it
    next_token: int | None = None  # generate mode: the token to feed next
    generated: int = 0
    draft_limit: int = 1           # generate mode: tokens to draft in the next pass (palr.llm.next_draft_limit)
    readout: Readout | None = None     # what score mode reads (positions in the prompt)
    read: list[float | None] | None = None  # each candidate's readout logit, once its position has run
    bias: list[float] | None = None    # generate mode: the decoding bias (request bias + readouts)
    waits_for: tuple[int, ...] | None = None  # a context key another row is computing: copied once it is stored

    @property
    def constraint(self) -> DecodingConstraint | None:
        return self.pending.constraint


def kv_bytes(layers) -> int:
    """Memory of one stored KV (per layer: keys, values)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class HFEngine(LoopEngine):
    """In-flight batching over a transformers causal LM (weights and modules stay the model's)."""

    def __init__(self, model, config: EngineConfig | None = None, name: str = "hf-inflight"):
        config = config or EngineConfig()
        text = model.config.get_text_config()
        super().__init__(name, vocab_size=text.vocab_size, max_seq_len=config.max_seq_len,
                         max_queue=config.max_queue, num_threads=config.num_threads,
                         score_first_ms=config.score_first_ms)
        self.config = config
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.device = model_device(model)
        self.kv = SlotKVCache(model.config, config.max_batch_size, config.max_seq_len, layer_dtypes(model),
                              self.device)
        self.prefixes = LRU(config.prefix_cache_size)
        self.contexts = LRU(config.context_cache_mb * 2 ** 20, weigh=kv_bytes)
        self._slots: list[Row] = []        # index = slot; [0, n_decoding) are generating
        self._n_decoding = 0
        self._held = 0                     # most slots held at once in the current step
        self._failed_passes = FailureStreak()  # forward passes failed in a row (see _pass_failed)
        self._by_id: dict[str, Row] = {}
        self.start()

    # ---- scheduling ---------------------------------------------------------------------------

    def _step(self) -> bool:
        self._admit_new()
        if not self._slots:
            return False
        self._held = len(self._slots)
        budget = self.config.max_tokens_per_step
        decoding = self._slots[:self._n_decoding]
        fed = self._decode(decoding, budget) if decoding else 0
        chunks = self._prefill_passes(budget - fed)
        self._record_step(StepRecord(len(decoding), len(chunks), fed + sum(n for _, n in chunks), self._held))
        return True

    def _prefill_passes(self, budget: int) -> list[tuple[Row, int]]:
        """Spend `budget` on prompt passes (`_next_pass`). Before each pass the next one is planned again, after
        admitting what arrived, so a score request that arrives mid-step waits for the pass that is running, not
        for every prompt the step could hold; a request aborted meanwhile (its caller's deadline) leaves before the
        next pass instead of being run, oldest first, for nobody. Returns the chunks that ran."""
        ran = []
        while group := self._next_pass(budget, cut=not ran):
            self._prefill(group)
            ran += group
            budget -= sum(n for _, n in group)
            self._drain_aborts()
            self._admit_new()
            self._held = max(self._held, len(self._slots))  # slots held at once during the step
        return ran

    def _next_pass(self, budget: int, cut: bool) -> list[tuple[Row, int]]:
        """The next prompt pass within the token budget, or [] for none. It starts with the prefilling row first
        in `_priority` order (arrival, score requests ahead; slot order is not arrival order once rows have
        moved): its prompt runs whole when it fits what is left of the budget, and only the first prompt of a
        step is cut to fit (`cut`; cutting a prompt that would fit a later step only adds a pass and its fixed
        cost). Then, when at least `SHARE_FROM` prompts wait, the others in that order that fit whole in what is
        left, within `PAD_WASTE` and `shared_pass_tokens`; their rows are moved into the slots after the first
        one (a pass runs contiguous slots)."""
        self._resume_waiting()
        waiting = sorted((row for row in self._slots[self._n_decoding:] if row.waits_for is None),
                         key=lambda row: self._priority(row.pending))
        if budget <= 0 or not waiting:
            return []
        first, n = waiting[0], len(waiting[0].todo)
        if n > budget and not cut:
            return []
        group = [(first, min(n, budget))]
        left = budget - group[0][1]
        others = waiting[1:] if len(waiting) >= SHARE_FROM else []  # fewer waiting: a pass each
        for row in others:
            counts = [count for _, count in group] + [len(row.todo)]
            padded = max(counts) * len(counts)  # every row padded to the longest
            if (counts[-1] <= left and padded - sum(counts) <= PAD_WASTE * sum(counts)
                    and pass_width(counts) * len(counts) <= self.config.shared_pass_tokens):  # what the pass runs
                group.append((row, counts[-1]))
                left -= counts[-1]
        for i, (row, _) in enumerate(group):
            self._swap(row.slot, self._n_decoding + i)
        return group

    def _admit_new(self) -> None:
        """In-flight: fill every free slot from the queue, at every step and between prompt passes."""
        for pending in self._take(self.config.max_batch_size - len(self._slots)):
            self._admit(pending)

    # ---- admission and leaving ----------------------------------------------------------------

    def _admit(self, pending: Pending) -> None:
        request = pending.request
        readout = request.score_readout() if request.mode == "score" or request.readout is not None else None
        row = Row(pending, slot=len(self._slots), todo=request.run_ids, readout=readout,
                  draft_limit=self.config.draft_tokens,
                  read=[None] * len(readout) if readout is not None else None,
                  bias=list(request.bias) if request.bias is not None else None)
        self._slots.append(row)
        self._by_id[pending.request_id] = row
        context = self._context_computed_ahead(pending)
        if context is not None:
            row.waits_for = context
        else:
            self._copy_cached_start(row)

    def _copy_cached_start(self, row: Row) -> None:
        """Copy the longest cached start of the row's prompt into its slot; the starts not cached are stored once
        the row has computed them (`snapshots`)."""
        request = row.pending.request
        for key, cache in self._reusable_starts(request):  # the longest first
            stored = cache.get(key)
            if stored is not None:
                self.kv.write_prefix(row.slot, stored)
                row.length = row.cached = len(key)
                row.todo = request.run_ids[len(key):]
                return
            if cache is not self.contexts or self._context_fits(key):  # one the cache cannot hold: no copy made
                row.snapshots.append((len(key), key, cache))

    def _computing(self, key: tuple[int, ...]) -> list[Row]:
        """The rows that will store the context `key` once their pass reaches its end."""
        return [row for row in self._slots if any(k == key and cache is self.contexts for _, k, cache in row.snapshots)]

    def _context_computed_ahead(self, pending: Pending) -> tuple[int, ...] | None:
        """The request's context key when it is not cached and a running row ahead of it in `_priority` order
        computes it (that row's pass runs first anyway: waiting for it costs this request nothing and saves the
        context's tokens); else None. A row behind it is not waited for: this one computes the context too."""
        request = pending.request
        if not (self.config.context_cache_mb and request.context_len):
            return None
        key = request.context_key
        if key in self.contexts or not self._context_fits(key):  # never stored: waiting would only delay it
            return None
        return key if self._computed_ahead_of(key, pending) else None

    def _context_fits(self, key: tuple[int, ...]) -> bool:
        """Whether a context's KV fits the cache's whole bound (`--context-cache-mb`); the LRU keeps none that
        does not."""
        return len(key) * self.kv.bytes_per_token <= self.contexts.capacity

    def _computed_ahead_of(self, key: tuple[int, ...], pending: Pending) -> bool:
        """Whether a row ahead of `pending` in `_priority` order computes the context `key`."""
        return any(self._priority(row.pending) <= self._priority(pending) for row in self._computing(key))

    def _resume_waiting(self) -> None:
        """Rows waiting for a context that no row ahead of them computes any more (stored, or its row failed or
        left; a row admitted behind them since is not waited for, as at admission) copy their cached start now: a
        hit, or (nothing stored) they compute it themselves."""
        for row in self._slots[self._n_decoding:]:
            if row.waits_for is not None and not self._computed_ahead_of(row.waits_for, row.pending):
                row.waits_for = None
                self._copy_cached_start(row)

    def _reusable_starts(self, request) -> list[tuple[tuple[int, ...], LRU]]:
        """(prompt start, its cache), longest first: the user's context, the shared prefix."""
        starts = []
        if self.config.context_cache_mb and request.context_len:
            starts.append((request.context_key, self.contexts))
        if self.config.prefix_reuse and request.prefix_ids:
            starts.append((tuple(int(t) for t in request.prefix_ids), self.prefixes))
        return starts

    def stats(self):
        return dataclasses.replace(super().stats(), context_hits=self.contexts.hits, context_misses=self.contexts.misses,
                                   context_evictions=self.contexts.evictions, context_bytes=int(self.contexts.weight))

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self._slots[i], self._slots[j]
        self.kv.swap(i, j, max(a.length, b.length))
        self._slots[i], self._slots[j] = b, a
        a.slot, b.slot = j, i

    def _leave(self, row: Row) -> None:
        """Free the request's slot, keeping the decoding rows, then the prefilling rows, contiguous."""
        if row.slot < self._n_decoding:
            self._n_decoding -= 1
            self._move_into(self._n_decoding, row.slot)
        self._move_into(len(self._slots) - 1, row.slot)
        self._slots.pop()
        del self._by_id[row.pending.request_id]

    def _move_into(self, src: int, dst: int) -> None:
        """Move the request in slot `src` into slot `dst`, whose request is leaving (goes to `src`)."""
        if src == dst:
            return
        leaving, moving = self._slots[dst], self._slots[src]
        self.kv.move(src, dst, moving.length)
        self._slots[dst], self._slots[src] = moving, leaving
        moving.slot, leaving.slot = dst, src

    def _release(self, pending: Pending) -> None:
        """An aborted or failed request's slot, freed and zeroed (whatever it wrote, non-finite values too, stays
        with no one; aborts and failures are rare: a whole-slot zero is cheap beside them)."""
        row = self._by_id.get(pending.request_id)
        if row is not None:
            self.kv.clear(row.slot)
            self._leave(row)

    def _fail_rows(self, rows: list[Row], error: Exception, what: str) -> None:
        log.exception("%s failed for %d request(s): %s", what, len(rows),
                      " ".join(f"rid={row.pending.request_id}" for row in rows), exc_info=error)
        for row in rows:
            if row.pending.request_id in self._by_id:
                self._release(row.pending)  # zeroed: whatever the failure left there stays with no one
                self._fail(row.pending, EngineError(f"{what} failed: {error!r}"))

    # ---- model work ---------------------------------------------------------------------------

    def _forward(self, first: int, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run rows `[first, first + B)` on their new tokens; their hidden states `[B, T, D]` (row i's
        tokens in columns `[0, len(tokens[i]))`)."""
        plan = self.kv.plan(first, starts, [len(t) for t in tokens])
        out = self.decoder(input_ids=pass_input_ids(tokens, self.device), attention_mask=plan.attention_mask(),
                           position_ids=plan.position_ids(), past_key_values=self.kv, use_cache=True)
        self._failed_passes.succeeded()
        return out.last_hidden_state

    def _pass_failed(self, rows: list[Row], error: Exception, what: str) -> None:
        """A forward pass raised: its rows fail; after MAX_FAILED_PASSES in a row the device is what is broken
        (a sticky CUDA error), not the requests, and the loop stops so health says so (it stayed SERVING while
        every answer came back degraded)."""
        if self._failed_passes.failed():  # the loop's crash handler fails every request, these too
            raise EngineError(f"{MAX_FAILED_PASSES} forward passes failed in a row; the last: {error!r}")
        self._fail_rows(rows, error, what)

    def _read(self, row: Row, hidden: torch.Tensor, start: int) -> None:
        """Readout logits of the row's candidates whose positions are among `hidden` `[n, D]` (prompt
        positions start.. start + n)."""
        if row.readout is None:
            return
        end = start + hidden.shape[0]
        here = [c for c, p in enumerate(row.readout.positions) if start <= p < end]
        if here:
            part = Readout(tuple(row.readout.positions[c] for c in here), tuple(row.readout.tokens[c] for c in here))
            for c, value in zip(here, readout_logits(self.lm_head, hidden, start, part).tolist()):
                row.read[c] = value

    def _decode(self, rows: list[Row], budget: int) -> int:
        """One batched decode pass over slots `[0, len(rows))`: each row feeds its next token and a draft of
        the bias's next picks (`palr.llm.draft_by_bias`), keeps the fed tokens its constrained picks confirm
        (`accept_draft`), and finishes when its constraint is done. The rows share `draft_tokens` a pass
        (and `budget`): a lone row drafts many, a full batch one each, since on a compute-bound device a
        wider pass costs more and a draft that misses is work thrown away. Returns the tokens fed."""
        room = budget if len(self._slots) == len(rows) else budget // 2  # prompts waiting keep half the step
        share = max(1, min(room, self.config.draft_tokens) // len(rows))
        drafts, failed = [], []
        for row in rows:  # nobody leaves before the pass: rows must stay in slots [0, len(rows))
            try:
                drafts.append(draft_by_bias(row.constraint, row.bias, min(row.draft_limit, share)))
            except Exception as e:  # noqa: BLE001 - a bad constraint fails its own request only
                drafts.append([])
                failed.append((row, e))
        fed = [[row.next_token, *draft[:-1]] for row, draft in zip(rows, drafts)]
        try:
            hidden = self._forward(0, fed, [s.length for s in rows])  # [B, T, D]
        except Exception as e:  # noqa: BLE001 - fail these rows, keep serving
            self._pass_failed(rows, e, "decode pass")
            return sum(map(len, fed))
        for i, (row, draft) in enumerate(zip(rows, drafts)):  # all lengths first: a row leaving below moves
            if not draft:                                      # other rows' KV up to their length
                continue
            try:
                picked, token = accept_draft(row.constraint, draft,
                                             lambda j, allowed, i=i: token_logits(self.lm_head, hidden[i, j], allowed),
                                             row.bias, row.pending.request.logit_weight)
            except Exception as e:  # noqa: BLE001
                failed.append((row, e))
                continue
            row.length += picked
            row.generated += picked
            row.next_token = token
            row.draft_limit = next_draft_limit(row.draft_limit, self.config.draft_tokens, picked, len(draft),
                                               token == draft[picked - 1])
            self._count(generated_tokens=picked)
        for row, error in failed:
            self._fail_rows([row], error, "constrained decoding")
        for row in [r for r in rows if r.pending.request_id in self._by_id and r.constraint.done]:
            self._leave(row)
            self._finish(row.pending, row.constraint.emitted(), None, row.cached, row.generated)
        return sum(map(len, fed))

    def _allowed_tokens(self, rows: list[Row]) -> dict[Row, list[int]]:
        """Each row's allowed tokens; a row whose constraint raises fails alone (and leaves)."""
        allowed = {}
        for row in rows:
            try:
                allowed[row] = row.constraint.allowed_tokens()
            except Exception as e:  # noqa: BLE001
                self._fail_rows([row], e, "constrained decoding")
        return allowed

    def _emit(self, row: Row, allowed: list[int], allowed_logits: torch.Tensor) -> None:
        """Pick the row's next token under its constraint; finish it when the constraint is done."""
        try:
            token = pick_allowed(allowed, allowed_logits, row.constraint, row.bias, row.pending.request.logit_weight)
            row.constraint.advance(token)
        except Exception as e:  # noqa: BLE001 - a bad constraint fails its own request only
            self._fail_rows([row], e, "constrained decoding")
            return
        row.generated += 1
        self._count(generated_tokens=1)
        if row.constraint.done:
            self._leave(row)
            self._finish(row.pending, row.constraint.emitted(), None, row.cached, row.generated)
        else:
            row.next_token = token

    def _prefill(self, group: list[tuple[Row, int]]) -> None:
        """Run one pass of prompt chunks for rows in contiguous slots; finish the prompts that are done."""
        rows = [row for row, _ in group]
        first = rows[0].slot
        assert [s.slot for s in rows] == list(range(first, first + len(rows))), "prefill rows must be contiguous"
        try:
            hidden = self._forward(first, [row.todo[:n] for row, n in group], [s.length for s in rows])
        except Exception as e:  # noqa: BLE001
            self._pass_failed(rows, e, "prefill pass")
            return
        self._count(prompt_tokens=sum(n for _, n in group))
        failed = []
        for i, (row, n) in enumerate(group):  # all lengths first: finishing rows below move other rows' KV
            try:
                self._read(row, hidden[i, :n], row.length)
            except Exception as e:  # noqa: BLE001 - e.g. a one-off device error: this row only, after the loop
                failed.append((row, e))
            row.todo = row.todo[n:]
            row.length += n
            for snapshot in [s for s in row.snapshots if row.length >= s[0]]:
                self._store_snapshot(row, *snapshot)
                row.snapshots.remove(snapshot)
        for row, error in failed:
            self._fail_rows([row], error, "readout")
        for i, (row, n) in enumerate(group):
            if not row.todo and row.pending.request_id in self._by_id:
                try:
                    self._prompt_done(row, hidden[i, n - 1])
                except Exception as e:  # noqa: BLE001
                    self._fail_rows([row], e, "readout")

    def _store_snapshot(self, row: Row, at: int, key, cache) -> None:
        """Keeps the row's KV up to `at` for later requests with the same prefix or context; an optimisation,
        so a failure (a one-off out-of-memory copying it) is logged and skipped, not the request's error."""
        if key in cache:
            return
        try:
            layers = self.kv.read_prefix(row.slot, at)
            if not all(bool(torch.isfinite(k).all() and torch.isfinite(v).all()) for k, v in layers):
                log.warning("a %d-token KV snapshot is not finite (an overflowed pass); not keeping it", at)
                return  # kept, every later call with this prefix or context would fail on it
            cache.put(key, layers)
        except Exception:  # noqa: BLE001
            log.warning("could not keep a %d-token KV snapshot; serving on without it", at, exc_info=True)

    def _prompt_done(self, row: Row, hidden: torch.Tensor) -> None:
        """Score mode: readout log-probs, done. Generate mode: first pick, then join the decoding rows."""
        pending = row.pending
        pending.prefilled = time.perf_counter()
        self._count(cached_tokens=row.cached)
        request = pending.request
        if row.read is not None and any(v is None for v in row.read):
            self._fail_rows([row], EngineError("a readout position was never run (inside the cached prefix?)"),
                            "readout")
            return
        if request.mode == "generate" and request.readout is not None:
            row.bias = decoding_bias(row.bias, row.read)
        if request.mode == "score":
            scores = label_log_probs(torch.tensor(row.read))
            order = sorted(range(len(scores)), key=lambda c: -scores[c])
            self._leave(row)
            self._finish(pending, order, scores, row.cached, 0)
            return
        if not request.decodes:  # logit weight 0: the answer is the bias's order, no decode pass
            self._leave(row)
            self._finish_by_bias(pending, row.bias, row.cached)
            return
        self._swap(row.slot, self._n_decoding)
        self._n_decoding += 1
        allowed = self._allowed_tokens([row]).get(row)
        if allowed:
            self._emit(row, allowed, token_logits(self.lm_head, hidden[None], allowed)[0])
        elif allowed is not None:  # (None: its constraint raised, and it failed above) nothing to decode: it fails
            self._fail_rows([row], EngineError("the answer's constraint allows no first token"),  # alone, not the
                            "constrained decoding")  # next decode pass of every row beside it
