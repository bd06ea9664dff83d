"""The benchmark hook: every strategy can be built over one model and driven at a concurrency."""

from __future__ import annotations

import asyncio
import random

import pytest


from palr.llm import load_causal_lm  # noqa: E402
from loadtest.baselines import STRATEGIES, strategy_engine  # noqa: E402
from ranking_server.engines.base import EngineRequest, mean_batch  # noqa: E402
from loadtest.drive import compare, drive, ratio  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir)[0]


def requests(mode, n=8):
    rng = random.Random(5)
    prefix = [rng.randrange(100, 40000) for _ in range(20)]
    return [EngineRequest("u", prefix, [rng.randrange(100, 40000) for _ in range(rng.randint(5, 60))],
                          list(range(330, 340)), mode=mode, k=4) for _ in range(n)]


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_compare_drives_every_strategy_with_the_same_requests(model, mode):
    config = EngineConfig(max_batch_size=4, max_tokens_per_step=64)
    results = compare(model, requests(mode), STRATEGIES, concurrency=4, config=config, warmup=2)
    assert set(results) == set(STRATEGIES)
    for strategy, result in results.items():
        assert result.errors == {} and len(result.latencies_ms) == 8, strategy
        assert result.stats.completed == 10  # warm-up included
        assert result.throughput_rps > 0 and result.percentile_ms(95) >= result.percentile_ms(50)
        summary = result.summary()
        assert summary["ok"] == 8 and summary["strategy"] == strategy
    assert results["sequential"].stats.max_active == 1
    assert results["inflight"].stats.max_active > 1  # concurrency 4 really batched
    assert ratio(2.0, 4.0) == 0.5


def test_mean_batch_counts_only_the_runs_own_steps(model):
    """One engine driven one at a time, then at concurrency 4 (as bench_gpu does level after level): the second
    run's mean batch is its own, not its engine's lifetime mean pulled toward the first run's batch size 1."""
    engine = strategy_engine("inflight", model, EngineConfig(max_batch_size=4, max_tokens_per_step=256))
    try:
        alone = asyncio.run(drive(engine, requests("score", 16), concurrency=1))
        together = asyncio.run(drive(engine, requests("score", 16), concurrency=4))
    finally:
        engine.close()
    assert alone.summary()["mean_batch"] < together.summary()["mean_batch"]  # ~1 (a finishing step may overlap)
    # a step answers its requests before the engine records it: the first run's last step may count in neither
    assert together.stats.steps - 1 <= sum(together.batch_size_hist.values()) + sum(alone.batch_size_hist.values()) \
        <= together.stats.steps
    assert together.summary()["mean_batch"] == mean_batch(together.batch_size_hist) > together.stats.mean_batch


def test_drive_counts_errors_instead_of_stopping(model):
    engine = strategy_engine("inflight", model, EngineConfig(max_batch_size=1, max_tokens_per_step=8, max_queue=1))
    try:
        result = asyncio.run(drive(engine, requests("generate"), concurrency=8))
    finally:
        engine.close()
    assert result.errors.get("EngineOverloaded", 0) > 0
    assert len(result.latencies_ms) + sum(result.errors.values()) == 8


def test_arrival_times_are_a_seeded_poisson_process():
    from loadtest.drive import arrival_times

    times = arrival_times(4000, rate_rps=20.0, seed=3)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g > 0 for g in gaps) and times == arrival_times(4000, 20.0, seed=3) != arrival_times(4000, 20.0, seed=4)
    assert abs(sum(gaps) / len(gaps) - 1 / 20.0) < 0.1 / 20.0  # mean gap 1/rate (4000 draws: within 10 %)
    with pytest.raises(ValueError):
        arrival_times(3, rate_rps=0.0)


@pytest.mark.parametrize("strategy", ["static", "inflight"])
def test_the_open_loop_sends_at_the_arrival_times_whether_or_not_earlier_requests_were_answered(model, strategy):
    from loadtest.drive import arrival_times, run_strategy

    config = EngineConfig(max_batch_size=4, max_tokens_per_step=64)
    batch = requests("generate", n=12)
    result = run_strategy(strategy, model, batch, concurrency=1, config=config, warmup=1, rate_rps=200.0)
    assert result.errors == {} and len(result.latencies_ms) == 12 and result.concurrency == 0
    assert result.wall_s >= arrival_times(12, 200.0)[-1]  # the last request arrived on schedule, not earlier
    assert result.stats.max_active > 1  # 200 req/s outpaces the answers: requests overlapped
