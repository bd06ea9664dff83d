"""The benchmark hook: every strategy can be built over one model and driven at a concurrency."""

from __future__ import annotations

import asyncio
import random

import pytest

pytest.importorskip("torch")

from palr.llm import load_causal_lm  # noqa: E402
from loadtest.baselines import STRATEGIES, strategy_engine  # noqa: E402
from ranking_server.engines.base import EngineRequest  # noqa: E402
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


def test_drive_counts_errors_instead_of_stopping(model):
    engine = strategy_engine("inflight", model, EngineConfig(max_batch_size=1, max_tokens_per_step=8, max_queue=1))
    try:
        result = asyncio.run(drive(engine, requests("generate"), concurrency=8))
    finally:
        engine.close()
    assert result.errors.get("EngineOverloaded", 0) > 0
    assert len(result.latencies_ms) + sum(result.errors.values()) == 8
