"""`python -m loadtest.bench router`: two engines on one CPU behind a `ModeRouter`, computing at once or in
turns (`DeviceTurns`), against one engine serving both modes.

This is what `--engine ortgenai` serves when its build won only some modes: ortgenai for those, torch for the
rest. Here both are the hf engine over the bundle's merged model (score requests to one, generate requests to
the other), so the comparison measures the sharing of the CPU, not the two runtimes. Per round, on the 80/20
mix with decoding generate requests (as `bench mixed`): a closed loop at concurrency 16, then an open loop at
`--load` x the single engine's closed-loop throughput in that round (the same arrival times for every setup).
Reported per cell: throughput and each mode's p50/p95; writes reports/bench_router.json and .md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.bench_ranking import (load_workload, mixed_modes, per_mode, request_order, server_engine_config,
                                    workload_batch)
from loadtest.report import machine_info, markdown_table, write_report

log = logging.getLogger(__name__)

SETUPS = ("one engine", "router, at once", "router, in turns")
CONCURRENCY = 16


@dataclass
class RouterBenchConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle (python -m compile all)", "metavar": "DIR"})
    out: Path = field(default=Path("reports"), metadata={"help": "where bench_router.json/.md go", "metavar": "DIR"})
    requests: int = field(default=160, metadata={"help": "requests per cell"})
    generate_share: float = field(default=0.2, metadata={"help": "share of generate requests in the mix"})
    load: float = field(default=0.8, metadata={"help": "open-loop arrival rate as a share of one engine's capacity"})
    repeats: int = field(default=3, metadata={"help": "rounds (the setups' order alternates between rounds)"})
    generate_logit_weight: float = field(default=1.0, metadata={
        "help": "generate mode's weight of the model's label logits (1: it decodes)"})

    def __post_init__(self) -> None:
        if not 0 < self.generate_share < 1 or not 0 < self.load < 1:
            raise ValueError("--generate-share and --load must be in (0, 1)")
        if min(self.requests, self.repeats) < 1:
            raise ValueError("--requests and --repeats must be >= 1")


def build(setup: str, model, engine_config):
    """The setup's engine over the loaded model."""
    from ranking_server.engines.factory import share_device
    from ranking_server.engines.hf import HFEngine
    from ranking_server.engines.routed import ModeRouter

    if setup == "one engine":
        return HFEngine(model, engine_config)
    score, generate = HFEngine(model, engine_config, name="hf-score"), HFEngine(model, engine_config, name="hf-generate")
    if setup == "router, in turns":
        share_device(score, generate)
    return ModeRouter({"score": score, "generate": generate})


def run(config: RouterBenchConfig) -> dict:
    from loadtest.drive import run_engine

    started = time.perf_counter()
    before = machine_info()
    workload = load_workload(config.bundle, CONCURRENCY, generate_logit_weight=config.generate_logit_weight)
    engine_config = server_engine_config()
    modes = mixed_modes(config.requests, config.generate_share)
    batch = workload_batch(workload, modes, request_order(len(workload.users), config.requests))

    def cell(setup: str, rate_rps: float = 0.0) -> dict:
        result = run_engine(build(setup, workload.model, engine_config), batch, CONCURRENCY, rate_rps=rate_rps,
                            label=setup)
        return {"setup": setup, "arrivals": "open" if rate_rps else f"closed c{CONCURRENCY}",
                "rate_rps": round(rate_rps, 3) if rate_rps else None, "ok": len(result.latencies_ms),
                "throughput_rps": round(result.throughput_rps, 2), "errors": dict(result.errors),
                **per_mode(result.latencies_ms if not result.errors else None, modes)}

    rows = []
    for number in range(config.repeats):
        setups = SETUPS if number % 2 == 0 else tuple(reversed(SETUPS))
        closed = {s: cell(s) for s in setups}
        rate = config.load * closed["one engine"]["throughput_rps"]
        rows += [{"round": number, **closed[s]} for s in SETUPS]
        if not rate > 0:
            log.warning("round %d: one engine answered nothing (errors %s); the open-loop cells, set as a fraction "
                        "of its throughput, are skipped", number, closed["one engine"]["errors"])
            continue
        rows += [{"round": number, **cell(s, rate)} for s in setups]
    report = {"benchmark": "router", "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "machine_before": before, "workload": workload.describe(), "rows": rows,
              "machine_after": machine_info(), "seconds": round(time.perf_counter() - started, 1)}
    write_report(config.out, "bench_router", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    columns = ["round", "arrivals", "rate_rps", "setup", "throughput_rps", "score_p50_ms", "score_p95_ms", "generate_p50_ms",
               "generate_p95_ms", "errors"]
    return "\n\n".join([
        "# Two engines on one CPU: one engine vs a ModeRouter computing at once vs in turns",
        f"Workload: {report['workload']}",
        markdown_table([{**r, "rate_rps": r["rate_rps"] or "-"} for r in report["rows"]], columns),
        f"{report['seconds']} s; load average before {report['machine_before']['load_average_1_5_15']}, "
        f"after {report['machine_after']['load_average_1_5_15']}",
    ])
