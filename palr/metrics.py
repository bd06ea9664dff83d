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


def per_user_ndcg(ranks: Sequence[Rank], k: int) -> list[float]:
    """Each user's NDCG@k (1 / log2(rank + 2) inside the top k, else 0)."""
    return [1.0 / math.log2(r + 2) if _hit(r, k) else 0.0 for r in ranks]


def paired_bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], samples: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """mean(numerator) / mean(denominator) over the same users, with a paired bootstrap interval: users are
    resampled with replacement (the same draw for both sides) `samples` times; the interval is the
    percentile interval of the resampled ratios. A draw whose denominator is 0 (no hit among few users) has no
    ratio: `undefined_draws` says how many the interval is without (it is then conditional on a hit)."""
    import numpy as np

    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.shape != b.shape or not a.size:
        raise ValueError(f"paired samples of equal, non-zero size needed, got {a.shape} and {b.shape}")
    draws = np.random.default_rng(seed).integers(0, a.size, size=(samples, a.size))
    top, bottom = a[draws].mean(axis=1), b[draws].mean(axis=1)
    ratios = np.divide(top, bottom, out=np.full(samples, np.nan), where=bottom > 0)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(ratios, [tail, 100 - tail])
    return {"ratio": float(a.mean() / b.mean()) if b.mean() > 0 else float("nan"), "low": float(lo), "high": float(hi),
            "users": int(a.size), "samples": samples, "level": level, "undefined_draws": int(np.isnan(ratios).sum())}
