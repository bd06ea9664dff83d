"""`python -m loadtest.bench mixed`: score and generate requests together, closed vs open loop, static vs
in-flight batching: does a score request wait behind generate requests?

The `all` report's mixed cell is a closed loop (16 callers, each sending when its last answer came): the
server is always saturated and a score request's latency is mostly its queue behind other score requests
(Little's law), under either strategy. Real callers are independent: requests arrive whether or not the
earlier ones were answered. Here, per round, on the bundle's merged model with real prompts and the same
80/20 mix (`--generate-share`):

1. the closed loop at concurrency 16 under static and in-flight batching (as in `all`); static's
   throughput there is its capacity on this mix;
2. an open loop for each `--loads` share of that capacity: Poisson arrivals at share x capacity req/s
   (loadtest/drive.py `drive_open`), the same arrival times for both strategies; each request's latency
   runs from its arrival to its answer.

Reported per cell and round (one row each, `--repeats` rounds): score and generate requests' own p50/p95; and
per load the ratio in-flight / static of the score requests' p95, taken within each round, and its median
over the rounds. Generate mode
decodes (`--generate-logit-weight`, 1 by default): with the shipped fit's 0 it writes its answer without a
decode pass and the mix is score-like throughout. Writes reports/bench_mixed.json and .md.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.bench_ranking import (load_workload, mixed_modes, per_mode, request_order, server_engine_config,
                                    workload_batch)
from loadtest.report import CPU_SHARE_KEYS, disturbance, disturbed, machine_info, markdown_table, write_report

log = logging.getLogger(__name__)

STRATEGIES = ("static", "inflight")
CLOSED_CONCURRENCY = 16
QUICK = {"requests": 12, "repeats": 1, "loads": [0.5], "candidates": 10, "generate_k": 2}


@dataclass
class MixedBenchConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle (python -m compile all)", "metavar": "DIR"})
    out: Path = field(default=Path("reports"), metadata={"help": "where bench_mixed.json/.md go", "metavar": "DIR"})
    requests: int = field(default=200, metadata={"help": "requests per cell"})
    generate_share: float = field(default=0.2, metadata={"help": "share of generate requests in the mix"})
    loads: list[float] = field(default_factory=lambda: [0.6, 0.8, 0.9], metadata={
        "help": "open-loop arrival rates as shares of static batching's closed-loop throughput on this mix"})
    repeats: int = field(default=3, metadata={"help": "rounds; each ratio is taken within a round, then the median"})
    generate_logit_weight: float = field(default=1.0, metadata={
        "help": "generate mode's weight of the model's label logits (1: it decodes; 0: no decode pass)"})
    candidates: int = field(default=0, metadata={"help": "candidates per prompt (0: the K the LLM was tuned with)"})
    generate_k: int = field(default=0, metadata={"help": "answer lines in generate mode (0: llm/ranker.json's)"})
    seed: int = field(default=0, metadata={"help": "users sampled and arrival times"})

    def __post_init__(self) -> None:
        if not 0 < self.generate_share < 1:
            raise ValueError(f"--generate-share must be in (0, 1), got {self.generate_share}")
        if not self.loads or not all(0 < x < 1 for x in self.loads):
            raise ValueError(f"--loads must be shares in (0, 1) of the static capacity, got {self.loads}")
        if min(self.requests, self.repeats) < 1:
            raise ValueError("--requests and --repeats must be >= 1")


def run(config: MixedBenchConfig) -> dict:
    from loadtest.drive import run_strategy

    started = time.perf_counter()
    before = machine_info()
    workload = load_workload(config.bundle, CLOSED_CONCURRENCY, candidates=config.candidates,
                             generate_k=config.generate_k, seed=config.seed,
                             generate_logit_weight=config.generate_logit_weight)
    engine_config = server_engine_config()
    modes = mixed_modes(config.requests, config.generate_share)
    order = request_order(len(workload.users), config.requests, seed=config.seed)
    batch = workload_batch(workload, modes, order)
    run_strategy("inflight", workload.model, batch[:4], 2, engine_config, warmup=1)  # process warm-up

    def cell(strategy: str, rate_rps: float = 0.0) -> dict:
        result = run_strategy(strategy, workload.model, batch, CLOSED_CONCURRENCY, engine_config, warmup=1,
                              rate_rps=rate_rps, seed=config.seed)
        return {**result.summary(), **per_mode(result.latencies_ms if not result.errors else None, modes)}

    rows: list[dict] = []
    for number in range(config.repeats):
        strategies = STRATEGIES if number % 2 == 0 else tuple(reversed(STRATEGIES))  # drift hits both alike
        closed = {s: cell(s) for s in strategies}
        capacity = closed["static"]["throughput_rps"]
        rows += [{"round": number, "arrivals": "closed", "load": None, **closed[s]} for s in STRATEGIES]
        if not capacity > 0:
            log.warning("round %d: static batching answered nothing (errors %s); its open-loop cells are skipped, "
                        "they are set as fractions of its throughput", number, closed["static"]["errors"])
            continue
        for load in config.loads:
            rows += [{"round": number, "arrivals": "open", "load": load, "rate_rps": round(load * capacity, 3),
                      **cell(s, load * capacity)} for s in strategies]
    report = {"benchmark": "mixed", "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "machine_before": before, "workload": {**workload.describe(), "generate_share": config.generate_share},
              "rows": rows, "ratios": ratios(rows), "machine_after": machine_info(),
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(config.out, "bench_mixed", report, markdown(report))
    print(markdown(report))
    return report


def ratios(rows: list[dict]) -> dict[str, dict]:
    """Per arrival setting: in-flight / static score p95 in each round, their median, and the rounds in which
    either cell ran on a machine busy with something else (`report.disturbed`)."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(setting(r) for r in rows):
        per_round, suspect = [], []
        for number in sorted({r["round"] for r in rows}):
            pair = {r["strategy"]: r for r in rows if setting(r) == key and r["round"] == number}
            if all(pair.get(s, {}).get("score_p95_ms") for s in STRATEGIES):
                per_round.append(round(pair["inflight"]["score_p95_ms"] / pair["static"]["score_p95_ms"], 3))
                if any(disturbed(pair[s]) for s in STRATEGIES):
                    suspect.append(number)
        if per_round:
            out[key] = {"inflight_vs_static_score_p95": statistics.median(per_round), "rounds": per_round,
                        "disturbed_rounds": suspect}
    return out


def setting(row: dict) -> str:
    return f"closed c{CLOSED_CONCURRENCY}" if row["arrivals"] == "closed" else f"open {row['load']:g} x capacity"


def markdown(report: dict) -> str:
    columns = ["round", "arrivals", "load", "rate_rps", "strategy", "throughput_rps", "score_p50_ms", "score_p95_ms",
               "generate_p50_ms", "generate_p95_ms", "errors", *CPU_SHARE_KEYS]
    ratio_rows = [{"arrivals": key, **value} for key, value in report["ratios"].items()]
    return "\n\n".join([
        "# Mixed traffic: score requests behind generate requests, static vs in-flight batching",
        f"Workload: {report['workload']}",
        "## In-flight / static, score requests' p95 (median over rounds; each round's ratio)",
        markdown_table(ratio_rows, ["arrivals", "inflight_vs_static_score_p95", "rounds", "disturbed_rounds"]),
        "## Cells",
        markdown_table([{**r, "load": "-" if r["load"] is None else r["load"], "rate_rps": r.get("rate_rps", "-")}
                        for r in report["rows"]], columns),
        f"{report['seconds']} s; load average before {report['machine_before']['load_average_1_5_15']}, "
        f"after {report['machine_after']['load_average_1_5_15']}. "
        + disturbance([(f"round {r['round']} {setting(r)} {r['strategy']}", r) for r in report["rows"]]),
    ])
