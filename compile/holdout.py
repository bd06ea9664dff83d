"""The held-out SASRec that the ranker's training examples come from (`sft-data --negatives holdout`).

Why: the bundle's SASRec was trained on every training item, so on a training prefix it already knows
what comes next; its candidates and scores there are far easier (and its scores far more confident) than
at test time, and a ranker trained on them learns to trust the retriever more than it should. So a second
SASRec, same architecture and options, is trained on each user's training items minus the last
`items`; on those held-out positions it ranks as the served SASRec ranks at test time (stacking with
out-of-fold predictions). Its item embeddings are also the frozen table the hybrid prompts' projector
reads (palr/hybrid.py), so training and serving see the same soft tokens.

Writes models/sasrec_holdout.pt (artifact `sasrec_holdout`); skipped when data and options are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from compile.sasrec import VERSION as SASREC_VERSION
from compile.sasrec import TRAINING_OPTIONS, EncodedSplit, SASRecConfig, left_pad, train
from palr.sasrec import SASRec, SASRecArch, mask_items
from palr.bundle import Bundle, fingerprint
from palr.corpus import Corpus

log = logging.getLogger(__name__)

ARTIFACT = "sasrec_holdout"
FILE = "models/sasrec_holdout.pt"
VERSION = 1


def training_config(bundle: Bundle, epochs: int, threads: int) -> SASRecConfig:
    """The bundle SASRec's architecture and training options (batch size, learning rate, ...: both from its
    manifest record, which `compile sasrec` completes for a bundle made before options were recorded);
    `epochs` 0 = its best epoch."""
    meta = bundle.artifact("sasrec_torch")
    arch = {f.name: meta[f.name] for f in dataclasses.fields(SASRecArch) if f.name != "num_indices"}
    options = {name: value for name, value in meta.get("training", {}).items() if name in TRAINING_OPTIONS}
    epochs = epochs or max(5, int(meta.get("best_epoch") or 20))
    return SASRecConfig(epochs=epochs, patience=max(3, epochs // 4), threads=threads, **arch, **options)


MIN_HISTORY = 2  # training items every user keeps before its first held-out one


def held_out_count(train_items: int, items: int) -> int:
    """How many of a user's `train_items` training items are held out: the last `items`, or all but
    MIN_HISTORY for a user with fewer (ML-100k users have 18 to 735 training items)."""
    return max(0, min(items, train_items - MIN_HISTORY))


def held_out_split(corpus: Corpus, items: int) -> EncodedSplit:
    """Each user's training items minus its held-out ones (`held_out_count`); validation target: the first
    held-out item. Users with no item to hold out are left out."""
    catalog, split = corpus.catalog, corpus.split
    counts = {u: held_out_count(len(split.train[u]), items) for u in sorted(split.train)}
    users = [u for u, n in counts.items() if n > 0]
    if not users:
        raise ValueError(f"--holdout-items {items}: no user has more than {MIN_HISTORY} training items")
    return EncodedSplit(users, [catalog.indices(split.train[u][:-counts[u]]) for u in users],
                        [catalog.index(split.train[u][-counts[u]]) for u in users])


def train_holdout(bundle: Bundle, corpus: Corpus, items: int, epochs: int = 0, threads: int = 0) -> SASRec:
    config = training_config(bundle, epochs, threads)
    step_fp = fingerprint(ARTIFACT, VERSION, SASREC_VERSION, items, dataclasses.asdict(config) | {"threads": None},
                          corpus.split.checksum(), bundle.version("catalog"))  # SASREC_VERSION: the training code's
    if bundle.step_is_current(ARTIFACT, step_fp, [ARTIFACT]):
        log.info("held-out SASRec is current (%s)", FILE)
        return SASRec.load(bundle.path(ARTIFACT))
    started = time.perf_counter()
    model, best = train(config, held_out_split(corpus, items), corpus.catalog.num_indices)
    (bundle.root / FILE).parent.mkdir(parents=True, exist_ok=True)
    model.save(bundle.root / FILE, best_epoch=best["epoch"], valid=best["valid"])
    bundle.add_artifact(ARTIFACT, FILE, **dataclasses.asdict(model.arch), held_out_items=items,
                        best_epoch=best["epoch"], valid=best["valid"])
    bundle.record_step(ARTIFACT, step_fp, time.perf_counter() - started, best_epoch=best["epoch"])
    bundle.save()
    log.info("held-out SASRec (last %d training items of each user held out): best epoch %d, NDCG@10 %.4f on the "
             "first held-out item, %.0f s", items, best["epoch"], best["valid"]["ndcg@10"], time.perf_counter() - started)
    return model


@torch.no_grad()
def top_k(model: SASRec, histories: list[list[int]], excludes: list[list[int]], k: int,
          batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(item indices, scores) `[n, k]` of the best items after each history, excluded items masked."""
    model.eval()
    indices, scores = [], []
    for start in range(0, len(histories), batch):
        rows = histories[start:start + batch]
        exclude = excludes[start:start + batch]
        history = torch.from_numpy(left_pad(rows, model.arch.max_len))  # [B, T]
        masked = torch.from_numpy(left_pad(exclude, max(1, max(map(len, exclude)))))  # [B, E]
        top = torch.topk(mask_items(model.next_item_scores(history), masked), k, dim=1)
        indices.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(indices), np.concatenate(scores)
