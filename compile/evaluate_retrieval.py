"""`compile evaluate-retrieval` (alias `compile evaluate --tier retrieval`): test-split metrics of the
retrieval tier → reports/eval_retrieval.json.

It runs the exported `sasrec.onnx` through `palr.sasrec_onnx.SasrecOnnx`, the one runner the retrieval
server uses too, so the numbers are the served model's. Protocol: leave-one-out test item per user, history =
train + valid items, full ranking over the whole catalog with the history's items excluded.
A popularity ranking (training counts, same exclusions) is reported next to it as `pop_*`.
The ranking tier is evaluated by `compile.evaluate_ranking` (`compile evaluate-ranking`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from palr import metrics
from palr.bundle import Bundle, fingerprint, write_atomically
from palr.catalog import Catalog
from palr.corpus import Corpus
from palr.sasrec_onnx import Query, SasrecOnnx

log = logging.getLogger(__name__)

STEP = "evaluate-retrieval"
VERSION = 1
REPORT = "eval_retrieval.json"
KS = (10, 20)
PROTOCOL = ("test split of a chronological leave-one-out split (each user's last interaction); "
            "history = train + valid items; full ranking over all catalog items by sasrec.onnx in ONNX Runtime; "
            "items in the history excluded; a target outside the model's top_k counts as a miss; "
            "mean over users")


@dataclass
class EvaluateRetrievalConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle to evaluate"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "the dataset the bundle was built from"})
    batch_size: int = field(default=256, metadata={"help": "users per ONNX Runtime call"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def onnx_ranks(model: SasrecOnnx, histories: list[list[int]], targets: list[int],
               batch_size: int) -> list[int | None]:
    """0-based rank of each target in the model's top-k (None: not in it), seen items excluded."""
    ranks: list[int | None] = []
    for start in range(0, len(histories), batch_size):
        rows = histories[start:start + batch_size]
        ranked = model.retrieve([Query(history=row, exclude=row, k=model.top_k) for row in rows])
        for target, row in zip(targets[start:start + batch_size], ranked):
            hit = np.flatnonzero(row.indices == target)  # masked (excluded) items are already dropped
            ranks.append(int(hit[0]) if hit.size else None)
    return ranks


def popularity_ranks(catalog: Catalog, histories: list[list[int]], targets: list[int],
                     top_k: int | None = None) -> list[int | None]:
    """Rank of each target in the training-popularity order with the user's seen items removed (None past `top_k`,
    the list length the model is judged at, so both are cut alike)."""
    position = np.empty(catalog.num_indices, dtype=np.int64)  # item index → place in popularity order
    position[catalog.popularity_order()] = np.arange(len(catalog))
    ranks: list[int | None] = []
    for history, target in zip(histories, targets):
        seen = set(history)
        if target in seen:
            ranks.append(None)
            continue
        seen_before = int((position[list(seen)] < position[target]).sum()) if seen else 0
        rank = int(position[target]) - seen_before
        ranks.append(rank if top_k is None or rank < top_k else None)
    return ranks


def run(config: EvaluateRetrievalConfig) -> dict:
    bundle = Bundle.open(config.bundle)
    corpus = Corpus.load_for(bundle, config.data)
    model = bundle.artifact("sasrec_onnx")
    report_path = bundle.root / "reports" / REPORT
    step_fp = fingerprint(STEP, VERSION, model["sha256"], bundle.artifact("catalog")["sha256"], corpus.split.checksum())
    if bundle.step_is_current(STEP, step_fp, ["sasrec_onnx", "catalog"]) and report_path.is_file():
        log.info("evaluate: skipped, %s is current for this model and data", report_path)
        return json.loads(report_path.read_text())
    bundle.verify(["sasrec_onnx", "catalog"])
    started = time.perf_counter()
    catalog = Catalog.load(bundle.path("catalog"))
    users = sorted(corpus.split.test)
    histories = [catalog.indices(corpus.split.test_history(u)) for u in users]
    targets = [catalog.index(corpus.split.test[u]) for u in users]
    ranks = onnx_ranks(SasrecOnnx.from_bundle(bundle, threads=0), histories, targets, config.batch_size)
    pop = metrics.summary(popularity_ranks(catalog, histories, targets, int(model["top_k"])), KS, prefix="pop_")
    report = {**metrics.summary(ranks, KS), "users": len(users), "protocol": PROTOCOL, **pop,
              "model": {"artifact": "sasrec_onnx", "version": bundle.version("sasrec_onnx"), "top_k": model["top_k"]},
              "dataset": bundle.manifest.dataset.get("name")}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(report_path, json.dumps(report, indent=2) + "\n")
    seconds = time.perf_counter() - started
    bundle.record_step(STEP, step_fp, seconds, **{k: report[k] for k in ("hr@10", "ndcg@10")})
    bundle.save()
    log.info("evaluate: %d users, ndcg@10 %.4f hr@10 %.4f (popularity: ndcg@10 %.4f hr@10 %.4f) → %s",
             len(users), report["ndcg@10"], report["hr@10"], report["pop_ndcg@10"], report["pop_hr@10"], report_path)
    return report

