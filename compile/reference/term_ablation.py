"""Research script (issue 13): the ranking tier's terms, one at a time, on the same test users.

    python compile/reference/term_ablation.py --bundle bundle

Reads what `compile evaluate --tier ranking` wrote (reports/eval_ranking_users.jsonl: each user's retrieval
scores, trend buckets, EASE scores, the LLM's readouts and the served ranks) and the bundle's training examples
(llm/sft/train.jsonl), refits the retrieval term's weights with a feature left out exactly as `compile merge`
fits them (`palr.ranking.fit_prior_weights` on the training examples), and ranks the same users by each
variant. No LLM runs; the LLM rows are the evaluation's own. Paired bootstrap 95 % intervals against the
retrieval order.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from compile.sft_data import read_jsonl
from palr import metrics
from palr.ranking import fit_prior_weights, order_by_scores, retrieval_prior, target_rank


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundle"))
    args = parser.parse_args()
    users = read_jsonl(args.bundle / "reports" / "eval_ranking_users.jsonl")
    train = [x for x in read_jsonl(args.bundle / "llm" / "sft" / "train.jsonl")
             if x.get("retrieval_scores") and x.get("target_position") is not None]
    ranker = json.loads((args.bundle / "llm" / "ranker.json").read_text())
    buckets = int(ranker["trend"]["buckets"])
    scores, trends, targets = ([x[k] for x in train] for k in ("retrieval_scores", "trend", "target_position"))
    collab = [x["collab"] for x in train]
    trend_only, _ = fit_prior_weights(scores, trends, targets, buckets)
    _, collab_only = fit_prior_weights(scores, None, targets, buckets, collab)
    both, both_collab = fit_prior_weights(scores, trends, targets, buckets, collab)
    retrieval = metrics.per_user_ndcg([u["retrieval_rank"] for u in users], 10)

    def row(name: str, ranks: list) -> None:
        ndcg = metrics.per_user_ndcg(ranks, 10)
        ci = metrics.paired_bootstrap_ratio(ndcg, retrieval)
        print(f"| {name} | {sum(ndcg) / len(ndcg):.4f} | {ci['ratio']:.3f}x ({ci['low']:.3f} - {ci['high']:.3f}) |")

    def term(trend_weights, collab_weight) -> list:
        return [target_rank(order_by_scores(retrieval_prior(u["retrieval_scores"], u["trend"], trend_weights,
                                                            u["collab"], collab_weight)), u["target_position"])
                for u in users]

    print(f"{len(users)} test users; EASE weight {collab_only:.3f} alone, {both_collab:.3f} beside the trend weights "
          f"(ranker.json: {ranker.get('retrieval_collab_weight')})\n")
    print("| ranking | NDCG@10 | / retrieval (95 % CI) |\n|---|---|---|")
    row("retrieval order (SASRec)", [u["retrieval_rank"] for u in users])
    row("retrieval + trend weights (the term before EASE)", term(trend_only, None))
    row("retrieval + EASE", term(None, collab_only))
    row("retrieval + trend + EASE (the shipped term, no LLM)", term(both, both_collab))
    row("the LLM alone (its readout + head bias; its prompt shows EASE and SASRec ranks)", [u["llm_rank"] for u in users])
    row(f"score mode: the LLM fused with the shipped term (weight {ranker['fusion_weight']:g})",
        [u["score_rank"] for u in users])
    if all("generate_rank" in u for u in users):
        row("generate mode", [u["generate_rank"] for u in users])


if __name__ == "__main__":
    main()
