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

from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.sasrec import SASRec
from trend_baseline import trend_baseline  # the same folder


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
    base = trend_baseline(args.bundle, args.data)
    second = SASRec.load(Bundle.open(args.bundle).path("sasrec_holdout")).eval()
    second_log_probs = candidate_log_probs(second, Corpus.load(args.data).catalog, base.valid)
    for scale in args.scale:
        base.report("second SASRec", second_log_probs, scale)


if __name__ == "__main__":
    main()
