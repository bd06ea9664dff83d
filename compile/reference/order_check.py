"""Research script (issue 13): a built bundle's ranker on ALL validation users, with the candidates in retrieval
order and averaged with the reversed order (does the causal candidate readout depend on where a candidate sits?).

    python compile/reference/order_check.py --bundle bundle --data data/ml-100k

Prints the fused NDCG@10 / retrieval at several fusion weights, forward and averaged."""
import argparse

import numpy as np
import torch

from compile.holdout import top_k
from palr import metrics
from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.corpus import Corpus
from palr.hybrid import ranker_prompt
from palr.llm import compute_prefix, load_causal_lm, read_prompt
from palr.profiles import StatsProfiler
from palr.ranking import fuse, head_bias, load_ranker, order_by_scores, target_rank
from palr.sasrec import SASRec
from palr.trends import TrendSettings, TrendTable


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="bundle")
    p.add_argument("--data", default="data/ml-100k")
    a = p.parse_args()
    torch.set_num_threads(2)
    bundle = Bundle.open(a.bundle)
    catalog, corpus = Catalog.load(bundle.path("catalog")), Corpus.load(a.data)
    ranker = load_ranker(bundle)
    table, settings = TrendTable.load(bundle.path("trends")), TrendSettings(**ranker["trend"])
    users = sorted(corpus.split.train)
    histories = [corpus.split.train[u] for u in users]
    indices, scores = top_k(SASRec.load(bundle.path("sasrec_torch")), [catalog.indices(h) for h in histories],
                            [catalog.indices(h) for h in histories], 20)  # serving's mask: the history only
    model, tokenizer = load_causal_lm(bundle.path("llm_merged"))
    prompt = ranker_prompt(tokenizer, ranker, catalog)
    prefix = compute_prefix(model, prompt.prefix_ids())
    profiler = StatsProfiler(catalog)
    forward, averaged, rows = [], [], []
    for user, history, ii, ss in zip(users, histories, indices, scores):
        items = [catalog.item(int(i)) for i in ii]
        trends = table.buckets(corpus.time_before(user, len(history)), [int(i) for i in ii], settings)
        hist = [catalog.by_id(i) for i in history]
        parts = prompt.retrieval(profiler(hist), hist, items, trends)
        ahead = np.array(read_prompt(model, parts.input_ids, [parts.readout], prefix)[0])
        back = list(range(len(items) - 1, -1, -1))
        rev = prompt.retrieval(profiler(hist), hist, [items[i] for i in back], [trends[i] for i in back])
        behind = np.array(read_prompt(model, rev.input_ids, [rev.readout], prefix)[0])[back]
        target = corpus.split.valid[user]
        rows.append((list(map(float, ss)), head_bias(ranker.get("trend_bias"), trends),
                     next((c for c, item in enumerate(items) if item.id == target), None)))
        forward.append(ahead)
        averaged.append((ahead + behind) / 2)
    base = metrics.ndcg([target_rank(list(range(20)), t) for _, _, t in rows], 10)

    def ndcg(reads, weight):
        return metrics.ndcg([target_rank(order_by_scores(fuse(list(r - np.logaddexp.reduce(r)), s, weight, b)), t)
                             for r, (s, b, t) in zip(reads, rows)], 10)

    print(f"{len(users)} validation users, retrieval NDCG@10 {base:.4f}")
    for weight in (0.0, 0.5, 1.0, 2.0):
        print(f"fusion weight {weight}: forward {ndcg(forward, weight) / base:.4f}, "
              f"averaged with the reversed order {ndcg(averaged, weight) / base:.4f}")


if __name__ == "__main__":
    main()
