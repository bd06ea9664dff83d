"""Research script (issue 13): would the fusion gain from a linear retrieval + trend re-ranker under the LLM?

    python -m compile evaluate-ranking --bundle B --split valid --modes score   # first: the validation rows
    python compile/reference/stack_check.py --bundle B

Today's fusion: LLM readout + the head's trend bias + w * retrieval log-softmax. The stack: the same LLM term
+ w * (retrieval log-softmax + per-trend-bucket weights): `palr.ranking.retrieval_prior` with the weights
`compile merge` fits on the bundle's training examples (`fit_retrieval_term_weights`, llm/sft/train.jsonl: the
held-out SASRec's scores), so w -> infinity is the linear re-ranker without the LLM. On the bundle's validation rows
(reports/eval_ranking_valid_users.jsonl, all users), each with its weight cross-fit on two halves of the users
(`readout_ablation.crossfit_ranks`), ratios to the retrieval order with paired bootstrap 95 % intervals.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from compile.evaluate_ranking import report_names
from compile.merge import fit_retrieval_term_weights
from palr import metrics
from palr.ranking import log_softmax, order_by_scores, retrieval_prior, target_rank
from readout_ablation import crossfit_ranks  # the same folder: scripts run as `python compile/reference/...`


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundle"))
    a = p.parse_args()
    train = [json.loads(line) for line in (a.bundle / "llm" / "sft" / "train.jsonl").read_text().splitlines()]
    # the trend-only term this script studies: the examples' EASE scores left out of the fit
    buckets, _ = fit_retrieval_term_weights([{**x, "collab": None} for x in train], 8)
    head = np.array(json.loads((a.bundle / "llm" / "ranker.json").read_text())["trend_bias"])
    rows = [json.loads(line) for line in (a.bundle / "reports" / report_names("valid")[1]).read_text().splitlines()]
    llm = [list(np.array(r["llm_scores"]) + head[r["trend"]]) for r in rows]
    retrieval = [log_softmax(r["retrieval_scores"]) for r in rows]
    stacked = [retrieval_prior(r["retrieval_scores"], r["trend"], buckets) for r in rows]
    targets = [r["target_position"] for r in rows]
    base = metrics.per_user_ndcg([target_rank(range(20), t) for t in targets], 10)
    linear = metrics.per_user_ndcg([target_rank(order_by_scores(s), t) for s, t in zip(stacked, targets)], 10)
    print(f"{len(train)} training examples: trend-bucket weights {np.round(buckets, 3).tolist()}")
    print(f"{len(rows)} validation users, retrieval NDCG@10 {np.mean(base):.4f}")
    for name, per_user in [("linear retrieval + trend, no LLM", linear),
                           *[(f"{label}, weight cross-fit {weights}", metrics.per_user_ndcg(ranks, 10))
                             for label, (ranks, weights) in (("today's fusion", crossfit_ranks(llm, retrieval, targets)),
                                                             ("stack", crossfit_ranks(llm, stacked, targets)))]]:
        paired = metrics.paired_bootstrap_ratio(per_user, base)
        print(f"{name}: {paired['ratio']:.3f}x retrieval (95 % CI {paired['low']:.3f} - {paired['high']:.3f})")


if __name__ == "__main__":
    main()
