"""Research script (stop 33): "the LLM alone" split into its readout and its head's learned bias.

    python compile/reference/llm_bias_split.py --bundle bundle_full

The LLM alone scores each candidate by its readout plus the head's bias, learned per trend bucket and per bucket
of the candidate's SASRec and EASE rank (`palr.ranking.head_bias`): a small re-ranker of its own. This reads what
`compile evaluate --tier ranking` wrote (reports/eval_ranking_users.jsonl) and ranks the same users by the
readout alone, the bias alone and both. No LLM runs. Paired bootstrap 95 % intervals (palr.metrics). Evaluations
made since report the same split themselves (`llm_readout_*`, `head_bias_*`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from palr import metrics
from palr.bundle import Bundle
from palr.ranking import calibrated, head_bias, load_ranker, order_by_scores, target_rank

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    ranker = load_ranker(bundle)
    rows = [json.loads(line) for line in (bundle.reports_dir() / "eval_ranking_users.jsonl").read_text().splitlines()]

    def bias(row: dict) -> list[float]:
        found = head_bias(ranker.get("trend_bias"), row["trend"], ranker.get("rank_bias"), row.get("ranks"))
        return found or [0.0] * len(row["llm_scores"])

    def ranks(scores) -> list[int | None]:
        return [target_rank(order_by_scores(scores(r)), r["target_position"]) for r in rows]

    sides = {"retrieval": [r["retrieval_rank"] for r in rows],
             "LLM alone (readout + head bias)": ranks(lambda r: calibrated(r["llm_scores"], bias(r))),
             "readout alone (no bias)": ranks(lambda r: r["llm_scores"]),
             "head bias alone (no LLM)": ranks(bias),
             "served (fused)": [r["score_rank"] for r in rows]}
    retrieval = metrics.per_user_ndcg(sides["retrieval"], K)
    print(f"{args.bundle}: {len(rows)} users, fusion weight {ranker['fusion_weight']}")
    for name, found in sides.items():
        paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg(found, K), retrieval)
        print(f"  {name:34s} NDCG@{K} {metrics.ndcg(found, K):.4f}  / retrieval {paired['ratio']:.3f} "
              f"({paired['low']:.3f} - {paired['high']:.3f})")
    paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg(sides["LLM alone (readout + head bias)"], K),
                                            metrics.per_user_ndcg(sides["head bias alone (no LLM)"], K))
    print(f"  LLM alone / head bias alone: {paired['ratio']:.3f} ({paired['low']:.3f} - {paired['high']:.3f})")


if __name__ == "__main__":
    main()
