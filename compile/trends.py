"""`compile trends`: the interactions' timeline the ranker's trend tokens are counted from → trends.npz.

Every user's train + valid interactions (item index, time) and each stored user's moment (the time of
their last history item); `palr/trends.py` says why and how the ranker uses them. Test items are never in
it. Skipped when the data is unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile.llm_common import config_record
from palr.bundle import Bundle, fingerprint
from palr.corpus import Corpus
from palr.trends import FILE, TrendTable

log = logging.getLogger(__name__)

ARTIFACT = "trends"
VERSION = 1


@dataclass
class TrendsConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs catalog from `sasrec`)"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory the bundle was built from"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})


def run(config: TrendsConfig) -> Path:
    bundle = Bundle.open(config.bundle)
    out = bundle.root / FILE
    # the dataset's checksum too: the split's covers only each user's item order, and the table is built from the
    # timestamps (which can change while the order does not, e.g. milliseconds made seconds)
    step_fp = fingerprint(ARTIFACT, VERSION, bundle.manifest.dataset.get("checksum"),
                          bundle.manifest.dataset.get("split_checksum"), bundle.version("catalog"))
    if not config.force and bundle.step_is_current(ARTIFACT, step_fp, [ARTIFACT]):
        log.info("trends are current (%s); skipping", out)
        return out
    started = time.perf_counter()
    table = TrendTable.from_corpus(Corpus.load_for(bundle, config.data))
    table.save(out)
    bundle.add_artifact(ARTIFACT, FILE, events=len(table), users=len(table.as_of),
                        first=float(table.times[0]) if len(table) else None, latest=table.latest,
                        events_from="train + valid items of every user (never test)")
    bundle.record_step(ARTIFACT, step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("trends: %d interactions of %d users, %s → %s", len(table), len(table.as_of),
             time.strftime("%Y-%m-%d", time.gmtime(table.latest)), out)
    return out
