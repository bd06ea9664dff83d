"""The one engine interface the ranking server talks to (a vLLM-style engine client).

    result = await engine.rank(EngineRequest(...))   # raises EngineOverloaded at once when the queue is full
    engine.abort(request_id)                          # client cancelled / deadline near: frees its batch slot
    engine.check_health(), engine.stats(), engine.close()

Every backend (hf in-flight batching, the benchmark baselines, trtllm on GPUs) answers the same
requests with the same results; only the scheduling differs. The shape fits TensorRT-LLM's LLM API:
`rank` = `await llm.generate_async(...)`, `abort` = `RequestOutput.abort()`.

Import-light: no torch here, so the server and the benchmark import it freely.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from palr.decoding import DecodingConstraint, LabelConstraint
from palr.errors import EngineError
from palr.prompt import Readout
from palr.ranking import MODES

__all__ = ["MODES", "EngineError"]  # re-exported: every engine takes them from here


class EngineOverloaded(EngineError):
    """Admission queue full: rejected at once (the server answers RESOURCE_EXHAUSTED)."""


class EngineAborted(EngineError):
    """The request was aborted (client cancel, deadline) before it finished."""


class InvalidRequest(EngineError, ValueError):
    """The request itself is malformed (the server answers INVALID_ARGUMENT); the message names the field."""


@dataclass(frozen=True)
class EngineRequest:
    """One ranking request on token ids. The prompt is `prefix_ids + suffix_ids`; `prefix_ids` is the
    instruction preamble shared by all requests (its KV is reused), `suffix_ids` this user's part, whose
    first `context_len` tokens are the user's context (profile + history: its KV may be kept for the
    user's next call), the rest the candidates.

    mode "score": one forward pass, a log-probability per candidate: the log-softmax over the candidates of
    their `readout` logits (`palr.prompt.Readout`: token and prompt position per candidate; None = each
    label's logit after the prompt).
    mode "generate": the model names `k` distinct candidates in order, under `constraint()` (default:
    `LabelConstraint(label_token_ids, k)`), with `bias` (one additive logit per candidate) applied to
    the token that starts each candidate, the model's logits weighted by `logit_weight`; with a `readout`
    (candidate-readout rankers) each candidate's readout logit from the same prefill joins its bias
    (`palr.ranking.decoding_bias`).
    """

    request_id: str
    prefix_ids: Sequence[int]
    suffix_ids: Sequence[int]
    label_token_ids: Sequence[int]
    mode: str = "score"
    k: int = 10
    bias: Sequence[float] | None = None
    constraint: Callable[[], DecodingConstraint] | None = field(default=None, compare=False)
    readout: Readout | None = None
    context_len: int = 0
    logit_weight: float = 1.0  # generate mode: weight of the model's own logits against the bias

    @property
    def input_ids(self) -> list[int]:
        return [*self.prefix_ids, *self.suffix_ids]

    @property
    def decodes(self) -> bool:
        """Whether the request goes on after its prompt: generate mode with the model's logits weighted in.
        A score request, and a generate one at `logit_weight` 0 (its answer is the bias's order, written
        once the prompt's readouts are in), end with their prompt."""
        return self.mode == "generate" and self.logit_weight != 0

    @property
    def reads_prompt(self) -> bool:
        """Whether the answer depends on a pass over the prompt. Not for a generate request at `logit_weight` 0
        that reads the labels (no `readout`): its picks are the bias's order (`palr.llm.emit_by_bias`), the
        same whatever the model would compute, so no engine runs its prompt (`answer_by_bias`)."""
        return self.mode == "score" or self.decodes or self.readout is not None

    @property
    def run_ids(self) -> list[int]:
        """The prompt tokens an engine runs: all of them for a request that decodes; one that ends with its
        prompt stops at its last readout position (`Readout.end`: the closing chat turn after the candidates
        changes no readout)."""
        ids = self.input_ids
        return ids if self.decodes else ids[:self.score_readout().end]

    @property
    def context_key(self) -> tuple[int, ...]:
        """The prompt up to the end of the user's context: what a context KV cache is keyed by."""
        return tuple(int(t) for t in (*self.prefix_ids, *self.suffix_ids[:self.context_len]))

    def tokens_needed(self, constraint: DecodingConstraint | None) -> int:
        """KV positions the request takes: its prompt, plus in generate mode the most `constraint` writes."""
        return len(self.prefix_ids) + len(self.suffix_ids) + (constraint.max_new_tokens if constraint else 0)

    def score_readout(self) -> Readout:
        """What score mode reads: the request's readout, or each label after the prompt."""
        if self.readout is not None:
            return self.readout
        return Readout.after_prompt(len(self.prefix_ids) + len(self.suffix_ids), self.label_token_ids)

    def validate(self, vocab_size: int, max_seq_len: int) -> DecodingConstraint | None:
        """Check the request; returns a fresh constraint for generate mode (None for score mode).

        Raises InvalidRequest naming the bad field."""
        if self.mode not in MODES:
            raise InvalidRequest(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.suffix_ids:
            raise InvalidRequest("suffix_ids is empty: the prompt must end with the request's own tokens")
        if not 0 <= self.context_len < len(self.suffix_ids):
            raise InvalidRequest(f"context_len must be between 0 and {len(self.suffix_ids) - 1} (the candidates "
                                 f"follow the context), got {self.context_len}")
        labels = list(self.label_token_ids)
        if not labels:
            raise InvalidRequest("label_token_ids is empty: there is no candidate to rank")
        bad = [t for t in (*labels, *self.prefix_ids, *self.suffix_ids) if not 0 <= int(t) < vocab_size]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        if self.bias is not None and len(self.bias) != len(labels):
            raise InvalidRequest(f"bias has {len(self.bias)} values for {len(labels)} candidates")
        if self.readout is not None:
            self._validate_readout(len(labels), vocab_size)
        constraint = None
        if self.mode == "generate":
            try:
                constraint = self.constraint() if self.constraint else LabelConstraint(labels, self.k)
            except ValueError as e:
                raise InvalidRequest(f"k/label_token_ids: {e}") from e
        elif self.readout is None and len(set(labels)) != len(labels):
            raise InvalidRequest(f"label_token_ids has duplicates: {labels}")
        needed = self.tokens_needed(constraint)
        if needed > max_seq_len:
            raise InvalidRequest(f"prompt plus generated tokens ({needed}) exceed max_seq_len={max_seq_len}")
        return constraint


    def _validate_readout(self, candidates: int, vocab_size: int) -> None:
        readout = self.readout
        if len(readout) != candidates:
            raise InvalidRequest(f"readout has {len(readout)} entries for {candidates} candidates")
        start = len(self.prefix_ids) + self.context_len
        end = len(self.prefix_ids) + len(self.suffix_ids)
        outside = [p for p in readout.positions if not start <= int(p) < end]
        if outside:
            raise InvalidRequest(f"readout positions {outside[:5]} are outside the request's own tokens "
                                 f"[{start}, {end}) (never in the shared prefix or the user's context)")
        bad = [t for t in readout.tokens if not 0 <= int(t) < vocab_size]
        if bad:
            raise InvalidRequest(f"readout token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        pairs = list(zip(readout.positions, readout.tokens))
        if len(set(pairs)) != len(pairs):
            raise InvalidRequest("readout reads the same token at the same position for two candidates")


@dataclass(frozen=True)
class EngineTimings:
    queue_ms: float      # submitted -> admitted into the batch
    prefill_ms: float    # admitted -> prompt fully in the KV cache
    decode_ms: float     # prompt done -> last token (0 in score mode)
    total_ms: float      # submitted -> answer


@dataclass(frozen=True)
class EngineResult:
    """`order`: candidate positions best first (score mode: by score; generate mode: as emitted).
    `scores`: score mode only, each candidate's log-probability (its readout), in candidate order."""

    request_id: str
    mode: str
    order: list[int]
    scores: list[float] | None
    prompt_tokens: int      # prompt length
    cached_tokens: int      # prompt tokens whose KV came from the shared-prefix cache
    generated_tokens: int
    timings: EngineTimings
    batch_size: int = 0     # most requests in the engine's running batch while this one ran (0: not known)
    answer_reused: bool = False  # the answer to an identical earlier request (`AnswerCache`): no model time
    answer_joined: bool = False  # ... that was running when this one came: it waited for that run's slot and passes


def emit_answer(constraint: DecodingConstraint, bias: Sequence[float] | None) -> int:
    """Generate mode at logit weight 0: `constraint` advanced through the bias's order (`palr.llm.emit_by_bias`);
    the tokens written. A constraint that fails raises EngineError: the request's own failure (the server answers it
    degraded), never the engine's."""
    from palr.llm import emit_by_bias  # torch: imported where used, so this module stays import-light

    try:
        return emit_by_bias(constraint, bias)
    except EngineError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad constraint fails its own request only
        raise EngineError(f"constrained decoding failed: {e!r}") from e


def answer_by_bias(request: EngineRequest, constraint: DecodingConstraint, started: float) -> EngineResult:
    """A generate request at logit weight 0: the constrained answer in the bias's order (`emit_answer`), `started`
    (perf_counter) to now; no prompt token runs (`EngineRequest.reads_prompt` is False, or its readouts are already
    in the bias). `constraint` is the request's fresh one (`validate`)."""
    written = emit_answer(constraint, request.bias)
    total_ms = 1e3 * (time.perf_counter() - started)
    return EngineResult(request.request_id, request.mode, constraint.emitted(), None,
                        prompt_tokens=len(request.input_ids), cached_tokens=0, generated_tokens=written,
                        timings=EngineTimings(queue_ms=0.0, prefill_ms=total_ms, decode_ms=0.0, total_ms=total_ms))


def mean_batch(batch_size_hist: dict[int, int]) -> float:
    """Requests per step of a {batch size: steps} histogram (0.0 when it has no steps), to 2 decimals."""
    steps = sum(batch_size_hist.values())
    return round(sum(k * v for k, v in batch_size_hist.items()) / steps, 2) if steps else 0.0


@dataclass
class EngineStats:
    """A snapshot for metrics and the benchmark. Histograms map a size to how many steps had it."""

    engine: str
    healthy: bool
    active: int = 0                  # requests holding a batch slot now
    queued: int = 0                  # requests waiting for a slot
    completed: int = 0
    failed: int = 0
    aborted: int = 0
    rejected: int = 0                # EngineOverloaded
    steps: int = 0                   # engine iterations that ran the model
    prompt_tokens: int = 0           # prompt tokens run through the model (cached prefix excluded)
    cached_tokens: int = 0           # prompt tokens served from the prefix or context cache
    context_hits: int = 0            # requests whose user context KV was cached
    context_misses: int = 0          # requests with a context that was not (it is stored when computed)
    context_evictions: int = 0       # contexts dropped to stay within --context-cache-mb
    context_bytes: int = 0           # memory the cached contexts hold now
    answer_hits: int = 0             # requests answered from `AnswerCache` (an identical earlier request's answer)
    answer_misses: int = 0           # cacheable requests passed to the engine (the answers among them are kept)
    answer_evictions: int = 0        # answers dropped to stay within --answer-cache-size
    generated_tokens: int = 0        # answer tokens the model decoded
    written_tokens: int = 0          # answer tokens written from the bias (generate at logit weight 0): no model pass
    busy_s: float = 0.0              # time spent running steps
    max_active: int = 0              # highest concurrent batch seen
    max_step_tokens: int = 0         # most tokens one step ran
    batch_size_hist: dict[int, int] = field(default_factory=dict)   # requests in the running batch per step
    step_tokens_hist: dict[int, int] = field(default_factory=dict)  # tokens run per step

    @property
    def mean_batch(self) -> float:
        """Requests per engine step, averaged over the steps that ran (0.0 before any)."""
        return mean_batch(self.batch_size_hist)

    @property
    def tokens_per_s(self) -> float:
        """Tokens the model ran (prompt + decoded; not the bias-written ones) per second of engine busy time."""
        return (self.prompt_tokens + self.generated_tokens) / self.busy_s if self.busy_s else 0.0


class RankingEngine(ABC):
    """What the ranking server (and the benchmark) holds. Thread-safe `abort`/`check_health`/`stats`."""

    name: str = "engine"
    version: str = ""  # the weights it serves, as model_version names them (set by engines/factory.py)

    @abstractmethod
    async def rank(self, request: EngineRequest) -> EngineResult:
        """Rank one request. Raises InvalidRequest, EngineOverloaded (at once), EngineAborted, EngineError.
        Cancelling the awaiting task aborts the request."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; it leaves at the next step. False if unknown/finished."""

    @abstractmethod
    def check_health(self) -> bool:
        """True while the engine can serve (loop alive, not closed)."""

    @abstractmethod
    def stats(self) -> EngineStats:
        ...

    @abstractmethod
    def close(self) -> None:
        """Stop the engine; requests still pending fail with EngineError. Idempotent."""
