"""Research script (issue 13): would re-ranking more retrieved candidates raise what a re-ranker can reach?

    python compile/reference/candidate_count.py --bundle bundle --k 20 30 50

For each K: the held-out training rows and all validation users' rows with K candidates (readout_ablation's
prepare, cached per K in the bundle), SASRec's recall@K on validation, and the cheap re-ranker that the
LLM's fused score has matched so far (retrieval log-softmax + a weight per trend bucket, fit listwise on the
training rows, retrieval weight 2-fold cross-fit on validation), with its paired bootstrap 95 % interval
over the retrieval order on the same users. No LLM is trained: a K where this baseline gains nothing over
K=20 is not worth the LLM's longer prompts (each candidate line is ~10 tokens of prefill).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from palr import metrics
from palr.bundle import Bundle
from palr.ranking import target_rank
from readout_ablation import crossfit_ranks, prepare, rows_cache, trend_weights  # the same folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundle"))
    p.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    p.add_argument("--window", type=float, default=30, help="days of interactions counted for the trend bucket")
    p.add_argument("--k", type=int, nargs="+", default=[20, 30, 50], help="candidate counts to compare")
    a = p.parse_args()
    bundle = Bundle.open(a.bundle)
    for k in a.k:
        train, valid = prepare(bundle, a.data, k, a.window, rows_cache(a.bundle, a.window, k))
        weights = trend_weights(train)
        targets = [r["target_position"] for r in valid]
        linear = [[weights[b] for b in r["trend"]] for r in valid]
        ranks, fusion = crossfit_ranks(linear, [r["scores"] for r in valid], targets)
        retrieval = metrics.per_user_ndcg([target_rank(range(k), t) for t in targets], 10)
        ci = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg(ranks, 10), retrieval)
        recall = sum(t is not None for t in targets) / len(targets)
        print(f"K={k}: {len(train)} training rows, {len(valid)} validation users, recall@{k} {recall:.3f}, "
              f"retrieval NDCG@10 {sum(retrieval) / len(retrieval):.4f}; retrieval + trend buckets (weights "
              f"{fusion}): {ci['ratio']:.3f}x (95 % CI {ci['low']:.3f} - {ci['high']:.3f})", flush=True)


if __name__ == "__main__":
    main()
