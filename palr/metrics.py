"""Top-k ranking metrics over the 0-based rank of each user's target item.

A rank of None (or any value >= k) is a miss: the target was not in the top k, or was not
retrieved at all. Each function returns the mean over users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Rank = int | None


def _hit(rank: Rank, k: int) -> bool:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return rank is not None and 0 <= rank < k


def _mean(values: list[float]) -> float:
    if not values:
        raise ValueError("no users to average over")
    return sum(values) / len(values)


def hit_rate(ranks: Sequence[Rank], k: int) -> float:
    """HR@k: share of users whose target is in the top k."""
    return _mean([1.0 if _hit(r, k) else 0.0 for r in ranks])


def ndcg(ranks: Sequence[Rank], k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) when it is in the top k."""
    return _mean([1.0 / math.log2(r + 2) if _hit(r, k) else 0.0 for r in ranks])


def mrr(ranks: Sequence[Rank], k: int) -> float:
    """MRR@k: 1 / (rank + 1) when the target is in the top k."""
    return _mean([1.0 / (r + 1) if _hit(r, k) else 0.0 for r in ranks])


def rank_of(target: str, ranked: Sequence[str]) -> Rank:
    """0-based position of target in a ranked list, None when absent."""
    try:
        return list(ranked).index(target)
    except ValueError:
        return None


def summary(ranks: Sequence[Rank], ks: Sequence[int] = (10, 20), prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}hr@{k}"] = hit_rate(ranks, k)
        out[f"{prefix}ndcg@{k}"] = ndcg(ranks, k)
    out[f"{prefix}mrr@{min(ks)}"] = mrr(ranks, min(ks))
    return out
