"""Research script (issue 13): does a second sequential model add to the cheap re-ranker?

    python compile/reference/second_model.py --bundle bundle

The bundle's held-out SASRec (trained without each user's last training items, `sasrec_holdout`: its
negatives' source) scores the served SASRec's 20 candidates of every validation user; its log-softmax over them,
times a fixed `--scale`, joins the cheap re-ranker (retrieval log-softmax + a weight per 30-day trend bucket, fit
listwise on the held-out training rows; fusion weight 2-fold cross-fit on the 943 validation users, as
readout_ablation / user_trend do). Paired bootstrap 95 % intervals over the retrieval order and over the trend
bucket alone, on the same users. No LLM is trained: an ensemble member is worth serving only if it lifts this
baseline steadily (the same sign for neighbouring scales).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from palr import metrics
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.ranking import target_rank
from palr.sasrec import SASRec
from readout_ablation import crossfit_ranks, prepare, rows_cache, trend_weights  # the same folder


@torch.no_grad()
def candidate_log_probs(model: SASRec, catalog, rows) -> list[list[float]]:
    """Per row, the model's log-softmax over the row's candidates (its next-item scores at them)."""
    out = []
    for row in rows:
        history = catalog.indices(row["history"])[-model.arch.max_len:]
        scores = model.next_item_scores(torch.tensor([history]))[0]  # [items]
        out.append(torch.log_softmax(scores[torch.tensor(catalog.indices(row["candidates"]))], -1).tolist())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--scale", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                        help="weights of the second model's log-softmax beside the trend term")
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    train, valid = prepare(bundle, args.data, 20, 30.0, rows_cache(args.bundle, 30.0))
    second = SASRec.load(bundle.path("sasrec_holdout")).eval()
    second_log_probs = candidate_log_probs(second, Corpus.load(args.data).catalog, valid)
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
          f"fusion weights {fusion}")
    for scale in args.scale:
        extra = [[t + scale * x for t, x in zip(tr, lp)] for tr, lp in zip(trend, second_log_probs)]
        ranks, fusion = crossfit_ranks(extra, scores, targets)
        ndcg = metrics.per_user_ndcg(ranks, 10)
        print(f"trend + {scale:g} x second SASRec: {ratio(ndcg, retrieval)} of retrieval, {ratio(ndcg, alone)} of "
              f"the trend bucket alone, fusion weights {fusion}", flush=True)


if __name__ == "__main__":
    main()
