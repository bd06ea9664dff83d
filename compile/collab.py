"""`compile collab`: EASE's item-item weights over every user's train + valid items → collab.npy.

The ranker's retrieval term adds each candidate's EASE score (`palr/collab.py` says what and why) at a weight
`compile merge` fits on the training examples. Test items are never in the table. Skipped when the data and
`--l2` are unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile.llm_common import config_record
from palr.bundle import Bundle, fingerprint
from palr.catalog import Catalog
from palr.collab import FILE, CollabTable
from palr.corpus import Corpus

log = logging.getLogger(__name__)

ARTIFACT = "collab"
VERSION = 1


@dataclass
class CollabConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs catalog from `sasrec`)"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory the bundle was built from"})
    l2: float = field(default=300.0, metadata={
        "help": "EASE's L2 weight λ (validation: 100 and 300 gave the retrieval term 1.13x retrieval, 1000 1.09x)"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})


def train_valid_histories(corpus: Corpus, catalog: Catalog) -> list[list[int]]:
    """Each user's train + valid items as catalog indices: what the bundle's table is fit on."""
    split = corpus.split
    return [catalog.indices(split.train[u] + [split.valid[u]]) for u in sorted(split.train)]


def training_table(bundle: Bundle, corpus: Corpus, catalog: Catalog, held_out_items: int = 0) -> CollabTable:
    """A table at the bundle table's l2 that knows no target it will score: fit on every user's training items
    (no validation item), or with `held_out_items` on those minus each user's held-out ones, as the held-out
    SASRec saw them (`compile.holdout.held_out_split`: no training example's target)."""
    from compile.holdout import held_out_split

    l2 = float(bundle.artifact(ARTIFACT)["l2"])
    if held_out_items:
        histories = held_out_split(corpus, held_out_items).train
    else:
        histories = [catalog.indices(corpus.split.train[u]) for u in sorted(corpus.split.train)]
    return CollabTable.fit(histories, catalog.num_indices, l2)


def run(config: CollabConfig) -> Path:
    bundle = Bundle.open(config.bundle)
    out = bundle.root / FILE
    step_fp = fingerprint(ARTIFACT, VERSION, config.l2, bundle.manifest.dataset.get("split_checksum"),
                          bundle.version("catalog"))
    if not config.force and bundle.step_is_current(ARTIFACT, step_fp, [ARTIFACT]):
        log.info("collab table is current (%s); skipping", out)
        return out
    started = time.perf_counter()
    bundle.verify(["catalog"])  # a catalog changed since it was recorded: named, not a KeyError from inside it
    catalog = Catalog.load(bundle.path("catalog"))
    histories = train_valid_histories(Corpus.load_for(bundle, config.data), catalog)
    table = CollabTable.fit(histories, catalog.num_indices, config.l2)
    table.save(out)
    bundle.add_artifact(ARTIFACT, FILE, method="ease", l2=config.l2, users=len(histories),
                        items=catalog.num_indices, fitted_on="train + valid items of every user (never test)")
    bundle.record_step(ARTIFACT, step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("collab: EASE (l2 %g) over %d users' train + valid items, %d x %d weights in %.1f s → %s", config.l2,
             len(histories), catalog.num_indices, catalog.num_indices, time.perf_counter() - started, out)
    return out
