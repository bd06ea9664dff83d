"""What the engine tests send: single-token label ids and a mixed workload of engine requests."""

from __future__ import annotations

import random

from ranking_server.engines.base import EngineRequest


def label_ids(tokenizer, n: int) -> list[int]:
    """Token ids of the labels " A", " B", ... (single tokens in the SmolLM2 tokenizer)."""
    return [tokenizer.encode(f" {chr(ord('A') + i)}", add_special_tokens=False)[0] for i in range(n)]


def mixed_requests(labels, n=16, seed=0) -> list[EngineRequest]:
    """n requests, half score half generate, two shared prefixes, suffixes of 1..150 tokens, some with bias."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40000) for _ in range(length)] for length in (24, 40)]
    requests = []
    for i in range(n):
        mode = "generate" if i % 2 else "score"
        n_labels = rng.choice([5, 12, 20])
        bias = [rng.uniform(-0.3, 0.3) for _ in range(n_labels)] if i % 4 == 3 else None
        requests.append(EngineRequest(
            request_id=f"r{i}", prefix_ids=prefixes[i % 3 == 0],
            suffix_ids=[rng.randrange(100, 40000) for _ in range(rng.randint(1, 150))],
            label_token_ids=labels[:n_labels], mode=mode, k=rng.randint(1, n_labels), bias=bias))
    return requests
