"""Research script (issue 13): two readout_ablation runs on the same validation users, side by side.

    python compile/reference/paired_check.py exp_A_scores.json exp_B_scores.json [--bundle bundle]

Reads the LLM scores each run wrote (exp_<tag>_scores.json, one list per validation user, candidates in
retrieval order) and the validation rows readout_ablation cached in the bundle, fuses each with the
retrieval scores (`--with-trend`: retrieval + the linear trend-bucket weights, as the shipped fusion) at one
weight (default 1.0, the training weight: nothing fit on these users; 0: cross-fit on two halves), and prints
NDCG@10 of A, of B and of the retrieval order, with paired bootstrap 95 % intervals of A / B and of each
over retrieval.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

from palr import metrics
from palr.ranking import fuse, order_by_scores, target_rank
from readout_ablation import crossfit_ranks, rows_cache, trend_weights  # the same folder (scripts run as files)


def per_user(llm: list[list[float]], rows: list[dict], weight: float | None,
             prior: list[list[float]] | None = None) -> list[float]:
    """Each user's NDCG@10: the LLM's scores fused at `weight` (0: cross-fit on two halves of the users) with
    `prior` (default: the retrieval scores), or the retrieval order when llm is None."""
    if llm is None:
        return metrics.per_user_ndcg([target_rank(range(len(r["scores"])), r["target_position"]) for r in rows], 10)
    prior = prior or [r["scores"] for r in rows]
    if weight == 0:
        ranks, _ = crossfit_ranks(llm, prior, [r["target_position"] for r in rows])
    else:
        ranks = [target_rank(order_by_scores(fuse(llm[i], prior[i], weight)), r["target_position"])
                 for i, r in enumerate(rows)]
    return metrics.per_user_ndcg(ranks, 10)


def trend_prior(train_rows: list[dict], rows: list[dict]) -> list[list[float]]:
    """Retrieval scores + the linear per-trend-bucket weights fit on the training rows: fused with the LLM
    at weight w, the shape of the shipped fusion (`palr.ranking.retrieval_prior`)."""
    weights = trend_weights(train_rows)
    return [[s + weights[t] for s, t in zip(r["scores"], r["trend"])] for r in rows]


def print_paired(nd_a: list[float], nd_b: list[float], nd_r: list[float]) -> None:
    """A / B, A / retrieval and B / retrieval of per-user NDCG@10, each with its paired bootstrap 95 % interval."""
    for name, num, den in (("A / B", nd_a, nd_b), ("A / retrieval", nd_a, nd_r), ("B / retrieval", nd_b, nd_r)):
        ci = metrics.paired_bootstrap_ratio(num, den)
        print(f"{name:>14}: {ci['ratio']:.3f} (95 % CI {ci['low']:.3f} - {ci['high']:.3f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="exp_<tag>_scores.json of the variant")
    p.add_argument("b", type=Path, help="exp_<tag>_scores.json of the reference run")
    p.add_argument("--bundle", type=Path, default=Path("bundle"))
    p.add_argument("--window", type=float, default=30, help="the runs' --window (names the cached rows)")
    p.add_argument("--weight", type=float, default=1.0,
                   help="fusion weight of the retrieval log-softmax (0: cross-fit on two halves of the users)")
    p.add_argument("--with-trend", action="store_true",
                   help="fuse with retrieval + the linear trend-bucket weights (the shipped fusion) instead")
    a = p.parse_args()
    train_rows, rows = pickle.loads(rows_cache(a.bundle, a.window).read_bytes())
    llm_a, llm_b = json.loads(a.a.read_text()), json.loads(a.b.read_text())
    rows = rows[:len(llm_a)]
    if len(llm_a) != len(llm_b):
        raise SystemExit(f"{a.a} has {len(llm_a)} users, {a.b} {len(llm_b)}: not the same users")
    prior = trend_prior(train_rows, rows) if a.with_trend else None
    nd_a, nd_b = per_user(llm_a, rows, a.weight, prior), per_user(llm_b, rows, a.weight, prior)
    nd_r = per_user(None, rows, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{len(rows)} users, fusion weight {a.weight:g}{' (cross-fit)' if a.weight == 0 else ''}"
          f"{' with the trend term' if a.with_trend else ''}: NDCG@10 A {mean(nd_a):.4f}, B {mean(nd_b):.4f}, "
          f"retrieval {mean(nd_r):.4f}")
    print_paired(nd_a, nd_b, nd_r)


if __name__ == "__main__":
    main()
