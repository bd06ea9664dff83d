"""Research script (issue 13): two readout_ablation runs on the same validation users, side by side.

    python compile/reference/paired_check.py exp_A_scores.json exp_B_scores.json [--bundle bundle]

Reads the LLM scores each run wrote (exp_<tag>_scores.json, one list per validation user, candidates in
retrieval order) and the validation rows readout_ablation cached in the bundle, fuses each with the
retrieval scores at one weight (default 1.0, the training weight: nothing fit on these users), and prints
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
from readout_ablation import rows_cache  # the same folder: scripts run as `python compile/reference/...`


def per_user(llm: list[list[float]], rows: list[dict], weight: float | None) -> list[float]:
    """Each user's NDCG@10: the LLM's scores fused at `weight`, or the retrieval order when llm is None."""
    ranks = []
    for i, r in enumerate(rows):
        order = range(len(r["scores"])) if llm is None else order_by_scores(fuse(llm[i], r["scores"], weight))
        ranks.append(target_rank(order, r["target_position"]))
    return metrics.per_user_ndcg(ranks, 10)


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
    p.add_argument("--weight", type=float, default=1.0, help="fusion weight of the retrieval log-softmax")
    a = p.parse_args()
    _, rows = pickle.loads(rows_cache(a.bundle, a.window).read_bytes())
    llm_a, llm_b = json.loads(a.a.read_text()), json.loads(a.b.read_text())
    rows = rows[:len(llm_a)]
    if len(llm_a) != len(llm_b):
        raise SystemExit(f"{a.a} has {len(llm_a)} users, {a.b} {len(llm_b)}: not the same users")
    nd_a, nd_b, nd_r = per_user(llm_a, rows, a.weight), per_user(llm_b, rows, a.weight), per_user(None, rows, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{len(rows)} users, fusion weight {a.weight:g}: NDCG@10 A {mean(nd_a):.4f}, B {mean(nd_b):.4f}, "
          f"retrieval {mean(nd_r):.4f}")
    print_paired(nd_a, nd_b, nd_r)


if __name__ == "__main__":
    main()
