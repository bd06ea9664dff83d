"""Research script (issue 13): does the user's own taste for trending items modulate the trend bucket's weight?

    python compile/reference/user_trend.py --bundle bundle

Per user (readout_ablation's cached rows: held-out training cuts and all validation users), one number in
`--buckets` quantile groups (edges from the training rows), crossed with each candidate's 30-day trend bucket
in the cheap re-ranker (retrieval log-softmax + one weight per (group, trend bucket), fit listwise on the
training rows, fusion weight 2-fold cross-fit on the validation users); paired bootstrap 95 % intervals over
the retrieval order and over the trend bucket alone, on the same users. The numbers:

    at watch    mean trend bucket of the last 20 history items, each as of when the user watched it
    now N       mean trend bucket of the last N history items as of the request's moment (what serving knows)
    gap         days between the user's last two interactions

No LLM is trained: a user-level token or a per-group trend weight is worth adding only if it lifts this
baseline steadily (the same sign for neighbouring settings).
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
from palr.trends import DAY_S
from readout_ablation import bucket, crossfit_ranks, linear_weights, prepare, rows_cache  # the same folder


class ItemTimes:
    """Each item's train + valid interaction times, sorted: its count in a window before any moment."""

    def __init__(self, corpus: Corpus):
        times: dict[str, list[float]] = {}
        for user, train in corpus.split.train.items():
            known = train + [corpus.split.valid[user]]
            for item, t in zip(known, corpus.times[user][:len(known)]):
                times.setdefault(item, []).append(t)
        self.times = {item: np.sort(np.array(v)) for item, v in times.items()}

    def count(self, item: str, before: float, days: float = 30) -> int:
        t = self.times.get(item)
        if t is None:
            return 0
        return int(np.searchsorted(t, before) - np.searchsorted(t, before - days * DAY_S))


def user_numbers(row, corpus: Corpus, items: ItemTimes) -> dict[str, float]:
    """The row's user's numbers (module docstring), as of the row's moment: its last history item's time."""
    history = row["history"]
    times = corpus.times[row["user"]][:len(history)]

    def mean_bucket(pairs) -> float:
        return float(np.mean([bucket(items.count(item, moment)) for item, moment in pairs]))

    return {"at watch": mean_bucket(zip(history[-20:], times[-20:])),
            "now 20": mean_bucket((item, times[-1]) for item in history[-20:]),
            "now 10": mean_bucket((item, times[-1]) for item in history[-10:]),
            "gap": (times[-1] - times[-2]) / DAY_S if len(times) > 1 else 1e9}


def groups_of(numbers_train: np.ndarray, numbers_valid: np.ndarray, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's quantile group ([R, 1], [U, 1]); the edges come from the training rows."""
    edges = np.quantile(numbers_train, np.linspace(0, 1, groups + 1)[1:-1])
    return (torch.tensor(np.digitize(numbers_train, edges))[:, None],
            torch.tensor(np.digitize(numbers_valid, edges))[:, None])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--buckets", type=int, nargs="+", default=[2, 3, 4], help="quantile groups of users")
    args = parser.parse_args()
    train, valid = prepare(Bundle.open(args.bundle), args.data, 20, 30.0, rows_cache(args.bundle, 30.0))
    corpus = Corpus.load(args.data)
    items = ItemTimes(corpus)
    numbers_train = [user_numbers(r, corpus, items) for r in train]
    numbers_valid = [user_numbers(r, corpus, items) for r in valid]
    retrieval_log_probs = torch.log_softmax(torch.tensor([r["scores"] for r in train]), -1)  # [R, 20]
    targets = torch.tensor([r["target_position"] for r in train])  # [R]
    trend_train, trend_valid = torch.tensor([r["trend"] for r in train]), torch.tensor([r["trend"] for r in valid])
    valid_targets = [r["target_position"] for r in valid]
    retrieval = metrics.per_user_ndcg([target_rank(range(20), t) for t in valid_targets], 10)

    def ndcg(train_index, valid_index, size):
        (w,) = linear_weights(retrieval_log_probs, targets, [train_index], [size], steps=400)
        ranks, fusion = crossfit_ranks(w[valid_index].tolist(), [r["scores"] for r in valid], valid_targets)
        return metrics.per_user_ndcg(ranks, 10), fusion

    def ratio(ndcg_a, ndcg_b) -> str:
        ci = metrics.paired_bootstrap_ratio(ndcg_a, ndcg_b)
        return f"{ci['ratio']:.3f}x ({ci['low']:.3f} - {ci['high']:.3f})"

    alone, fusion = ndcg(trend_train, trend_valid, 8)
    print(f"{len(train)} training rows, {len(valid)} validation users")
    print(f"{'trend bucket alone':32s} {ratio(alone, retrieval)} of retrieval, fusion weights {fusion}")
    for name in numbers_train[0]:
        x_train = np.array([n[name] for n in numbers_train])
        x_valid = np.array([n[name] for n in numbers_valid])
        for groups in args.buckets:
            g_train, g_valid = groups_of(x_train, x_valid, groups)
            crossed, fusion = ndcg(trend_train + 8 * g_train, trend_valid + 8 * g_valid, 8 * groups)
            print(f"{f'trend x {name} ({groups} groups)':32s} {ratio(crossed, retrieval)} of retrieval, "
                  f"{ratio(crossed, alone)} of the trend bucket alone, fusion weights {fusion}", flush=True)


if __name__ == "__main__":
    main()
