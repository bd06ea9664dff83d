"""Research script (issue 13): does an item's age add to the 30-day trend bucket the ranker's prompt carries?

    python compile/reference/time_features.py --bundle bundle

An item's age at a request: days since its first interaction in the bundle's timeline (palr/trends.py's
TrendTable: train + valid events, strictly before the request's moment), in buckets cut at `--edges`. For
each cut: the cheap re-ranker (retrieval log-softmax + weights, fit listwise on readout_ablation's held-out
rows, fusion weight 2-fold cross-fit on all validation users) with the trend bucket alone, trend + age
(a weight each, "add") and one weight per (trend, age) pair ("joint"), paired bootstrap 95 % intervals over
the retrieval order on the same users. No LLM is trained: an age token is worth a prompt token only if it
lifts this baseline steadily.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from palr import metrics
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.ranking import target_rank
from palr.trends import DAY_S, TrendTable
from readout_ablation import crossfit_ranks, linear_weights, prepare, rows_cache  # the same folder

CUTS = ("30,60,90,120,150,180", "30,90,180", "60,150", "60", "30", "90")


def ages(rows, corpus: Corpus, first_seen: np.ndarray) -> np.ndarray:
    """[R, K] days from each candidate's first interaction to the row's moment (-1: none before it)."""
    out = []
    for r in rows:
        moment = corpus.time_before(r["user"], len(r["history"]))
        first = first_seen[corpus.catalog.indices(r["candidates"])]
        days = (moment - first) / DAY_S
        out.append(np.where(np.isfinite(days) & (days >= 0), days, -1.0))
    return np.array(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundle"))
    p.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    p.add_argument("--window", type=float, default=30, help="the trend bucket's window (days)")
    p.add_argument("--edges", nargs="+", default=list(CUTS), help="age bucket edges in days, comma-separated")
    a = p.parse_args()
    train, valid = prepare(Bundle.open(a.bundle), a.data, 20, a.window, rows_cache(a.bundle, a.window))
    corpus = Corpus.load(a.data)
    table = TrendTable.from_corpus(corpus)
    first_seen = np.full(table.num_indices, np.inf)  # [N] each item's first interaction (inf: none)
    np.minimum.at(first_seen, table.items, table.times)
    age_train, age_valid = ages(train, corpus, first_seen), ages(valid, corpus, first_seen)
    retr = torch.log_softmax(torch.tensor([r["scores"] for r in train]), -1)  # [R, 20]
    targets = torch.tensor([r["target_position"] for r in train])  # [R]
    trend_train, trend_valid = torch.tensor([r["trend"] for r in train]), torch.tensor([r["trend"] for r in valid])
    valid_targets = [r["target_position"] for r in valid]
    retrieval = metrics.per_user_ndcg([target_rank(range(20), t) for t in valid_targets], 10)

    def report(name, train_indices, valid_indices, sizes):
        ws = linear_weights(retr, targets, train_indices, sizes, steps=400)
        scores = sum(w[i] for w, i in zip(ws, valid_indices)).tolist()
        ranks, fusion = crossfit_ranks(scores, [r["scores"] for r in valid], valid_targets)
        ci = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg(ranks, 10), retrieval)
        print(f"{name:42s} {ci['ratio']:.3f}x (95 % CI {ci['low']:.3f} - {ci['high']:.3f}), fusion weights {fusion}",
              flush=True)

    print(f"{len(train)} training rows, {len(valid)} validation users; ratios to the retrieval order")
    report("trend bucket alone", [trend_train], [trend_valid], [8])
    for cut in a.edges:
        edges = [float(x) for x in cut.split(",")]
        n = len(edges) + 1
        age_bt, age_bv = torch.tensor(np.digitize(age_train, edges)), torch.tensor(np.digitize(age_valid, edges))
        report(f"trend + age {cut} (add)", [trend_train, age_bt], [trend_valid, age_bv], [8, n])
        report(f"trend x age {cut} (joint)", [trend_train + 8 * age_bt], [trend_valid + 8 * age_bv], [8 * n])


if __name__ == "__main__":
    main()
