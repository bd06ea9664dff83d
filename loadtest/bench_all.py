"""The side-by-side benchmark report (`python -m loadtest.bench`, the default benchmark).

In one run, on the bundle's merged PALR model with real prompts (loadtest/bench_ranking.py):

1. batching: one-at-a-time (`sequential`), `static` and `inflight` engines at concurrency 1, 4, 16, 64,
   score and generate modes, closed loop (throughput, p50/p95 latency, mean batch per step); score mode's
   in-flight vs one-at-a-time at concurrency 16 also on the hf-cpu build (the precision the server runs);
2. score vs generate latency: the in-flight engine at concurrency 1;
3. prefix reuse on vs off, and per-user context reuse on vs off (prefix only): score mode, in-flight
   engine, concurrency 1; and each request that found its user's context cached against the same request
   in the prefix-only cell (what a hit saves, paired; needs repeats: `--pattern zipf`), the unpaired split
   within the context-reuse cell beside it;
   and the same engine behind the server's answer cache (an exact repeat answered without the model)
   against it without, with the cache's hits against its misses;
4. ORT vs torch eager retrieval: loadtest/bench_retrieval.py's model comparison at batch 1 and 32;
5. a mixed cell (score and generate requests together, `--mixed-share` generate, at concurrency 16,
   `--mixed-requests` in all, so requests keep arriving while others decode) under static and in-flight
   batching: the score requests' own p95 in each;
6. utilisation: score-mode prefill FLOP/s against this machine's matmul peak (fp32 and the bundle's
   hf-cpu build's precision), measured right after the last round (loadtest/utilisation.py); the same
   beside it on a random-weight decoder of a production-class width (hidden 2048), for scale.

Which user each request is for: `--pattern uniform` (every sampled user in turn, the default) or
`--pattern zipf` (users drawn Zipf-distributed, `--zipf-exponent`: a few users come back often).

Repeats: the first round runs every cell; the next `--repeats - 1` rounds run the cells the headline
ratios need and every strategy at concurrency 1 and 16 (in reversed order every other round, so drift
hits both sides alike). Each ratio is taken within a round (numerator and denominator measured minutes
apart at most) and its median over rounds is reported; each cell's numbers are medians over the rounds
every strategy of its setting ran in (`compared_rounds`: round 0 alone for the sweep's other levels).

Writes reports/bench.json (top-level `ratios` and `goals`), reports/bench.md and two PNGs per mode:
latency vs throughput per strategy, and throughput and p95 against concurrency per strategy with the
spread over rounds. Every "vs" figure (ratios and the tables' vs_sequential_*) is taken within one
round. Progress goes to the log, one line per cell.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.bench_ranking import MIN_SPLIT, MIXED, Cell, load_workload, measure, request_order, workload_batch
from loadtest.patterns import PATTERNS
from loadtest.report import (DISTURBED_PCT, answered, disturbance, disturbed, machine_info, markdown_table,
                             write_report)
from loadtest.utilisation import REFERENCE_WIDTH
from ranking_server.config import RankingServerConfig
from loadtest.baselines import STRATEGIES
from palr.ranking import MODES

log = logging.getLogger(__name__)

HEADLINE_CONCURRENCY = 16

@dataclass(frozen=True)
class Paired:
    """A ratio taken request by request: each request's latency in the numerator cell over the same request's in the
    denominator cell (both at concurrency 1, the same requests in the same order, in the same round), median over the
    requests whose `select` flag in the numerator cell is `want`. The same request with and without a cache, not one
    user's hit against another user's miss."""

    select: str
    want: bool


GENERATE_CEILING = "score_inflight_vs_generate_sequential_throughput_c16"
# ratio name → (numerator cell, denominator cell, metric); all within one round
RATIOS: dict[str, tuple[Cell, Cell, str | tuple[str, str] | Paired]] = {
    "inflight_vs_sequential_throughput_c16": (Cell("generate", "inflight", 16), Cell("generate", "sequential", 16),
                                              "throughput_rps"),
    "inflight_vs_sequential_p95_c16": (Cell("generate", "inflight", 16), Cell("generate", "sequential", 16), "p95_ms"),
    "inflight_vs_sequential_throughput_c16_score": (Cell("score", "inflight", 16), Cell("score", "sequential", 16),
                                                    "throughput_rps"),
    "inflight_vs_sequential_p95_c16_score": (Cell("score", "inflight", 16), Cell("score", "sequential", 16), "p95_ms"),
    # the same two on the model the server runs (the hf-cpu build, its precision): what batching gives in service
    "inflight_vs_sequential_throughput_c16_score_build": (Cell("score", "inflight", 16, build=True),
                                                          Cell("score", "sequential", 16, build=True), "throughput_rps"),
    "inflight_vs_sequential_p95_c16_score_build": (Cell("score", "inflight", 16, build=True),
                                                   Cell("score", "sequential", 16, build=True), "p95_ms"),
    "score_vs_generate_latency": (Cell("score", "inflight", 1), Cell("generate", "inflight", 1), "p50_ms"),
    # the most in-flight batching can give generate at c16: its throughput were every decode step free, i.e. the
    # same prompts in score mode (in-flight), over generate one-at-a-time; the generate goal's ceiling
    GENERATE_CEILING: (Cell("score", "inflight", 16), Cell("generate", "sequential", 16), "throughput_rps"),
    # every KV reuse (the shared prefix and, on repeats, the user's context) against none: issue 12's "reuse on/off"
    "kv_reuse_on_vs_off_latency": (Cell("score", "inflight", 1), Cell("score", "inflight", 1, prefix_reuse=False),
                                   "p50_ms"),
    # the shared prefix alone against none (no goal: ~11 % of the prompt, it measured 0.92x before context reuse)
    "prefix_only_vs_no_reuse_latency": (Cell("score", "inflight", 1, context_reuse=False),
                                        Cell("score", "inflight", 1, prefix_reuse=False), "p50_ms"),
    # issue 12: a user's repeat call runs only its candidates (meaningful with repeats: --pattern zipf)
    "context_reuse_on_vs_off_latency": (Cell("score", "inflight", 1),
                                        Cell("score", "inflight", 1, context_reuse=False), "p50_ms"),
    # the default path (the hf-cpu build's precision + context reuse) vs the fp32, prefix-only path
    "default_vs_fp32_prefix_only_latency": (Cell("score", "inflight", 1, build=True),
                                            Cell("score", "inflight", 1, context_reuse=False), "p50_ms"),
    # a context hit against the same request computing its context (the prefix-only engine), request by request
    "context_hit_vs_miss_latency": (Cell("score", "inflight", 1), Cell("score", "inflight", 1, context_reuse=False),
                                    Paired("context_hit", True)),
    # the requests that missed and stored their context, against the same requests without context reuse: what
    # storing costs (~1)
    "context_store_vs_prefix_only_latency": (Cell("score", "inflight", 1),
                                             Cell("score", "inflight", 1, context_reuse=False),
                                             Paired("context_hit", False)),
    # within the context-reuse cell: the p50 of its hits over the p50 of its misses (other requests: hits are the
    # Zipf head's repeat calls, misses each user's first)
    "context_hit_vs_miss_latency_unpaired": (Cell("score", "inflight", 1), Cell("score", "inflight", 1),
                                             ("context_hit_p50_ms", "context_miss_p50_ms")),
    # the engine behind the server's AnswerCache (an exact repeat, same prompt and candidates, is answered
    # without the model) against the same engine without it; and within that cell, the repeats it answered
    # against the requests the model ran
    "answer_cache_on_vs_off_latency": (Cell("score", "inflight", 1, answer_cache=True), Cell("score", "inflight", 1),
                                       "p50_ms"),
    "answer_hit_vs_miss_latency": (Cell("score", "inflight", 1, answer_cache=True),
                                   Cell("score", "inflight", 1, answer_cache=True),
                                   ("answer_hit_p50_ms", "answer_miss_p50_ms")),
    # score requests' own p95 when a share of generate requests runs with them (issue 12 item 4)
    "mixed_inflight_vs_static_score_p95_c16": (Cell(MIXED, "inflight", 16), Cell(MIXED, "static", 16),
                                               "score_p95_ms"),
}
RETRIEVAL_RATIO = "ort_vs_torch_retrieval_latency_b1"
# the model's own prefill (direct forward, the chosen precision) against the matmul peak in that precision, each
# repeat's pair back to back (loadtest/utilisation.py)
PREFILL_RATIO = "prefill_vs_peak_chosen_precision"

# goals on the embedded default (issues 5 and 7): ratio name → (comparison, threshold)
GOALS: dict[str, tuple[str, float]] = {
    "inflight_vs_sequential_throughput_c16": (">=", 3.0),
    "inflight_vs_sequential_p95_c16": ("<", 1.0),
    "inflight_vs_sequential_throughput_c16_score": (">=", 1.0),
    "inflight_vs_sequential_p95_c16_score": ("<", 1.0),
    "inflight_vs_sequential_throughput_c16_score_build": (">=", 1.0),
    "inflight_vs_sequential_p95_c16_score_build": ("<", 1.0),
    "score_vs_generate_latency": ("<=", 0.2),
    "kv_reuse_on_vs_off_latency": ("<=", 0.7),
    "default_vs_fp32_prefix_only_latency": ("<=", 0.5),
    "context_hit_vs_miss_latency": ("<=", 0.4),
    "mixed_inflight_vs_static_score_p95_c16": ("<=", 0.5),
    RETRIEVAL_RATIO: ("<=", 0.5),
    PREFILL_RATIO: (">=", 0.6),
}
COMPARE = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}

# `--quick`: a smoke run of every code path in a few minutes (options given explicitly still win)
QUICK = {"concurrency": [1, 16], "requests": 4, "mixed_requests": 16, "repeats": 1, "candidates": 10,
         "generate_k": 2, "retrieval_calls": 50}


@dataclass
class BenchConfig:
    bundle: Path = field(default=Path("bundle"), metadata={
        "help": "bundle with llm/merged, llm/ranker.json, profiles, users, sasrec (python -m compile all)",
        "metavar": "DIR"})
    out: Path = field(default=Path("reports"), metadata={"help": "where bench.json, bench.md and the plots go",
                                                         "metavar": "DIR"})
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64], metadata={
        "help": "closed-loop concurrency levels (16 is needed for the headline ratios)"})
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES), metadata={
        "help": f"engines to compare: {', '.join(STRATEGIES)}"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "ranking modes"})
    requests: int = field(default=64, metadata={
        "help": "requests per cell (64: four per caller at concurrency 16, so the cell measures steady traffic, not "
                "one burst of simultaneous first requests); a cell with more callers than this sends one request per "
                "caller"})
    repeats: int = field(default=3, metadata={
        "help": "rounds of the headline cells (the first round also runs the full sweep); ratios are medians"})
    candidates: int = field(default=0, metadata={"help": "candidates per prompt (0: the K the LLM was tuned with)"})
    generate_k: int = field(default=0, metadata={
        "help": "answer lines in generate mode (0: llm/ranker.json's generate_k)"})
    seed: int = field(default=0, metadata={"help": "which users are sampled"})
    generate_logit_weight: float | None = field(default=None, metadata={
        "help": "generate mode's weight of the model's logits instead of the ranker's (the shipped fit's 0 writes "
                "the answer with no decode pass; 1 measures decoding, what batching speeds up)"})
    threads: int = field(default=0, metadata={"help": "torch threads of the engines (0: torch's default)"})
    max_batch_size: int = field(default=RankingServerConfig.max_batch_size, metadata={
        "help": "engine batch slots (the server's default)"})
    max_tokens_per_step: int = field(default=RankingServerConfig.max_tokens_per_step, metadata={
        "help": "engine token budget per step (the server's default)"})
    score_first_ms: float = field(default=RankingServerConfig.score_first_ms, metadata={
        "help": "engine priority of score over generate requests (the server's default; 0: arrival order)"})
    retrieval_calls: int = field(default=300, metadata={"help": "timed SASRec calls per engine and batch size"})
    skip_retrieval: bool = field(default=False, metadata={"help": "leave out ORT vs torch retrieval"})
    pattern: str = field(default="uniform", metadata={
        "help": "which user each request is for: uniform (every user in turn) or zipf (Zipf-distributed repeats)",
        "choices": PATTERNS})
    zipf_exponent: float = field(default=1.1, metadata={"help": "--pattern zipf: P(user of rank k) ~ 1/k^exponent"})
    mixed_share: float = field(default=0.2, metadata={
        "help": "share of generate requests in the mixed cell (score and generate together at concurrency 16, "
                "static vs in-flight); 0: no mixed cell"})
    mixed_requests: int = field(default=192, metadata={
        "help": "requests in the mixed cell: twelve per caller, so it measures steady traffic in which later "
                "requests arrive while generate requests decode (with one each, every request arrives at once and the "
                "cell measures a single burst; with four, its score p95 was still mostly the start's)"})
    build_cells: bool = field(default=True, metadata={
        "help": "measure the bundle's hf-cpu build (its precision) beside the fp32 model in the latency cells"})
    utilisation_repeats: int = field(default=5, metadata={
        "help": "timed matmul-peak / prefill pairs per precision in the utilisation section (0: leave it out)"})
    utilisation_reference_width: int = field(default=REFERENCE_WIDTH, metadata={
        "help": "hidden size of the random-weight reference decoder measured beside the model in the utilisation "
                "section (2048: TinyLlama-1.1B's layer; 0: leave it out)"})

    def __post_init__(self):
        for name, values, allowed in (("strategies", self.strategies, STRATEGIES), ("modes", self.modes, MODES)):
            unknown = set(values) - set(allowed)
            if unknown:
                raise ValueError(f"--{name} {sorted(unknown)}: choose from {', '.join(allowed)}")
        if not 0 <= self.mixed_share < 1:
            raise ValueError(f"--mixed-share must be in [0, 1), got {self.mixed_share}")
        if min(self.requests, self.mixed_requests, self.repeats, *self.concurrency) < 1:
            raise ValueError("--requests, --mixed-requests, --repeats and every --concurrency must be >= 1")
        # now, not after the model loads (request_order's); nan refused too
        if self.pattern == "zipf" and not (self.zipf_exponent > 0 and math.isfinite(self.zipf_exponent)):
            raise ValueError(f"--zipf-exponent must be > 0, got {self.zipf_exponent}")


def sweep_cells(config: BenchConfig) -> list[Cell]:
    """Round 1: every concurrency × mode × strategy, plus the cells only the ratios need (reuse off, the build,
    the mixed cell). The strategies of one level run next to each other, in reversed order every other level
    (drift hits all alike); the modes of one concurrency next to each other; and each ratio-only cell right
    after the sweep cell it is divided by, so the two sides of every ratio are measured minutes apart at most,
    not a whole sweep apart."""
    cells = []
    for level, (c, mode) in enumerate((c, mode) for c in config.concurrency for mode in config.modes):
        strategies = config.strategies if level % 2 == 0 else list(reversed(config.strategies))
        cells += [Cell(mode, strategy, c) for strategy in strategies]
    for cell in [c for c in headline_cells(config) if c not in cells]:
        partners = [cells.index(other) for numerator, denominator, _ in RATIOS.values()
                    for mine, other in ((numerator, denominator), (denominator, numerator))
                    if mine == cell and other in cells]
        cells.insert(max(partners) + 1 if partners else len(cells), cell)
    return cells


def headline_cells(config: BenchConfig) -> list[Cell]:
    """The cells the ratios need, and every strategy at concurrency 1 and 16 (the strategy tables and plots compare
    them side by side in every round), restricted to the modes and strategies asked for."""
    wanted = [cell for numerator, denominator, _ in RATIOS.values() for cell in (numerator, denominator)]
    wanted += [Cell(mode, strategy, c) for mode in config.modes for c in (1, HEADLINE_CONCURRENCY)
               if c in config.concurrency for strategy in config.strategies]
    mixed = bool(config.mixed_share) and set(MODES) <= set(config.modes)
    cells = [c for c in dict.fromkeys(wanted) if (c.mode in config.modes or (c.mode == MIXED and mixed))
             and c.strategy in config.strategies and not (c.build and not config.build_cells)]
    return [c for c in cells if c.concurrency != HEADLINE_CONCURRENCY or HEADLINE_CONCURRENCY in config.concurrency]


def run(config: BenchConfig) -> dict:
    import torch

    from ranking_server.engines.config import EngineConfig

    started = time.perf_counter()
    before = machine_info()
    if config.threads:
        torch.set_num_threads(config.threads)
    n_users = max(config.requests, max(config.concurrency))
    workload = load_workload(config.bundle, n_users, candidates=config.candidates, generate_k=config.generate_k,
                             seed=config.seed, generate_logit_weight=config.generate_logit_weight)
    engine_config = EngineConfig(max_batch_size=config.max_batch_size, max_tokens_per_step=config.max_tokens_per_step,
                                 threads=config.threads, score_first_ms=config.score_first_ms)
    if config.build_cells and workload.build_model is None:
        log.info("no hf-cpu build of this bundle for this machine: the latency cells use the fp32 model only")
        config = dataclasses.replace(config, build_cells=False)
    order = request_order(len(workload.users), max(n_users, config.mixed_requests), config.pattern,
                          config.zipf_exponent, config.seed)
    warm_up(workload, engine_config)
    rounds = [sweep_cells(config)] + [headline_cells(config) for _ in range(config.repeats - 1)]
    total = sum(len(r) for r in rounds)
    runs: dict[Cell, list[dict]] = {}
    retrieval_runs: list[list[dict]] = []
    done = 0
    for number, cells in enumerate(rounds):
        for cell in (cells if number % 2 == 0 else list(reversed(cells))):
            done += 1
            requests = config.mixed_requests if cell.mode == MIXED else config.requests
            summary = measure(cell, workload, engine_config, requests, order, config.mixed_share)
            runs.setdefault(cell, []).append({**summary, "round": number})
            log.info("[%d/%d, %.0f s] round %d %s: %.3f req/s, p50 %.0f ms, p95 %.0f ms, mean batch %s%s", done, total,
                     time.perf_counter() - started, number + 1, cell.key, summary["throughput_rps"], summary["p50_ms"],
                     summary["p95_ms"], summary["mean_batch"], f", errors {summary['errors']}" if summary["errors"] else "")
        if not config.skip_retrieval:
            retrieval_runs.append(retrieval_model(config))
            log.info("round %d retrieval: ORT vs torch eager at batch 1: %.3f", number + 1,
                     retrieval_ratio(retrieval_runs[-1]))

    report = {"benchmark": "all", "config": _jsonable(asdict(config)), "machine_before": before,
              "workload": {**workload.describe(), **pattern_summary(order, config)}, "cells": cell_rows(runs)}
    ratio_runs = round_ratios(runs, len(rounds))
    if retrieval_runs:
        ratio_runs[RETRIEVAL_RATIO] = [retrieval_ratio(rows) for rows in retrieval_runs]
        report["retrieval_model"] = retrieval_runs[-1]
    if config.utilisation_repeats:
        report["utilisation"] = utilisation(workload, runs, config, order)
        chosen = prefill_vs_peak(report["utilisation"])
        if chosen:
            ratio_runs[PREFILL_RATIO] = chosen
    report["ratios"] = {name: round(statistics.median(values), 3) for name, values in ratio_runs.items()}
    report["ratio_runs"] = ratio_runs
    report["ratio_pairs"] = ratio_pairs(runs, len(rounds))
    report["ratio_disturbed_rounds"] = disturbed_ratio_rounds(runs, len(rounds))
    report["goals"] = goals(report["ratios"], generate_decodes=workload.describe()["generate_logit_weight"] != [0.0],
                            pattern=config.pattern, reduced=reduced_workload(report["config"]),
                            disturbed={name: len(r) / len(ratio_runs[name])
                                       for name, r in report["ratio_disturbed_rounds"].items()})
    report["machine_after"] = machine_info()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["plots"] = plot(report, config.out)
    json_path, md_path = write_report(config.out, "bench", report, markdown(report))
    print(markdown(report))
    log.info("wrote %s, %s and %s in %.0f s", json_path, md_path, ", ".join(report["plots"]), report["seconds"])
    return report


def warm_up(workload, engine_config) -> None:
    """A few unmeasured requests in both modes first, so the first cell does not pay for the process's
    first forward passes (weights paged in, allocator and thread pools grown)."""
    started = time.perf_counter()
    for mode in MODES:
        measure(Cell(mode, "inflight", 2), workload, engine_config, requests=2)
    log.info("warm-up: %.1f s", time.perf_counter() - started)


def utilisation(workload, runs: dict[Cell, list[dict]], config: BenchConfig, order: list[int]) -> dict:
    """Matmul peak and prefill FLOP/s side by side (loadtest/utilisation.py), on the longest score
    prompt of the workload; plus the engine's own cell (score, in-flight, c=1, prefix reuse off) of
    the last round against the fp32 peak."""
    from loadtest import utilisation as u

    prompt = max(([*r.prefix_ids, *r.suffix_ids] for r in workload.requests["score"]), key=len)
    out = u.section(workload.model, prompt, config.bundle, config.utilisation_repeats, config.utilisation_reference_width)
    cell = runs.get(Cell("score", "inflight", 1, prefix_reuse=False))
    # what score mode runs (up to its last readout), over the requests the cell sent (under Zipf a few users, not
    # the workload's every user)
    sent = workload_batch(workload, ["score"] * config.requests, order[:config.requests])
    tokens = sum(len(r.run_ids) for r in sent) / len(sent)
    engine = u.engine_row(out["rows"][0], cell[-1] if cell else None, out["parameters"], tokens)
    if engine:
        out["rows"].append(engine)
    return out


def prefill_vs_peak(section: dict) -> list[float]:
    """Issue 12's utilisation goal, per repeat: the ranker's own prefill (a direct forward in the precision its build
    chose) against that precision's matmul peak, measured back to back; [] when the section has no such row."""
    return next((row["utilisation_runs"] for row in section["rows"]
                 if row["dtype"] == section["chosen"] and row["source"] == "direct forward"), [])


def retrieval_model(config: BenchConfig) -> list[dict]:
    """bench_retrieval's ORT vs torch eager comparison, same bundle, batch 1 and 32."""
    from loadtest.bench_retrieval import RetrievalBenchConfig, model_latency
    from palr.bundle import Bundle

    return model_latency(Bundle.open(config.bundle),
                         RetrievalBenchConfig(bundle=config.bundle, model_calls=config.retrieval_calls))


def retrieval_ratio(rows: list[dict]) -> float:
    return next(r["vs_torch"] for r in rows if r["engine"] == "onnxruntime" and r["batch"] == 1)


def _ratio_rounds(runs: dict[Cell, list[dict]], n_rounds: int) \
        -> Iterator[tuple[str, int, float, list[dict], int | None]]:
    """(ratio, round, value, its two cells' summaries, the requests a paired ratio rests on) for every round in which
    both of a ratio's cells ran, had the metric and answered every request (a cell that lost requests would be
    compared on its survivors)."""
    for name, (numerator, denominator, metric) in RATIOS.items():
        for number in range(n_rounds):
            top, bottom = (next((r for r in runs.get(cell, []) if r["round"] == number), None)
                           for cell in (numerator, denominator))
            if not top or not bottom or top.get("errors") or bottom.get("errors"):
                continue
            if isinstance(metric, Paired):
                value, pairs = paired_ratio(top, bottom, metric)
                if value is not None:
                    yield name, number, value, [top, bottom], pairs
                continue
            top_metric, bottom_metric = metric if isinstance(metric, tuple) else (metric, metric)
            if measured(top.get(top_metric)) and measured(bottom.get(bottom_metric)):
                yield name, number, round(top[top_metric] / bottom[bottom_metric], 4), [top, bottom], None


def paired_ratio(top: dict, bottom: dict, paired: Paired) -> tuple[float | None, int]:
    """(the median over the selected requests of request i's latency in `top` over its latency in `bottom`, how many
    requests that is); None below MIN_SPLIT requests, or when the cells' requests do not line up (another count)."""
    flags, top_ms, bottom_ms = top.get(paired.select), top.get("request_ms"), bottom.get("request_ms")
    if not flags or not top_ms or not bottom_ms or not len(flags) == len(top_ms) == len(bottom_ms):
        return None, 0
    pairs = [t / b for flag, t, b in zip(flags, top_ms, bottom_ms) if flag == paired.want and measured(t)
             and measured(b)]
    return (round(statistics.median(pairs), 4) if len(pairs) >= MIN_SPLIT else None), len(pairs)


def measured(value) -> bool:
    """A metric a ratio can use: a positive finite number (a cell whose requests all failed has NaN percentiles and
    0 throughput; NaN is truthy and made medians depend on where it sat)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def round_ratios(runs: dict[Cell, list[dict]], n_rounds: int) -> dict[str, list[float]]:
    """Each ratio per round, from the two cells measured in that round."""
    out: dict[str, list[float]] = {}
    for name, _, value, _, _ in _ratio_rounds(runs, n_rounds):
        out.setdefault(name, []).append(value)
    return out


def ratio_pairs(runs: dict[Cell, list[dict]], n_rounds: int) -> dict[str, list[int]]:
    """Per paired ratio, how many requests each round's value is the median of."""
    out: dict[str, list[int]] = {}
    for name, _, _, _, pairs in _ratio_rounds(runs, n_rounds):
        if pairs is not None:
            out.setdefault(name, []).append(pairs)
    return out


def disturbed_ratio_rounds(runs: dict[Cell, list[dict]], n_rounds: int) -> dict[str, list[int]]:
    """Per ratio, the rounds of its `round_ratios` values in which either of its two cells ran on a machine busy
    with something else (`report.disturbed`): those values are suspect."""
    out: dict[str, list[int]] = {}
    for name, number, _, cells, _ in _ratio_rounds(runs, n_rounds):
        if any(disturbed(r) for r in cells):
            out.setdefault(name, []).append(number)
    return out


def compared_rounds(runs: dict[Cell, list[dict]]) -> dict[Cell, list[int]]:
    """Per cell, the rounds every strategy of its setting (mode, concurrency, model, reuse, answer cache) ran in:
    what its table row and plot point are medians over, so strategies side by side are measured side by side (a
    cell repeated in rounds 1-2 on a machine that slowed down read as slower than one measured in round 0 only)."""
    groups: dict[tuple, set[int]] = {}
    for cell, summaries in runs.items():
        key = dataclasses.replace(cell, strategy="")
        rounds = {s["round"] for s in summaries}
        groups[key] = groups[key] & rounds if key in groups else rounds
    return {cell: sorted(groups[dataclasses.replace(cell, strategy="")]) or sorted(s["round"] for s in summaries)
            for cell, summaries in runs.items()}


def cell_rows(runs: dict[Cell, list[dict]]) -> list[dict]:
    """One row per cell: medians over the rounds every strategy of its setting ran in (`compared_rounds`), and how
    it compares with one-at-a-time."""
    rows = []
    common = compared_rounds(runs)
    for cell, summaries in runs.items():
        shared = [s for s in summaries if s["round"] in common[cell]]
        rounds = [s for s in shared if answered(s)] or shared
        row = {"cell": cell.key, "mode": cell.mode, "strategy": cell.strategy, "concurrency": cell.concurrency,
               "prefix_reuse": cell.prefix_reuse, "context_reuse": cell.prefix_reuse and cell.context_reuse,
               "model": "hf-cpu build" if cell.build else "fp32 merged", "answer_cache": cell.answer_cache,
               "rounds": len(summaries), "compared_rounds": common[cell], "requests": summaries[0]["requests"]}
        for metric in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "mean_batch", *MIXED_METRICS,
                       *CONTEXT_METRICS, *ANSWER_METRICS):
            if (metric in MIXED_METRICS and cell.mode != MIXED) or not any(metric in s for s in summaries):
                continue
            values = [s[metric] for s in rounds if s.get(metric) is not None and math.isfinite(s[metric])]
            digits = 4 if metric == "throughput_rps" else 3 if metric == "answer_hit_p50_ms" else 1  # a hit: ~0.1 ms
            row[metric] = round(statistics.median(values), digits) if values else None
        row["errors"] = sum(sum(s["errors"].values()) for s in summaries)
        row["runs"] = summaries
        rows.append(row)
    def setting(row: dict) -> tuple:  # a row is compared with the one-at-a-time cell of the same engine settings only
        return (row["mode"], row["concurrency"], row["model"], row["prefix_reuse"], row["context_reuse"],
                row["answer_cache"])

    baseline = {setting(r): r for r in rows if r["strategy"] == "sequential"}
    for row in rows:
        base = baseline.get(setting(row))
        if base:
            row.update(vs_within_rounds(row["runs"], base["runs"]))
    return rows


MIXED_METRICS = ("score_p50_ms", "score_p95_ms", "generate_p50_ms", "generate_p95_ms")
CONTEXT_METRICS = ("context_hits", "context_misses", "context_hit_p50_ms", "context_miss_p50_ms")
ANSWER_METRICS = ("answer_hits", "answer_misses", "answer_hit_p50_ms", "answer_miss_p50_ms")


def pattern_summary(order: list[int], config: BenchConfig) -> dict:
    """How the requests are spread over users: the pattern and, of the first `requests`, how many
    distinct users and what share of requests repeat a user already seen."""
    first = order[:max(config.requests, max(config.concurrency))]
    out = {"pattern": config.pattern, "distinct_users": len(set(first)),
           "repeat_share": round(1 - len(set(first)) / len(first), 3) if first else 0.0}
    if config.pattern == "zipf":
        out["zipf_exponent"] = config.zipf_exponent
    return out


def vs_within_rounds(runs: list[dict], base_runs: list[dict]) -> dict:
    """A cell against its baseline (one-at-a-time at the same mode and concurrency), taken within
    each round both ran in and answered every request (never a median over rounds divided by another cell's single
    round, nor the survivors of a cell that lost requests);
    the median of those per-round ratios, the rounds used, and the ratios per round."""
    base_by_round = {r["round"]: r for r in base_runs}
    out: dict = {}
    for metric, name in (("throughput_rps", "vs_sequential_throughput"), ("p95_ms", "vs_sequential_p95")):
        per_round = {r["round"]: r[metric] / base_by_round[r["round"]][metric] for r in runs
                     if r["round"] in base_by_round and not (r.get("errors") or base_by_round[r["round"]].get("errors"))
                     and measured(r.get(metric)) and measured(base_by_round[r["round"]].get(metric))}
        if per_round:
            out[name] = round(statistics.median(per_round.values()), 2)
            out[f"{name}_runs"] = [round(per_round[k], 3) for k in sorted(per_round)]
            out["vs_rounds"] = sorted(per_round)
    return out


# goals about decoding generate requests: they do not apply without a decode pass (the ranker's logit weight 0);
# then a generate request ends with its prompt and is scheduled as a score request is, so the mixed cell is
# score-like throughout and says nothing of a score request waiting behind decoding ones
DECODING_GOALS = ("inflight_vs_sequential_throughput_c16", "inflight_vs_sequential_p95_c16",
                  "score_vs_generate_latency", "mixed_inflight_vs_static_score_p95_c16")


# goals issue 12 sets on the repeat workload (--pattern zipf): on uniform traffic no user comes back, so no context
# is reused and these ratios measure something else (precision alone, or nothing)
ZIPF_GOALS = ("default_vs_fp32_prefix_only_latency", "context_hit_vs_miss_latency", "kv_reuse_on_vs_off_latency")


def reduced_workload(config: dict) -> bool:
    """Fewer candidates or answer lines than the ranker's (--quick sets both): its ratios are not the goals'.
    `config`: the bench's config as its report records it."""
    return bool(config["candidates"] or config["generate_k"])


def goals(ratios: dict[str, float], generate_decodes: bool = True, pattern: str = "zipf",
          reduced: bool = False, disturbed: dict[str, float] | None = None) -> dict[str, dict]:
    """Each goal's ratio and whether it is met; `met` None, with `why`, where it does not apply: generate mode ran
    no decode pass (no decoding to batch: measure it with --generate-logit-weight 1), a repeat-workload goal on
    another pattern, any goal on a reduced workload (--quick: fewer candidates and requests), or a ratio most of
    whose rounds ran while other work took the machine (`disturbed`: that share of its rounds)."""
    out = {}
    for name, (op, threshold) in GOALS.items():
        if name not in ratios:
            continue
        why = ("a reduced workload (--quick)" if reduced else
               "generate ran no decode pass" if not generate_decodes and name in DECODING_GOALS else
               f"set on --pattern zipf, measured on {pattern}" if pattern != "zipf" and name in ZIPF_GOALS else
               "most of its rounds ran while other work took the machine" if (disturbed or {}).get(name, 0) > 0.5
               else "")
        out[name] = {"ratio": ratios[name], "goal": f"{op} {threshold:g}",
                     "met": None if why else COMPARE[op](ratios[name], threshold), **({"why": why} if why else {})}
    return out


def plot(report: dict, out: Path) -> list[str]:
    """Per mode: latency vs throughput (bench_<mode>.png) and throughput and p95 against concurrency
    per strategy with the spread over rounds (bench_<mode>_concurrency.png)."""
    from loadtest.plots import by_concurrency, latency_vs_throughput

    names = []
    for mode in dict.fromkeys(r["mode"] for r in report["cells"] if r["mode"] != MIXED):
        rows = [r for r in strategy_cells(report, mode) if plottable(r)]
        if not rows:
            log.warning("no %s-mode cell answered in any round: no %s-mode plots", mode, mode)
            continue
        path = Path(out) / f"bench_{mode}.png"
        latency_vs_throughput(rows, f"{mode} mode: latency vs throughput per strategy", path)
        names.append(path.name)
        path = Path(out) / f"bench_{mode}_concurrency.png"
        by_concurrency(rows, f"{mode} mode: throughput and p95 vs concurrency (bars: range over compared rounds)",
                       path)
        names.append(path.name)
    return names


def plottable(row: dict) -> bool:
    """A cell with a throughput and latencies to draw: one whose every round failed has none (its table row says
    so; the plot leaves it out instead of failing the report)."""
    return all(isinstance(row.get(m), (int, float)) and math.isfinite(row[m])
               for m in ("throughput_rps", "p50_ms", "p95_ms"))


def strategy_cells(report: dict, mode: str) -> list[dict]:
    """The cells that compare batching strategies in `mode`: the fp32 model with every reuse on and no answer
    cache (the answer-cache cell answers repeats without the model: it belongs with the reuse cells only)."""
    return [r for r in report["cells"] if r["mode"] == mode and r["prefix_reuse"] and r["context_reuse"]
            and r["model"] == "fp32 merged" and not r["answer_cache"]]


def markdown(report: dict) -> str:
    before, after, w = report["machine_before"], report["machine_after"], report["workload"]
    rounds = report["config"]["repeats"]
    parts = [
        "# Benchmark: batching strategies, ranking modes, prefix and context reuse, retrieval engines",
        f"{before['cpus']} CPUs ({before['processor']}), load average {before['load_average_1_5_15']} before and "
        f"{after['load_average_1_5_15']} after ({before['at']}, {report['seconds']:.0f} s). Numbers taken while "
        f"the machine was busy with other work are not final. "
        + disturbance([(f"round {run['round']} {cell['cell']}", run) for cell in report["cells"] for run in cell["runs"]]),
        f"Workload: {w['users']} real users, their SASRec top-{w['candidates']} candidates, PALR prompts of "
        f"{w['prompt_tokens_min']}-{w['prompt_tokens_max']} tokens (mean {w['prompt_tokens_mean']}, shared prefix "
        f"{w['prefix_tokens']}); generate mode writes {w['generate_k']} answer lines ({w['generate_format']}, "
        f"logit weight {', '.join(map(str, w.get('generate_logit_weight', [])))}"
        f"{': the bias order, no decode pass' if w.get('generate_logit_weight') == [0.0] else ''}). "
        f"Closed loop: each of `concurrency` callers sends its next request when its last one is answered. "
        f"Users per request: {w['pattern']}"
        + (f" (exponent {w['zipf_exponent']})" if w.get("zipf_exponent") else "")
        + f": {w['distinct_users']} distinct users, {100 * w['repeat_share']:.0f} % of requests repeat a user."
        + (" The workload is reduced (--candidates/--generate-k): ratios are not comparable with the goals."
           if reduced_workload(report["config"]) else ""),
        f"## Headline ratios (median over {rounds} round(s), each ratio taken within one round)",
        "disturbed rounds: rounds (from 0) in which either of the ratio's two cells had more than "
        f"{DISTURBED_PCT:g} % of the machine taken by steal or other processes; their values are suspect.",
        "pairs per round: a paired ratio's requests, each the same request's latency with and without the cache "
        f"(their median is the round's value); {PREFILL_RATIO}: per repeat, in the utilisation section; "
        f"{GENERATE_CEILING}: the ceiling of inflight_vs_sequential_throughput_c16, what generate in-flight would "
        "reach were every decode step free (its prompts' passes alone, as score mode runs them).",
        markdown_table([{"ratio": name, "value": value, "goal": report["goals"].get(name, {}).get("goal", ""),
                         "met": _met(report["goals"].get(name)), "per round": report["ratio_runs"][name],
                         "pairs per round": report.get("ratio_pairs", {}).get(name, ""),
                         "disturbed rounds": report.get("ratio_disturbed_rounds", {}).get(name, "")}
                        for name, value in report["ratios"].items()],
                       ["ratio", "value", "goal", "met", "per round", "pairs per round", "disturbed rounds"]),
    ]
    columns = ["strategy", "concurrency", "requests", "errors", "throughput_rps", "p50_ms", "p95_ms", "mean_batch",
               "vs_sequential_throughput", "vs_sequential_p95", "vs_rounds", "compared_rounds", "rounds"]
    for mode in dict.fromkeys(r["mode"] for r in report["cells"] if r["mode"] != MIXED):
        rows = strategy_cells(report, mode)
        rows.sort(key=lambda r: (r["concurrency"], list(STRATEGIES).index(r["strategy"])))
        plots = [name for name in report["plots"] if name.startswith(f"bench_{mode}")]
        parts += [f"## {mode} mode: one-at-a-time vs static vs in-flight batching",
                  "vs_sequential_*: the cell against one-at-a-time at the same concurrency, taken within each round "
                  "both ran in (vs_rounds), median over those rounds; the other columns are medians over the rounds "
                  "every strategy at that concurrency ran in (compared_rounds; rounds: how many ran the cell).",
                  markdown_table(rows, columns)]
        parts += [f"![{mode} mode]({name})" for name in plots]
    mixed = sorted((r for r in report["cells"] if r["mode"] == MIXED), key=lambda r: list(STRATEGIES).index(r["strategy"]))
    if mixed:
        name = "mixed_inflight_vs_static_score_p95_c16"
        share = report["config"]["mixed_share"]
        parts += [f"## Mixed traffic: {100 * (1 - share):.0f} % score and {100 * share:.0f} % generate requests together",
                  "Each mode's own p50/p95 (medians over rounds). Score requests' p95 in-flight vs static, per round: "
                  f"{report['ratio_runs'].get(name, [])} (median {report['ratios'].get(name, '')}).",
                  markdown_table(mixed, ["strategy", "concurrency", "requests", "errors", "throughput_rps",
                                         "score_p50_ms", "score_p95_ms", "generate_p50_ms", "generate_p95_ms",
                                         "rounds"])]
    prefix = [r for r in report["cells"] if r["mode"] == "score" and r["strategy"] == "inflight"
              and r["concurrency"] == 1]
    if len(prefix) >= 2:
        parts += ["## Reuse: shared prefix, per-user context, answers of exact repeats (score mode, in-flight engine, "
                  "concurrency 1)",
                  "context_hit/miss_p50_ms: within a context-reuse cell, requests whose user's context was cached "
                  "against those that computed it (other requests: the headline context_hit_vs_miss_latency pairs each "
                  "hit with the same request in the prefix-only cell instead). answer_hit/miss_p50_ms: within the "
                  "answer-cache cell (the server's default: exact repeats answered without the model), the repeats "
                  "against the requests the model ran. Hit and miss counts: per round, medians over rounds.",
                  markdown_table(prefix, ["model", "prefix_reuse", "context_reuse", "answer_cache", "requests", "errors",
                                          "p50_ms", "p95_ms", "context_hits", "context_misses", "context_hit_p50_ms",
                                          "context_miss_p50_ms", "answer_hits", "answer_misses", "answer_hit_p50_ms",
                                          "answer_miss_p50_ms", "rounds"])]
    if "utilisation" in report:
        u = report["utilisation"]
        parts += ["## Utilisation: score-mode prefill FLOP/s against this machine's matmul peak (same run)",
                  f"FLOP/s = 2 x parameters ({u['parameter_count']}: the ranker's {u['parameters']:,}) x prompt tokens / time; "
                  f"peak: a {u['rows'][0]['matmul_n']}³ torch.matmul, median of {report['config']['utilisation_repeats']}, "
                  f"interleaved with the prefills. Chosen precision: {u['chosen_from']}. The reference rows: the same "
                  "code on a random-weight decoder of a production-class width, same prompt length (their own "
                  "parameters), showing what this machine reaches when matmuls are most of a pass.",
                  markdown_table(u["rows"], ["dtype", "matmul_dtype", "source", "parameters", "peak_gflops",
                                             "prompt_tokens", "prefill_ms", "prefill_gflops", "utilisation"])]
    if "retrieval_model" in report:
        parts += ["## Retrieval: SASRec top-k in ONNX Runtime vs torch eager (last round)",
                  markdown_table(report["retrieval_model"], ["engine", "batch", "median_ms", "p90_ms", "vs_torch"])]
    return "\n\n".join(parts)


def _met(goal: dict | None) -> str:
    if goal is None:
        return ""
    if goal["met"] is None:
        why = goal.get("why", "generate ran no decode pass")
        return f"n/a: {why}" + (" (--generate-logit-weight 1 measures it)" if why == "generate ran no decode pass"
                                else "")
    return "yes" if goal["met"] else "NO"


def _jsonable(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
