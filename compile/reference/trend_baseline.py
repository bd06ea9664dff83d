"""The cheap re-ranker an extra signal is measured against (issue 13's research scripts): retrieval log-softmax +
a weight per 30-day trend bucket fit listwise on the held-out training rows, the fusion weight 2-fold cross-fit
on the 943 validation users (readout_ablation's rows). `TrendBaseline.add` scores the same re-ranker with an
extra per-candidate term; `ratio` is a paired bootstrap 95 % interval on the same users."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from palr import metrics
from palr.bundle import Bundle
from palr.ranking import target_rank
from readout_ablation import crossfit_ranks, prepare, rows_cache, trend_weights  # the same folder


def ratio(a: list[float], b: list[float]) -> str:
    ci = metrics.paired_bootstrap_ratio(a, b)
    return f"{ci['ratio']:.3f}x ({ci['low']:.3f} - {ci['high']:.3f})"


@dataclass
class TrendBaseline:
    valid: list[dict]           # validation rows: history, candidates (the served SASRec's top 20), scores, ...
    trend: list[list[float]]    # each candidate's trend-bucket weight [users][20]
    retrieval: list[float]      # per-user NDCG@10 of the retrieval order
    alone: list[float]          # per-user NDCG@10 of the trend re-ranker

    def add(self, extra: list[list[float]], scale: float) -> tuple[list[float], list[float]]:
        """Per-user NDCG@10 of the re-ranker with `scale` × `extra` added, and its cross-fit fusion weights."""
        combined = [[t + scale * x for t, x in zip(tr, ex)] for tr, ex in zip(self.trend, extra)]
        ranks, fusion = crossfit_ranks(combined, [r["scores"] for r in self.valid],
                                       [r["target_position"] for r in self.valid])
        return metrics.per_user_ndcg(ranks, 10), fusion

    def report(self, name: str, extra: list[list[float]], scale: float) -> None:
        ndcg, fusion = self.add(extra, scale)
        print(f"  trend + {scale:g} x {name}: {ratio(ndcg, self.retrieval)} of retrieval, {ratio(ndcg, self.alone)} "
              f"of the trend bucket alone, fusion weights {fusion}", flush=True)


def trend_baseline(bundle_dir: Path, data: Path) -> TrendBaseline:
    """The baseline on the bundle's validation rows (cached beside the bundle), printed."""
    train, valid = prepare(Bundle.open(bundle_dir), data, 20, 30.0, rows_cache(bundle_dir, 30.0))
    weights = trend_weights(train)
    targets = [r["target_position"] for r in valid]
    trend = [[float(weights[b]) for b in r["trend"]] for r in valid]
    retrieval = metrics.per_user_ndcg([target_rank(range(20), t) for t in targets], 10)
    ranks, fusion = crossfit_ranks(trend, [r["scores"] for r in valid], targets)
    alone = metrics.per_user_ndcg(ranks, 10)
    print(f"{len(valid)} validation users; trend bucket alone {ratio(alone, retrieval)} of retrieval, "
          f"fusion weights {fusion}", flush=True)
    return TrendBaseline(valid, trend, retrieval, alone)
