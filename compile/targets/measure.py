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
from palr import metrics
from palr.decoding import LabelConstraint
from palr.llm import generate_constrained, label_log_probs, model_device, pick_allowed, read_prompt
from palr.prompt import Readout
from palr.ranking import decoding_bias, generate_logit_weight, load_ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One prompt: token ids, candidate labels, and for a validation user where the true next item is
    (None: retrieval missed it, a miss for NDCG); synthetic prompts have no target at all."""

    input_ids: list[int]
    label_token_ids: list[int]
    target_position: int | None
    validation: bool = True
    readout: Readout | None = None  # a candidate-readout ranker's (None: the labels after the prompt)

    def score_readout(self) -> Readout:
        return self.readout if self.readout is not None else Readout.after_prompt(len(self.input_ids),
                                                                                   self.label_token_ids)


def load_probes(bundle, tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> tuple[list[Probe], str]:
    """`n` validation prompts from `llm/sft/valid.jsonl` when the bundle has them (real PALR prompts
    with targets), else synthetic ones (random tokens + the " A".." T" labels; agreement only)."""
    if bundle.has("sft_data"):
        path = bundle.path("sft_data") / "valid.jsonl"
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
        if rows:
            return [Probe(r["input_ids"], r["label_token_ids"], r.get("target_position"), readout=candidate_readout(r))
                    for r in rows], \
                f"{len(rows)} validation users from {path.relative_to(bundle.root)}"
    rng = random.Random(seed)
    labels = [tokenizer.encode(f" {chr(ord('A') + i)}", add_special_tokens=False)[0] for i in range(20)]
    vocab = len(tokenizer)
    probes = [Probe([rng.randrange(100, vocab) for _ in range(prompt_tokens)], labels, None, validation=False)
              for _ in range(n)]
    return probes, f"{n} synthetic prompts of {prompt_tokens} random tokens (the bundle has no sft_data)"


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

    def first_pick(self, probe: Probe, k: int, logit_weight: float) -> int:
        """Generate mode's first emitted position, as the engines pick it (palr.llm.pick_allowed): the
        label logits times `logit_weight`, plus the readout logits for a candidate-readout ranker."""
        constraint = LabelConstraint(probe.label_token_ids, k)
        allowed = constraint.allowed_tokens()
        by_token = dict(zip(probe.label_token_ids, self.labels))
        bias = decoding_bias(None, self.readout) if probe.readout is not None else None
        token = pick_allowed(allowed, torch.tensor([by_token[t] for t in allowed]), constraint, bias, logit_weight)
        return probe.label_token_ids.index(token)


class Runner(Protocol):
    name: str

    def prefill(self, ids: list[int]) -> float: ...

    def decode(self, ids: list[int], steps: int) -> float: ...

    def read(self, probe: Probe) -> Read: ...

    def generate(self, probe: Probe, k: int, logit_weight: float) -> list[int]: ...


class TorchRunner:
    """A transformers model (fp32, bf16 or dynamic int8) through the one-at-a-time reference."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        started = time.perf_counter()
        self.model(input_ids=self._tensor([ids]), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started

    @torch.inference_mode()
    def decode(self, ids: list[int], steps: int) -> float:
        out = self.model(input_ids=self._tensor([ids]), use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            out = self.model(input_ids=self._tensor([[token]]), past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return statistics.median(times)

    def _tensor(self, ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor(ids, device=model_device(self.model))

    def read(self, probe: Probe) -> Read:
        after = Readout.after_prompt(len(probe.input_ids), probe.label_token_ids)
        readout, labels = read_prompt(self.model, probe.input_ids, [probe.score_readout(), after])
        return Read(readout, labels)

    def generate(self, probe: Probe, k: int, logit_weight: float) -> list[int]:
        return generate_constrained(self.model, probe.input_ids, LabelConstraint(probe.label_token_ids, k),
                                    readout=probe.readout, logit_weight=logit_weight)


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
        bias = decoding_bias(None, read) if probe.readout is not None else None
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
    first_picks: list[int]
    orders: list[list[int]]


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
                       [runner.generate(p, _k(p, k), logit_weight) for p in gen_probes])

    ref = answers(reference)
    out = {}
    for runner in runners:
        out[runner.name] = quality_summary(ref if runner is reference else answers(runner), ref, probes, k)
        log.info("quality of %s on %d probes (%d generated): %s", runner.name, len(probes), len(gen_probes),
                 out[runner.name])
    return out


def quality_summary(answers: Answers, ref: Answers, probes: Sequence[Probe], k: int) -> dict[str, Any]:
    top = [_order(s) for s in answers.scores]
    ref_top = [_order(s) for s in ref.scores]
    summary = {
        "score_top1_agreement": _mean([a[0] == b[0] for a, b in zip(top, ref_top)]),
        f"score_top{k}_overlap": _mean([len(set(a[:k]) & set(b[:k])) / min(k, len(a)) for a, b in zip(top, ref_top)]),
        "score_max_abs_logprob_diff": round(max(float(np.max(np.abs(np.subtract(a, b))))
                                                for a, b in zip(answers.scores, ref.scores)), 6),
        "generate_first_agreement": _mean([a == b for a, b in zip(answers.first_picks, ref.first_picks)]),
        "generate_first_probes": len(answers.first_picks),
        "generate_exact_agreement": _mean([list(a) == list(b) for a, b in zip(answers.orders, ref.orders)]),
        "generate_exact_probes": len(answers.orders),
    }
    if all(p.validation for p in probes):
        ranks = [None if p.target_position is None else order.index(p.target_position) for order, p in zip(top, probes)]
        summary["score_ndcg@10"] = round(metrics.ndcg(ranks, 10), 4)
    return summary


def bundle_generate_logit_weight(bundle) -> float:
    """The weight of the label logits in generate mode of the bundle's ranker (`palr.ranking.generate_logit_weight`;
    a bundle without a ranker.json gets its default)."""
    return generate_logit_weight(load_ranker(bundle))


def quality_ok(candidate: dict, reference: dict, min_agreement: float, max_ndcg_drop: float, mode: str) -> bool:
    """Ranks like the reference: top-1 agreement (score) or first-pick agreement (generate) at least
    `min_agreement`, and NDCG@10 no more than `max_ndcg_drop` below the reference's."""
    agreement = candidate["score_top1_agreement" if mode == "score" else "generate_first_agreement"]
    ndcg_drop = reference.get("score_ndcg@10", 0.0) - candidate.get("score_ndcg@10", 0.0)
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
