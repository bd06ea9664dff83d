"""The pure-Python half of the `trtllm` backend: an `EngineRequest` → TensorRT-LLM `SamplingParams`
arguments, the logits processor that enforces a generate-mode constraint inside TensorRT-LLM's
running batch, and TensorRT-LLM outputs → our answers. No TensorRT-LLM import here, so all of it is
tested on CPU tensors (tests/ranking_server/test_engines_trtllm_requests.py); `trtllm.py` wires it to the LLM API.

Score mode: `max_tokens=1` with `return_generation_logits=True`; the logits of that one generated
step are the next-token logits after the prompt, and the label log-softmax of them is the score
(as `palr.llm.score_labels`). Not context logits: with KV block reuse on, a request whose prefix
blocks are reused gets context logits only for the recomputed part, while the last prompt position
is always recomputed, so generation logits are exact under reuse.

Candidate readout (`EngineRequest.readout`, the score row read at each candidate's last prompt token):
`return_context_logits=True` (the engine is built with `gather_context_logits`) and the readout logits
are read from the context logits, whose rows are the last recomputed prompt positions (`readout_from_context`;
a position inside a reused KV block has no row, so the factory turns block reuse off for such rankers).
Generate mode of such a ranker first runs that score request, then decodes with the readouts added to the
bias (`palr.ranking.decoding_bias`): two prefills, where the torch engines need one.

Generate mode: greedy (`top_k=1`) with a per-request `logits_processor`. A processor, not guided
decoding: a regex/grammar over the labels cannot say "each label at most once, exactly k of them"
without listing every ordering (k! · C(n, k) alternatives), while a processor asks the request's
`DecodingConstraint` what is allowed now. When the constraint is done it allows only `end_id`, so
generation stops there; `max_tokens` = the constraint's bound + 1 is only a backstop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from palr.decoding import DecodingConstraint
from palr.llm import label_log_probs
from ranking_server.engines.base import EngineError, EngineRequest


class ConstraintLogitsProcessor:
    """`SamplingParams.logits_processor` for one request: leaves only the constraint's allowed tokens
    (plus their score-fusion bias), or only `end_id` once the constraint is done.

    TensorRT-LLM calls it as `(req_id, logits, token_ids, stream_ptr, client_id)` before each
    sampling step and expects `logits` edited in place. The processor may run in TensorRT-LLM's
    worker process on a pickled copy, so it keeps no outside state: the tokens generated so far
    are read back from `token_ids` (beam 0) and replayed into its own constraint. Whatever
    `token_ids` holds at the first call (the prompt, or nothing, depending on the backend) is
    taken as "before generation".
    """

    def __init__(self, constraint: DecodingConstraint, bias: Sequence[float] | None, end_id: int,
                 logit_weight: float = 1.0):
        self.constraint = constraint
        self.logit_weight = float(logit_weight)
        self.bias = [float(b) for b in bias] if bias is not None else None
        self.end_id = int(end_id)
        self._start: int | None = None  # len(token_ids[0]) at the first call
        self._replayed = 0

    def __call__(self, req_id: int, logits: torch.Tensor, token_ids: list[list[int]],
                 stream_ptr: int | None, client_id: int | None) -> None:
        self.catch_up(token_ids[0])
        allowed, extra = self.allowed_now()
        stream = torch.cuda.ExternalStream(stream_ptr) if stream_ptr is not None else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            mask = torch.full((logits.shape[-1],), -math.inf, dtype=logits.dtype, device=logits.device)  # [V]
            mask[torch.tensor(allowed, device=logits.device)] = torch.tensor(extra, dtype=logits.dtype,
                                                                             device=logits.device)
            if self.logit_weight != 1.0:
                logits *= self.logit_weight
            logits += mask  # broadcast over TensorRT-LLM's leading [beam, 1] dimensions

    def catch_up(self, tokens: Sequence[int]) -> None:
        """Advance the constraint over the tokens generated since the last call."""
        if self._start is None:
            self._start = len(tokens)
        for token in tokens[self._start + self._replayed:]:
            self._replayed += 1
            if not self.constraint.done:
                self.constraint.advance(int(token))

    def allowed_now(self) -> tuple[list[int], list[float]]:
        """(token ids allowed at this step, additive logit for each). The bias is shifted so its largest allowed
        value is 0: greedy picks the same token, and the values stay small where TensorRT-LLM's logits are bf16 or
        fp16 (at the fitted fusion weight, 1000, the bias runs to -10^4, where bf16's spacing is 8 to 64 and
        candidates a few units apart would tie, then go by label order)."""
        if self.constraint.done:
            return [self.end_id], [0.0]
        allowed = self.constraint.allowed_tokens()
        if self.bias is None:
            return allowed, [0.0] * len(allowed)
        extra = self.constraint.token_bias(self.bias)
        top = max(extra)
        return allowed, [e - top for e in extra] if math.isfinite(top) else extra



def sampling_kwargs(request: EngineRequest, constraint: DecodingConstraint | None, end_id: int) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.SamplingParams` for one request (greedy, no detokenization)."""
    common = {"top_k": 1, "detokenize": False, "end_id": int(end_id)}
    if request.mode == "score" and request.readout is not None:
        return {**common, "max_tokens": 1, "return_context_logits": True}
    if request.mode == "score":
        return {**common, "max_tokens": 1, "return_generation_logits": True}
    if constraint is None:
        raise EngineError("generate mode needs a constraint (EngineRequest.validate returns it)")
    return {**common, "max_tokens": constraint.max_new_tokens + 1,
            "logits_processor": ConstraintLogitsProcessor(constraint, request.bias, end_id, request.logit_weight)}


def label_scores(generation_logits: torch.Tensor, label_token_ids: Sequence[int]) -> list[float]:
    """Score mode: label log-probs from the logits of the one generated step (`[..., steps, V]`)."""
    first = generation_logits.reshape(-1, generation_logits.shape[-1])[0]  # [V]
    return label_log_probs(first[torch.as_tensor(list(label_token_ids), device=first.device)])


def readout_from_context(context_logits: torch.Tensor, prompt_len: int, readout) -> list[float]:
    """Each candidate's readout logit from context logits `[..., R, V]`, whose R rows are the prompt's last R
    positions (all of them without KV block reuse). Raises EngineError for a position with no row."""
    rows = context_logits.reshape(-1, context_logits.shape[-1])  # [R, V]
    first = prompt_len - rows.shape[0]
    missing = [p for p in readout.positions if p < first]
    if missing:
        raise EngineError(f"readout positions {missing[:3]} fall in KV blocks reused from an earlier request "
                          f"(context logits start at {first}); serve candidate-readout rankers with block reuse off")
    return [float(rows[p - first, t]) for p, t in zip(readout.positions, readout.tokens)]


def emitted_order(constraint: DecodingConstraint, token_ids: Sequence[int]) -> tuple[list[int], int]:
    """Generate mode: replay the generated tokens (end token and anything after the constraint finished
    excluded) into a fresh constraint; (candidate positions in emitted order, tokens consumed)."""
    used = 0
    for token in token_ids:
        if constraint.done:
            break
        constraint.advance(int(token))
        used += 1
    if not constraint.done:
        raise EngineError(f"generation stopped after {used} tokens, before the constraint was done "
                          f"(still allowed: {constraint.allowed_tokens()[:5]})")
    return constraint.emitted(), used
