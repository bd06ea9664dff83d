"""Research script (issue 13): does a non-sequential collaborative scorer (EASE) add to the cheap re-ranker?

    python compile/reference/cf_scorer.py --bundle bundle

SASRec scores a candidate from the order of the user's items; EASE (Steck 2019: an item-item linear model,
B = I - P / diag(P) with P = (XᵀX + λI)⁻¹, closed form) from which items co-occur in whole histories, a view the
sequential model compresses away (`palr.collab`). EASE is fit on every user's training items (the validation targets never
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

import torch

from palr import metrics
from palr.collab import CollabTable
from palr.corpus import Corpus
from palr.ranking import order_by_scores, target_rank
from trend_baseline import ratio, trend_baseline  # the same folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--lam", type=float, nargs="+", default=[100.0, 300.0, 1000.0], help="EASE's L2 weights")
    parser.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                        help="weights of EASE's log-softmax beside the trend term")
    args = parser.parse_args()
    base = trend_baseline(args.bundle, args.data)
    corpus = Corpus.load(args.data)
    catalog, split = corpus.catalog, corpus.split
    histories = [catalog.indices(split.train[u]) for u in sorted(split.train)]  # the validation targets never
    targets = [r["target_position"] for r in base.valid]
    for lam in args.lam:
        table = CollabTable.fit(histories, catalog.num_indices, lam)
        cf = [torch.log_softmax(10.0 * torch.tensor(table.scores(catalog.indices(r["history"]),  # EASE scores
                                                                 catalog.indices(r["candidates"]))), -1).tolist()
              for r in base.valid]  # ~0.1 apart: a fixed temperature
        ease_alone = metrics.per_user_ndcg([target_rank(order_by_scores(c), t) for c, t in zip(cf, targets)], 10)
        print(f"lambda {lam:g}: EASE's order of the 20 candidates {ratio(ease_alone, base.retrieval)} of retrieval",
              flush=True)
        for scale in args.scale:
            base.report("EASE", cf, scale)


if __name__ == "__main__":
    main()
