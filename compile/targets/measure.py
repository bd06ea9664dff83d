"""Side-by-side measurements that decide what a CPU build keeps: latency (prefill of a ~350-token
prompt, one decode step) and ranking quality (agreement with the fp32 torch reference, NDCG@10 on
validation users), for several candidate runners of the same merged checkpoint.

The machine may be shared, so latency runs are interleaved (every candidate once per round, rounds
repeated) and medians are reported, next to the load average before and after.

A runner answers four questions on token ids:
    prefill(ids) -> seconds           one forward pass over the prompt (score mode's cost)
    decode(ids, steps) -> seconds     median time of one decode step after that prompt
    read(probe) -> Read               one forward pass: what score mode reads and the labels' next-token logits
    generate(probe, k, w) -> [pos]    generate mode (k labels), as palr.llm.generate_constrained

Generate mode's first pick comes from the prompt's forward pass alone (`first_pick`), so its agreement
with the reference is measured on every probe; whole generated lists (decode steps) on the first few.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from compile.sft_data import candidate_readout
from compile.steps import StepFailed
from palr import metrics
from palr.decoding import LabelConstraint
from palr.errors import EngineError
from palr.llm import generate_constrained, label_log_probs, model_device, pick_allowed, read_prompt, token_logits
from palr.machine import torch_threads
from palr.prompt import Readout
from palr.ranking import decoding_bias, fuse, generate_logit_weight, generation_bias, load_ranker, ranker_terms

log = logging.getLogger(__name__)

DECODE_ROWS = 20  # LM-head rows a timed decode step computes: a ranker's candidate labels


@dataclass(frozen=True)
class Probe:
    """One prompt: token ids, candidate labels, and for a validation user where the true next item is
    (None: retrieval missed it, a miss for NDCG); synthetic prompts have no target at all. A validation probe
    also carries what the server fuses the LLM's scores with (`palr.ranking.fuse`): the retrieval term, the head's
    per-candidate bias and the ranker's fusion weight, so the build judges the ranking the server answers with."""

    input_ids: list[int]
    label_token_ids: list[int]
    target_position: int | None
    validation: bool = True
    readout: Readout | None = None  # a candidate-readout ranker's (None: the labels after the prompt)
    prior: list[float] | None = None      # the retrieval term (`retrieval_prior`); None: nothing to fuse with
    head_bias: list[float] | None = None  # the ranking head's learned bias per candidate (`head_bias`)
    fusion_weight: float = 0.0

    def score_readout(self) -> Readout:
        return self.readout if self.readout is not None else Readout.after_prompt(len(self.input_ids),
                                                                                   self.label_token_ids)

    def served(self, scores: Sequence[float]) -> list[float]:
        """Score mode's answer as the server computes it from the LLM's scores (the scores as they are without a
        retrieval term)."""
        return fuse(scores, self.prior, self.fusion_weight, self.head_bias) if self.prior is not None else list(scores)

    def generation_bias(self) -> list[float] | None:
        """Generate mode's per-candidate bias as the server builds it (`prompts.engine_request`)."""
        return generation_bias(self.prior, self.fusion_weight, self.head_bias) if self.prior is not None else None

    def decoding_bias(self, readout: Sequence[float] | None, fused: bool = True) -> list[float] | None:
        """The bias generate mode's picks add to the label logits: the fusion bias (`fused`: as served; else the
        LLM's own picks), plus the readout logits of a candidate-readout ranker."""
        bias = self.generation_bias() if fused else None
        return decoding_bias(bias, readout) if self.readout is not None and readout is not None else bias


def load_probes(bundle, tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> tuple[list[Probe], str]:
    """`n` validation prompts from `llm/sft/valid.jsonl` when the bundle has them (real PALR prompts
    with targets), else synthetic ones (random tokens + the " A".." T" labels; agreement only)."""
    if bundle.has("sft_data"):
        path = bundle.path("sft_data") / "valid.jsonl"
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
        if rows:
            ranker = load_ranker(bundle)
            return [Probe(r["input_ids"], r["label_token_ids"], r.get("target_position"), readout=candidate_readout(r),
                          **served_terms(r, ranker)) for r in rows], \
                f"{len(rows)} validation users from {path.relative_to(bundle.root)}"
    rng = random.Random(seed)
    labels = [tokenizer.encode(f" {chr(ord('A') + i)}", add_special_tokens=False)[0] for i in range(20)]
    vocab = len(tokenizer)
    probes = [Probe([rng.randrange(100, vocab) for _ in range(prompt_tokens)], labels, None, validation=False)
              for _ in range(n)]
    return probes, f"{n} synthetic prompts of {prompt_tokens} random tokens (the bundle has no sft_data)"


def served_terms(row: dict, ranker: dict) -> dict[str, Any]:
    """A validation row's fusion terms under the bundle's ranker, as `compile merge` fits them and the server fuses
    them; {} without retrieval scores in the row or a ranker (nothing to fuse: the LLM's scores are the answer)."""
    if "retrieval_scores" not in row or not ranker:
        return {}
    prior, bias = ranker_terms(ranker, row["retrieval_scores"], row.get("trend"), row.get("collab"), row.get("ranks"))
    return {"prior": prior, "head_bias": bias, "fusion_weight": float(ranker.get("fusion_weight", 0.0))}


def latency_prompt(probes: Sequence[Probe], tokens: int) -> list[int]:
    """A prompt of exactly `tokens` tokens taken from the probes (cycled when they are shorter)."""
    pool = [t for p in probes for t in p.input_ids]
    return [pool[i % len(pool)] for i in range(tokens)]


def latency_readout_stops(probes: Sequence[Probe], tokens: int) -> list[int]:
    """Where a candidate-readout ranker's prompt pass must stop to read a logit, within the latency prompt (it
    starts with the first probe's tokens): the first probe's readout positions before `tokens`. Engines that read
    only the last fed position (onnxruntime-genai) run the pass in pieces ending there, so their latency does too;
    [] for a label-readout ranker (one piece)."""
    readout = probes[0].readout if probes else None
    return sorted({int(p) for p in readout.positions if p < tokens}) if readout is not None else []


@dataclass(frozen=True)
class Read:
    """One prompt's forward pass: the raw logits score mode reads (candidate order) and the candidates'
    label logits as the next token after the prompt (what generate mode's first step decodes from)."""

    readout: list[float]
    labels: list[float]

    def scores(self) -> list[float]:
        """Score mode: log-softmax of the readout over the candidates (palr.llm.score_candidates)."""
        return label_log_probs(torch.tensor(self.readout))

    def first_pick(self, probe: Probe, k: int, logit_weight: float, served: bool = True) -> int:
        """Generate mode's first emitted position, as the engines pick it (palr.llm.pick_allowed): the
        label logits times `logit_weight`, plus the readout logits for a candidate-readout ranker, plus (`served`)
        the fusion bias the server adds."""
        constraint = LabelConstraint(probe.label_token_ids, k)
        allowed = constraint.allowed_tokens()
        by_token = dict(zip(probe.label_token_ids, self.labels))
        bias = probe.decoding_bias(self.readout, fused=served)
        token = pick_allowed(allowed, torch.tensor([by_token[t] for t in allowed]), constraint, bias, logit_weight)
        return probe.label_token_ids.index(token)


class Runner(Protocol):
    name: str

    def prefill(self, ids: list[int]) -> float: ...

    def decode(self, ids: list[int], steps: int) -> float: ...

    def read(self, probe: Probe) -> Read: ...

    def generate(self, probe: Probe, k: int, logit_weight: float) -> list[int]: ...


class TorchRunner:
    """A transformers model (fp32, bf16 or dynamic int8) through the one-at-a-time reference. `threads`: the torch
    thread count its timings run at (0: the process's), e.g. a build's served count beside candidates timed at
    another."""

    def __init__(self, name: str, model, threads: int = 0):
        self.name, self.model, self.threads = name, model, threads

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        with torch_threads(self.threads or torch.get_num_threads()):
            started = time.perf_counter()
            self.model(input_ids=self._tensor([ids]), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - started

    @torch.inference_mode()
    def decode(self, ids: list[int], steps: int) -> float:
        with torch_threads(self.threads or torch.get_num_threads()):
            return self._decode(ids, steps)

    def _decode(self, ids: list[int], steps: int) -> float:
        """A decode step as the engine runs it: the decoder, then the LM head's rows of the allowed tokens only
        (`token_logits`; here DECODE_ROWS of the prompt's own ids, a label list's size). The full-vocabulary head
        was timed before: for the 4-layer 576-wide ranker it costs about twice the decoder layers, which the
        engine never computes, and it ran in fp32 for some candidates and bf16 for others."""
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        allowed = sorted(set(ids))[:DECODE_ROWS]
        out = decoder(input_ids=self._tensor([ids]), use_cache=True)
        first = token_logits(head, out.last_hidden_state[0, -1], allowed)  # [DECODE_ROWS]
        cache, token = out.past_key_values, allowed[int(first.argmax())]
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            out = decoder(input_ids=self._tensor([[token]]), past_key_values=cache, use_cache=True)
            logits = token_logits(head, out.last_hidden_state[0, -1], allowed)  # [DECODE_ROWS]
            times.append(time.perf_counter() - started)
            cache, token = out.past_key_values, allowed[int(logits.argmax())]
        return statistics.median(times)

    def _tensor(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, device=model_device(self.model))

    def read(self, probe: Probe) -> Read:
        after = Readout.after_prompt(len(probe.input_ids), probe.label_token_ids)
        readout, labels = read_prompt(self.model, probe.input_ids, [probe.score_readout(), after])
        return Read(readout, labels)

    def generate(self, probe: Probe, k: int, logit_weight: float) -> list[int]:
        return generate_constrained(self.model, probe.input_ids, LabelConstraint(probe.label_token_ids, k),
                                    bias=probe.generation_bias(), readout=probe.readout, logit_weight=logit_weight)


class OrtGenaiRunner:
    """An onnxruntime-genai model directory, driven like the `ortgenai` engine drives it."""

    def __init__(self, name: str, model_dir: Path, num_threads: int | None = None, readout_stops: Sequence[int] = ()):
        from palr.ortgenai_runtime import GeneratorSlot, load_model

        self.name = name
        self.model = load_model(model_dir, num_threads)
        self._slot = GeneratorSlot(self.model, 2048)
        self.readout_stops = list(readout_stops)  # latency_readout_stops: the prefill's pieces end there

    def _fresh(self, ids: list[int]) -> np.ndarray:
        self._slot.start([])
        return self._slot.feed(ids)

    def prefill(self, ids: list[int]) -> float:
        """A prompt pass as the `ortgenai` engine runs it: in pieces ending at the readout stops, then the rest."""
        started = time.perf_counter()
        self._slot.start([])
        for _ in self._slot.feed_pieces(ids, self.readout_stops):
            pass
        return time.perf_counter() - started

    def decode(self, ids: list[int], steps: int) -> float:
        token = int(self._fresh(ids).argmax())
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            token = int(self._slot.feed([token]).argmax())
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def _read(self, probe: Probe) -> tuple[np.ndarray, list[float]]:
        self._slot.start([])
        return self._slot.feed_reading(probe.input_ids, probe.score_readout())

    def read(self, probe: Probe) -> Read:
        logits, readout = self._read(probe)
        return Read(list(readout), [float(logits[t]) for t in probe.label_token_ids])

    def generate(self, probe: Probe, k: int, logit_weight: float) -> list[int]:
        constraint = LabelConstraint(probe.label_token_ids, k)
        logits, read = self._read(probe)
        bias = probe.decoding_bias(read)
        while True:
            allowed = constraint.allowed_tokens()
            token = pick_allowed(allowed, torch.from_numpy(logits[allowed]), constraint, bias, logit_weight)
            constraint.advance(token)
            if constraint.done:
                return constraint.emitted()
            logits = self._slot.feed([token])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_latency(runners: Sequence[Runner], ids: list[int], repeats: int, decode_steps: int) -> dict[str, dict]:
    """Median prefill and decode-step times per runner, interleaved round by round."""
    for runner in runners:  # warm-up: first calls pay for allocations and kernel selection
        runner.prefill(ids[: max(8, len(ids) // 8)])
    prefill: dict[str, list[float]] = {r.name: [] for r in runners}
    decode: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(repeats):
        for runner in runners:
            prefill[runner.name].append(runner.prefill(ids))
            decode[runner.name].append(runner.decode(ids, decode_steps))
        log.info("latency round %d/%d: %s (load %s)", round_ + 1, repeats,
                 ", ".join(f"{n} {_ms(prefill[n][-1]):.0f}/{_ms(decode[n][-1]):.1f} ms" for n in prefill),
                 load_average())
    return {name: {"prefill_ms": _ms(statistics.median(prefill[name])), "decode_ms": _ms(statistics.median(decode[name])),
                   "prefill_ms_runs": [_ms(x) for x in prefill[name]], "decode_ms_runs": [_ms(x) for x in decode[name]]}
            for name in prefill}


@dataclass(frozen=True)
class Answers:
    """One runner's answers to the probes: score-mode log-probs, generate mode's first picks (all
    probes), and whole generated lists (the first few probes)."""

    scores: list[list[float]]
    first_picks: list[int]      # as served: the fusion bias added
    orders: list[list[int]]     # as served
    llm_first_picks: list[int]  # the LLM's own (its readout and label logits, no fusion)


def measure_quality(runners: Sequence[Runner], reference: Runner, probes: Sequence[Probe], k: int,
                    generate_probes: int, logit_weight: float = 1.0) -> dict[str, dict]:
    """Each runner's rankings against the reference's on the same probes: score mode and generate mode's
    first pick on all of them (one forward pass each), whole generated lists of k labels on the first
    `generate_probes`; NDCG@10 where targets are known. `logit_weight`: the ranker's generate logit weight."""
    gen_probes = list(probes[:generate_probes])

    def answers(runner: Runner) -> Answers:
        reads = [runner.read(p) for p in probes]
        return Answers([r.scores() for r in reads],
                       [r.first_pick(p, _k(p, k), logit_weight) for r, p in zip(reads, probes)],
                       [runner.generate(p, _k(p, k), logit_weight) for p in gen_probes],
                       [r.first_pick(p, _k(p, k), logit_weight, served=False) for r, p in zip(reads, probes)])

    try:
        ref = answers(reference)
    except EngineError as e:  # the reference itself is broken: nothing can be compared with it
        raise StepFailed(f"the fp32 reference ({reference.name}) cannot rank the probes: {e}; the merged weights "
                         f"are likely broken (a diverged fine-tune): rerun finetune and merge") from e
    out = {}
    for runner in runners:
        try:
            out[runner.name] = quality_summary(ref if runner is reference else answers(runner), ref, probes, k)
        except EngineError as e:  # a precision that overflows (NaN or inf readouts): rejected, not a failed build
            log.warning("%s cannot be measured: %s", runner.name, e)
            out[runner.name] = {"error": str(e)}
            continue
        log.info("quality of %s on %d probes (%d generated): %s", runner.name, len(probes), len(gen_probes),
                 out[runner.name])
    return out


def quality_summary(answers: Answers, ref: Answers, probes: Sequence[Probe], k: int) -> dict[str, Any]:
    """Agreement with the reference of the ranking the server answers with (`served_*`, `generate_first_*`: the
    LLM's scores fused as served; what the bar judges) and of the LLM's own (`score_*`, `llm_first_agreement`: for
    the record; at a large fusion weight the LLM only breaks the retrieval term's near-ties, so its own order may
    move where the served one does not)."""
    top, ref_top = [_order(s) for s in answers.scores], [_order(s) for s in ref.scores]
    served = [_order(p.served(s)) for s, p in zip(answers.scores, probes)]
    ref_served = [_order(p.served(s)) for s, p in zip(ref.scores, probes)]
    summary = {
        "served_top1_agreement": _mean([a[0] == b[0] for a, b in zip(served, ref_served)]),
        f"served_top{k}_overlap": _overlap(served, ref_served, k),
        "score_top1_agreement": _mean([a[0] == b[0] for a, b in zip(top, ref_top)]),
        f"score_top{k}_overlap": _overlap(top, ref_top, k),
        "score_max_abs_logprob_diff": round(max(float(np.max(np.abs(np.subtract(a, b))))
                                                for a, b in zip(answers.scores, ref.scores)), 6),
        "generate_first_agreement": _mean([a == b for a, b in zip(answers.first_picks, ref.first_picks)]),
        "llm_first_agreement": _mean([a == b for a, b in zip(answers.llm_first_picks, ref.llm_first_picks)]),
        "generate_first_probes": len(answers.first_picks),
        "generate_exact_agreement": _mean([list(a) == list(b) for a, b in zip(answers.orders, ref.orders)]),
        "generate_exact_probes": len(answers.orders),
        "served_decisive_probes": decisive_probes(ref.scores, probes),
    }
    if all(p.validation for p in probes):
        for name, orders in (("served_ndcg@10", served), ("score_ndcg@10", top)):
            ranks = [None if p.target_position is None else o.index(p.target_position) for o, p in zip(orders, probes)]
            summary[name] = round(metrics.ndcg(ranks, 10), 4)
    return summary


def decisive_probes(llm_scores: Sequence[Sequence[float]], probes: Sequence[Probe]) -> int:
    """Probes whose served top-1 the LLM can move: the reference's served gap between its first two candidates is
    less than the spread of the LLM's own scores there. On the others, the fused terms decide the first pick
    whatever the LLM reads, so served agreement there says nothing about a precision (at the shipped fusion weight
    of 1000, most probes)."""
    def gap(served: list[float]) -> float:
        first, second = sorted(served, reverse=True)[:2] if len(served) > 1 else (math.inf, 0.0)
        return first - second

    return sum(gap(p.served(s)) < max(s) - min(s) for s, p in zip(llm_scores, probes) if s)


def _overlap(orders: Sequence[list[int]], ref_orders: Sequence[list[int]], k: int) -> float:
    return _mean([len(set(a[:k]) & set(b[:k])) / min(k, len(a)) for a, b in zip(orders, ref_orders)])


def bundle_generate_logit_weight(bundle) -> float:
    """The weight of the label logits in generate mode of the bundle's ranker (`palr.ranking.generate_logit_weight`;
    a bundle without a ranker.json gets its default)."""
    return generate_logit_weight(load_ranker(bundle))


def quality_ok(candidate: dict, reference: dict, min_agreement: float, max_ndcg_drop: float, mode: str) -> bool:
    """Answers like the reference, as the server answers (the LLM's scores fused with the retrieval term): top-1
    agreement of the served ranking (score) or first-pick agreement (generate) at least `min_agreement`, and the
    served ranking's NDCG@10 no more than `max_ndcg_drop` below the reference's. A candidate whose readouts were
    not finite (`error`) fails."""
    if "error" in candidate:
        return False
    agreement = candidate["served_top1_agreement" if mode == "score" else "generate_first_agreement"]
    ndcg_drop = reference.get("served_ndcg@10", 0.0) - candidate.get("served_ndcg@10", 0.0)
    return agreement >= min_agreement and ndcg_drop <= max_ndcg_drop


def mode_latency_ms(latency: dict, mode: str, generate_tokens: int) -> float:
    """Model of one request's latency: score = one prefill; generate = prefill + (tokens - 1) decode steps."""
    if mode == "score":
        return latency["prefill_ms"]
    return latency["prefill_ms"] + (generate_tokens - 1) * latency["decode_ms"]


def _k(probe: Probe, k: int) -> int:
    return min(k, len(probe.label_token_ids))


def _order(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda c: (-scores[c], c))


def _mean(values) -> float:
    values = list(values)
    return round(sum(map(float, values)) / len(values), 4) if values else 0.0


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 3)
