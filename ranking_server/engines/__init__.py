"""LLM inference engines behind one interface (`base.RankingEngine`).

`hf` (in-flight batching, shared-prefix KV reuse) is the serving engine; `baselines` (one-at-a-time,
static batching) exist only so the benchmark can measure what in-flight batching buys.
`build_engine(strategy, model, config)` constructs any of them; `drive` runs requests through one.
"""

from __future__ import annotations

STRATEGIES = ("sequential", "static", "inflight")


def build_engine(strategy: str, model, config=None):
    """An engine of the given strategy over an already loaded model (the same weights for all)."""
    if strategy == "inflight":
        from ranking_server.engines.hf import HFEngine

        return HFEngine(model, config)
    if strategy == "static":
        from ranking_server.engines.baselines import StaticBatchingEngine

        return StaticBatchingEngine(model, config)
    if strategy == "sequential":
        from ranking_server.engines.baselines import SequentialEngine

        return SequentialEngine(model, config)
    raise ValueError(f"unknown engine strategy {strategy!r}; choose from {STRATEGIES}")
