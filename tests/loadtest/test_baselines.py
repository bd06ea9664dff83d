"""The static-batching baseline the bench compares in-flight batching with: the same answers as the in-flight
engine, and the same prompt caches (a baseline that recomputed what in-flight batching reuses would flatter it)."""

from __future__ import annotations

import asyncio
import random

import pytest

from loadtest.baselines import StaticBatchingEngine, StaticConfig
from ranking_server.engines.base import EngineRequest
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.hf import HFEngine

PREFIX = list(range(500, 520))
LABELS = list(range(10, 16))


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def same_user_requests(n: int) -> list[EngineRequest]:
    """`n` score requests of one user: the same context (40 tokens), each its own candidate lines."""
    rng = random.Random(0)
    context = [rng.randrange(100, 900) for _ in range(40)]
    requests = []
    for i in range(n):
        lines = [token for label in LABELS for token in (label, rng.randrange(100, 900))]
        requests.append(EngineRequest(f"r{i}", PREFIX, context + lines + [7], LABELS, context_len=len(context)))
    return requests


async def rank_batch(engine, requests: list[EngineRequest]):
    await engine.rank(EngineRequest("warm", PREFIX, [901, 902, 7], LABELS[:1]))  # caches the shared prefix
    try:
        return await asyncio.gather(*(engine.rank(r) for r in requests))
    finally:
        engine.close()


def test_static_batches_answer_as_in_flight_and_reuse_the_cached_prefix_for_one_users_repeats(model):
    requests = same_user_requests(3)
    static = asyncio.run(rank_batch(StaticBatchingEngine(model, StaticConfig(max_batch_size=4, max_seq_len=256,
                                                                             batch_timeout_ms=200)), requests))
    in_flight = asyncio.run(rank_batch(HFEngine(model, EngineConfig(max_batch_size=4, max_seq_len=256)), requests))
    for a, b in zip(static, in_flight):
        assert a.order == b.order
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
    # one pass for the batch: no row can copy a context its batch computes, but every row copies the prefix
    assert [r.cached_tokens for r in static] == [len(PREFIX)] * 3
    assert max(r.cached_tokens for r in in_flight) > len(PREFIX)  # in flight, a repeat reuses the context too
