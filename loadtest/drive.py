"""In-process load driver for the engines: the hook `loadtest/bench.py` uses to compare
one-at-a-time, static and in-flight batching (and prefix reuse on/off) side by side.

    results = compare(model, requests, strategies=("sequential", "inflight"), concurrency=16)
    ratio(results["inflight"].throughput_rps, results["sequential"].throughput_rps)

`drive` is a closed loop: `concurrency` callers, each sending its next request as soon as the last
one answered, like the Locust users do over gRPC, minus the network. `drive_open` is an open loop:
requests arrive at Poisson times at a given rate whether or not earlier ones were answered, as the
independent users behind a calling service do. Every strategy gets the same model object and the
same requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loadtest.baselines import strategy_engine
from loadtest.report import CpuTimes, cpu_share
from ranking_server.engines.base import EngineRequest, EngineStats, RankingEngine, mean_batch

log = logging.getLogger(__name__)


@dataclass
class DriveResult:
    """Latencies of one run (in request order), the engine's counters after it (since it was made) and the batch
    sizes of this run's own steps."""

    strategy: str
    concurrency: int
    wall_s: float
    latencies_ms: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    stats: EngineStats | None = None
    cached_tokens: list[int] = field(default_factory=list)  # per answered request, aligned with latencies_ms
    answer_reused: list[bool] = field(default_factory=list)  # per answered request: an AnswerCache hit
    cpu_share: dict[str, float] = field(default_factory=dict)  # what else had the machine meanwhile (report.cpu_share)
    batch_size_hist: dict[int, int] = field(default_factory=dict)  # this run's steps by batch size (no warm-up)

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {"strategy": self.strategy, "concurrency": self.concurrency, "ok": len(self.latencies_ms),
                "errors": dict(self.errors), "wall_s": round(self.wall_s, 3),
                "throughput_rps": round(self.throughput_rps, 4),
                "p50_ms": round(self.percentile_ms(50), 1), "p95_ms": round(self.percentile_ms(95), 1),
                "mean_ms": round(float(np.mean(self.latencies_ms)), 1) if self.latencies_ms else None,
                "mean_batch": mean_batch(self.batch_size_hist) if self.stats else None, **self.cpu_share}


class _Calls:
    """What both drivers record: each request's latency, cached tokens and whether its answer was a kept one
    (by its index), errors by type; and the machine's CPU time, to say what else ran meanwhile."""

    def __init__(self, engine: RankingEngine, requests: Sequence[EngineRequest]):
        self.engine, self.requests = engine, requests
        self.latencies: list[float | None] = [None] * len(requests)
        self.cached: list[int] = [0] * len(requests)
        self.reused: list[bool] = [False] * len(requests)
        self.errors: Counter[str] = Counter()
        self.cpu_before = CpuTimes.now()
        self.steps_before = Counter(engine.stats().batch_size_hist)  # an engine used before: not this run's steps

    async def send(self, i: int, since: float) -> None:
        """Request i (its id made unique per run); its latency runs from `since` (a perf_counter time)."""
        request = dataclasses.replace(self.requests[i], request_id=f"{self.requests[i].request_id}#{i}")
        try:
            result = await self.engine.rank(request)
        except Exception as e:  # noqa: BLE001 - counted, the run goes on
            self.errors[type(e).__name__] += 1
            return
        self.latencies[i] = 1e3 * (time.perf_counter() - since)
        self.cached[i] = result.cached_tokens
        self.reused[i] = result.answer_reused

    def result(self, strategy: str, concurrency: int, wall_s: float) -> DriveResult:
        answered = [i for i, x in enumerate(self.latencies) if x is not None]
        stats = self.engine.stats()
        return DriveResult(strategy or self.engine.name, concurrency, wall_s, [self.latencies[i] for i in answered],
                           dict(self.errors), stats, [self.cached[i] for i in answered],
                           [self.reused[i] for i in answered], cpu_share(self.cpu_before, CpuTimes.now()),
                           dict(Counter(stats.batch_size_hist) - self.steps_before))


async def drive(engine: RankingEngine, requests: Sequence[EngineRequest], concurrency: int,
                strategy: str = "") -> DriveResult:
    """Send every request through `engine` with `concurrency` callers in a closed loop."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    calls, order = _Calls(engine, requests), iter(range(len(requests)))

    async def caller():
        for i in order:
            await calls.send(i, time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls.result(strategy, concurrency, time.perf_counter() - started)


def arrival_times(n: int, rate_rps: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of `n` requests arrives: a Poisson process at `rate_rps`
    (exponential gaps), the same for every strategy given the same seed."""
    if rate_rps <= 0:
        raise ValueError(f"an open loop needs a positive arrival rate, got {rate_rps}")
    rng = random.Random(seed)
    return list(itertools.accumulate(rng.expovariate(rate_rps) for _ in range(n)))


async def drive_open(engine: RankingEngine, requests: Sequence[EngineRequest], rate_rps: float, seed: int = 0,
                     strategy: str = "") -> DriveResult:
    """Send request i at `arrival_times(...)[i]`, answered or not the ones before; a latency runs from the
    request's scheduled arrival to its answer (so time the event loop was late counts too)."""
    arrivals = arrival_times(len(requests), rate_rps, seed)
    calls = _Calls(engine, requests)
    started = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, started + arrivals[i] - time.perf_counter()))
        await calls.send(i, started + arrivals[i])

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return calls.result(strategy, 0, time.perf_counter() - started)


def run_strategy(strategy: str, model, requests: Sequence[EngineRequest], concurrency: int,
                 config=None, warmup: int = 2, rate_rps: float = 0.0, seed: int = 0) -> DriveResult:
    """Build one engine of `strategy` and run it (`run_engine`)."""
    return run_engine(strategy_engine(strategy, model, config), requests, concurrency, warmup, rate_rps, strategy,
                      seed)


def run_engine(engine: RankingEngine, requests: Sequence[EngineRequest], concurrency: int, warmup: int = 2,
               rate_rps: float = 0.0, label: str = "", seed: int = 0) -> DriveResult:
    """Warm `engine` up on the first `warmup` requests, drive all requests (closed loop at `concurrency`, or open
    loop at `rate_rps` when it is > 0, arrivals drawn with `seed`), close it."""
    try:
        if warmup:
            asyncio.run(drive(engine, requests[:warmup], 1))
        result = asyncio.run(drive_open(engine, requests, rate_rps, seed, strategy=label) if rate_rps > 0
                             else drive(engine, requests, concurrency, label))
    finally:
        engine.close()
    log.info("%s %s: %s", label or engine.name, f"open loop {rate_rps:.2f} req/s" if rate_rps > 0
             else f"c={concurrency}", result.summary())
    return result


def compare(model, requests: Sequence[EngineRequest], strategies: Sequence[str], concurrency: int,
            config=None, warmup: int = 2) -> dict[str, DriveResult]:
    """The same requests through each strategy in turn, same model, same config."""
    return {s: run_strategy(s, model, requests, concurrency, config, warmup) for s in strategies}


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")
