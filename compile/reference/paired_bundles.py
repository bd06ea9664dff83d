"""Research script: two bundles' `compile evaluate --tier ranking` side by side on the same users.

    python compile/reference/paired_bundles.py BUNDLE_A BUNDLE_B [--mode score] [--split valid]

Reads each bundle's per-user rows (reports/eval_ranking_users.jsonl; with --split valid the rows of
`compile evaluate-ranking --split valid`), keeps the users both evaluated, and prints NDCG@10 of A, of B and
of the retrieval order with paired bootstrap 95 % intervals of A / B and of each over retrieval. On test a
report, not a choice: settings are chosen on validation, never on test users.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from compile.evaluate_ranking import SPLITS, report_names
from palr import metrics
from palr.bundle import Bundle
from paired_check import print_paired  # the same folder: scripts run as `python compile/reference/...`


def ranks_by_user(bundle: Path, key: str, split: str = "test") -> dict[str, int | None]:
    path = Bundle.open(bundle).reports_dir() / report_names(split)[1]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["user"]: r[key] for r in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="bundle of the variant")
    p.add_argument("b", type=Path, help="bundle of the reference")
    p.add_argument("--mode", default="score", choices=("score", "llm", "generate"),
                   help="which ranking to compare: score mode, the LLM alone, generate mode")
    p.add_argument("--split", default="test", choices=SPLITS, help="which evaluation's per-user rows")
    a = p.parse_args()
    key = f"{a.mode}_rank"
    rank_a, rank_b = ranks_by_user(a.a, key, a.split), ranks_by_user(a.b, key, a.split)
    retrieval_a, retrieval_b = (ranks_by_user(a.a, "retrieval_rank", a.split),
                                ranks_by_user(a.b, "retrieval_rank", a.split))
    users = sorted(set(rank_a) & set(rank_b))
    if not users:
        raise SystemExit(f"{a.a} and {a.b} evaluated no user in common")
    differ = [u for u in users if retrieval_a[u] != retrieval_b[u]]
    if differ:
        print(f"note: the retrieval rank of the target differs for {len(differ)} of {len(users)} users "
              f"(different SASRec); ratios use A's retrieval order")
    nd = {name: metrics.per_user_ndcg([ranks[u] for u in users], 10)
          for name, ranks in (("A", rank_a), ("B", rank_b), ("retrieval", retrieval_a))}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{len(users)} users, {a.mode}: NDCG@10 A {mean(nd['A']):.4f}, B {mean(nd['B']):.4f}, "
          f"retrieval {mean(nd['retrieval']):.4f}")
    print_paired(nd["A"], nd["B"], nd["retrieval"])


if __name__ == "__main__":
    main()
