"""A dataset directory read once: sequences, the leave-one-out split and the catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from palr.bundle import Bundle, BundleError
from palr.catalog import Catalog
from palr.data import AtomicFileError, DatasetFiles, Split, leave_one_out, read_interactions, user_sequences, user_times

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    files: DatasetFiles
    sequences: dict[str, list[str]]  # user → all items, chronological
    split: Split
    catalog: Catalog
    num_interactions: int
    times: dict[str, list[float]]  # user → timestamps, aligned with `sequences`

    @classmethod
    def load(cls, data_dir: str | Path, min_length: int = 3) -> "Corpus":
        files = DatasetFiles.locate(data_dir)
        interactions = read_interactions(files.inter)
        sequences = user_sequences(interactions)
        split = leave_one_out(sequences, min_length=min_length)
        if not split.train:  # every step after this divides by or indexes the users (sasrec's loss: ZeroDivision)
            raise AtomicFileError(f"{files.inter}: no user has the {min_length} interactions a leave-one-out split "
                                  f"needs ({len(split.too_short)} users, all shorter): nothing to train or evaluate on")
        catalog = Catalog.build(files, split.train, sequences)
        log.info("%s: %d users (%d too short to split), %d items, %d interactions",
                 files.name, len(split.train), len(split.too_short), len(catalog), len(interactions))
        return cls(files, sequences, split, catalog, len(interactions), user_times(interactions))

    @classmethod
    def load_for(cls, bundle: Bundle, data_dir: str | Path) -> "Corpus":
        """The dataset, checked to be the one `bundle` was built from: its splits are the bundle's answer key,
        and its catalog indexes items as the bundle's catalog.json (what the models and servers use) does."""
        corpus = cls.load(data_dir)
        built_from = bundle.manifest.dataset.get("checksum")
        if not built_from:
            log.warning("%s records no dataset checksum: cannot check that %s is the data it was built from",
                        bundle.root, data_dir)
        elif built_from != corpus.files.checksum():
            raise BundleError(f"{bundle.root} was built from other data than {data_dir} "
                              f"(dataset checksum {str(built_from)[:12]} != {corpus.files.checksum()[:12]})")
        if "catalog" in bundle.manifest.artifacts:
            stored = [item.id for item in Catalog.load(bundle.path("catalog")).items]
            built = [item.id for item in corpus.catalog.items]
            if stored != built:
                first = next(i for i, (a, b) in enumerate(zip(stored + [None], built + [None])) if a != b)
                raise BundleError(f"{bundle.root}: catalog.json orders items unlike the catalog built from {data_dir} "
                                  f"(index {first + 1}: {stored[first:first + 1]} vs {built[first:first + 1]}), so "
                                  f"item indices would point at other items; build a new bundle from this data "
                                  f"(`python -m compile all --bundle NEW_DIR --data {data_dir}`)")
        return corpus

    def time_before(self, user: str, position: int) -> float:
        """When the user's item at `position` - 1 happened: the moment a history of `position` items ends."""
        if position <= 0:
            raise ValueError(f"a history of {position} items has no last interaction")
        return self.times[user][position - 1]

    def dataset_info(self) -> dict:
        """What the manifest records about the data a bundle was built from."""
        return {
            "name": self.files.name,
            "checksum": self.files.checksum(),
            "split": "leave-one-out (last → test, second-to-last → valid), chronological, stable ties",
            "split_checksum": self.split.checksum(),
            "users": len(self.split.train),
            "items": len(self.catalog),
            "interactions": self.num_interactions,
        }
