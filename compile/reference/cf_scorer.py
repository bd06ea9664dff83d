"""Research script (issue 13): does a non-sequential collaborative scorer (EASE) add to the cheap re-ranker?

    python compile/reference/cf_scorer.py --bundle bundle

SASRec scores a candidate from the order of the user's items; EASE (Steck 2019: an item-item linear model,
B = I - P / diag(P) with P = (XᵀX + λI)⁻¹, closed form) from which items co-occur in whole histories, a view the
sequential model compresses away. EASE is fit on every user's training items (the validation targets never
enter it), scores the served SASRec's 20 candidates of each validation user by the user's training history,
and its log-softmax over them, times `--scale`, joins the cheap re-ranker (retrieval log-softmax + a weight
per 30-day trend bucket fit on the held-out training rows; fusion weight 2-fold cross-fit on the 943
validation users), as second_model.py does for a second SASRec. Paired bootstrap 95 % intervals over the
retrieval order and over the trend bucket alone. An ensemble member is worth serving only if it lifts that
baseline steadily (the same sign over neighbouring scales and λ).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from palr import metrics
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.ranking import order_by_scores, target_rank
from readout_ablation import crossfit_ranks, prepare, rows_cache, trend_weights  # the same folder


def ease(interactions: np.ndarray, lam: float) -> np.ndarray:
    """EASE's item-item weights [items, items] from a binary user-item matrix [users, items]."""
    gram = interactions.T @ interactions + lam * np.eye(interactions.shape[1])  # [items, items]
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--lam", type=float, nargs="+", default=[100.0, 300.0, 1000.0], help="EASE's L2 weights")
    parser.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                        help="weights of EASE's log-softmax beside the trend term")
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    train, valid = prepare(bundle, args.data, 20, 30.0, rows_cache(args.bundle, 30.0))
    corpus = Corpus.load(args.data)
    catalog, split = corpus.catalog, corpus.split
    matrix = np.zeros((len(split.train), catalog.num_indices), dtype=np.float64)  # [users, items]
    for row, user in enumerate(sorted(split.train)):
        matrix[row, catalog.indices(split.train[user])] = 1.0
    weights = trend_weights(train)
    targets = [r["target_position"] for r in valid]
    scores = [r["scores"] for r in valid]
    trend = [[float(weights[b]) for b in r["trend"]] for r in valid]
    retrieval = metrics.per_user_ndcg([target_rank(range(20), t) for t in targets], 10)

    def ratio(a, b) -> str:
        ci = metrics.paired_bootstrap_ratio(a, b)
        return f"{ci['ratio']:.3f}x ({ci['low']:.3f} - {ci['high']:.3f})"

    ranks, fusion = crossfit_ranks(trend, scores, targets)
    alone = metrics.per_user_ndcg(ranks, 10)
    print(f"{len(valid)} validation users; trend bucket alone {ratio(alone, retrieval)} of retrieval, "
          f"fusion weights {fusion}", flush=True)
    for lam in args.lam:
        item_weights = ease(matrix, lam)
        cf = []
        for row in valid:
            history = np.zeros(catalog.num_indices)
            history[catalog.indices(row["history"])] = 1.0
            raw = torch.tensor(history @ item_weights[:, catalog.indices(row["candidates"])])  # [K]
            cf.append(torch.log_softmax(raw * 10.0, -1).tolist())  # EASE scores are ~0.1 apart: a fixed temperature
        ease_alone = metrics.per_user_ndcg([target_rank(order_by_scores(c), t) for c, t in zip(cf, targets)], 10)
        print(f"lambda {lam:g}: EASE's order of the 20 candidates {ratio(ease_alone, retrieval)} of retrieval",
              flush=True)
        for scale in args.scale:
            extra = [[t + scale * x for t, x in zip(tr, c)] for tr, c in zip(trend, cf)]
            ranks, fusion = crossfit_ranks(extra, scores, targets)
            ndcg = metrics.per_user_ndcg(ranks, 10)
            print(f"  trend + {scale:g} x EASE: {ratio(ndcg, retrieval)} of retrieval, {ratio(ndcg, alone)} of the "
                  f"trend bucket alone, fusion weights {fusion}", flush=True)


if __name__ == "__main__":
    main()
