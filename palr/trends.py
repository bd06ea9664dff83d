"""Item trends: how much each item was being watched in the days before a moment, as a few buckets.

SASRec sees the order of a user's items, not when they happened, so it cannot tell an item everybody is
watching this month from one whose audience left a year ago. On MovieLens-100k that time signal is the
strongest one SASRec lacks (a linear ranker over retrieval + the 30-day count measured +4.9 % NDCG@10 on
all validation users; docs/results.md). The ranker's prompt carries it as one token per candidate: the
bucket of the item's interactions in the `window_days` before the request's moment, 0 / 1 / 2-3 / 4-7 /
... / 64+ (`TrendSettings.bucket`).

The moment ("as of") of a request: the time of the user's last known interaction (stored users: the
table's `as_of`; the prompt then describes the world as it was when the user was last active, which is
what the leave-one-out evaluation asks), a time the caller sends, or the table's latest event. Counts
use events strictly before that moment, from the interactions the bundle was built on (train + valid
items of every user; test items never), so no request ever sees its own future.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from palr.bundle import write_atomically

DAY_S = 86400.0
FILE = "trends.npz"


@dataclass(frozen=True)
class TrendSettings:
    """How counts become prompt tokens; stored in `llm/ranker.json` so serving buckets as training did."""

    window_days: float = 30.0
    buckets: int = 8

    def bucket(self, count: int) -> int:
        """0, 1, 2-3, 4-7, ... (powers of two), the last bucket open-ended."""
        return min(self.buckets - 1, int(count).bit_length())

    def to_dict(self) -> dict:
        return asdict(self)


class TrendTable:
    """Interactions by time (`times` sorted `[E]`, `items` catalog indices `[E]`) and each stored user's
    moment (`as_of`: the time of their last history item)."""

    def __init__(self, times: np.ndarray, items: np.ndarray, num_indices: int, as_of: dict[str, float]):
        order = np.argsort(times, kind="stable")
        self.times = np.asarray(times, dtype=np.float64)[order]  # [E]
        self.items = np.asarray(items, dtype=np.int64)[order]  # [E]
        self.num_indices = int(num_indices)
        self.as_of = dict(as_of)

    def __len__(self) -> int:
        return len(self.times)

    @property
    def latest(self) -> float:
        """The newest event's time: the moment of a request that names none and has no stored user."""
        return float(self.times[-1]) if len(self.times) else 0.0

    def moments(self, settings: TrendSettings) -> tuple[float, float]:
        """(first, last): the moments whose window holds any of the table's events, after its first event (counts
        take the events strictly before the moment) up to its last one plus the window. Outside them every item
        counts 0, the lowest bucket: no trend at all."""
        return (float(self.times[0]), float(self.times[-1]) + settings.window_days * DAY_S) if len(self.times) \
            else (0.0, 0.0)

    def counts(self, before: float, days: float) -> np.ndarray:
        """Interactions per catalog index `[N]` in [before - days, before)."""
        lo = np.searchsorted(self.times, before - days * DAY_S, side="left")
        hi = np.searchsorted(self.times, before, side="left")
        return np.bincount(self.items[lo:hi], minlength=self.num_indices)

    def buckets(self, before: float, indices: Sequence[int], settings: TrendSettings) -> list[int]:
        """The trend bucket of each item (catalog indices) as of `before`."""
        counts = self.counts(before, settings.window_days)
        return [settings.bucket(counts[i]) if 0 <= i < self.num_indices else 0 for i in indices]

    # -- the bundle file ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        users = sorted(self.as_of)
        write_atomically(Path(path), lambda f: np.savez(  # to the open file: savez would add .npz to a bare name
            f, times=self.times, items=self.items, num_indices=np.int64(self.num_indices),
            users=np.array(users, dtype=str), as_of=np.array([self.as_of[u] for u in users], dtype=np.float64)))

    @classmethod
    def load(cls, path: str | Path) -> "TrendTable":
        with np.load(path, allow_pickle=False) as data:
            as_of = dict(zip(data["users"].tolist(), data["as_of"].tolist()))
            return cls(data["times"], data["items"], int(data["num_indices"]), as_of)

    @classmethod
    def from_corpus(cls, corpus) -> "TrendTable":
        """Every user's train + valid interactions; a user's moment is their valid item's time (the last
        item of the history the servers hold for them)."""
        times, items, as_of = [], [], {}
        for user, train in corpus.split.train.items():
            known = train + [corpus.split.valid[user]]
            times += corpus.times[user][:len(known)]
            items += corpus.catalog.indices(known)
            as_of[user] = corpus.time_before(user, len(known))
        return cls(np.array(times), np.array(items), corpus.catalog.num_indices, as_of)
