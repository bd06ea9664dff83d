"""Co-occurrence scores: EASE's item-item weights, one more view of a user's history beside SASRec's.

SASRec scores a candidate from the *order* of the user's recent items; EASE (Steck, "Embarrassingly Shallow
Autoencoders for Sparse Data", WWW 2019) from which items co-occur in whole histories: a linear item-item model
with a closed form, B = I - P / diag(P), P = (XᵀX + λI)⁻¹ over the binary user-item matrix X, so the
diagonal of B is zero (an item never explains itself). A user's score for item j is the sum of B[i, j] over
the items i of their history. On the 20 candidates SASRec retrieves, EASE's own order ranks about as well as
SASRec's, but the two disagree usefully: a linear re-ranker of the retriever with EASE's score beside the trend
bucket measured ~1.13× the retrieval order's NDCG@10 on all 943 validation users, against ~0.99–1.05× for the
trend bucket alone (compile/reference/cf_scorer.py, docs/results.md). The ranker's retrieval term carries it
(`palr.ranking.retrieval_prior`).

The bundle's table (`compile collab`, `collab.npy`) is fit on every user's train + valid items (test items
never), as SASRec and the trend table see them; a step that scores held-out positions fits its own table
without them (`CollabTable.fit`), so no example is scored by a table that knew its target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from palr.bundle import write_atomically

FILE = "collab.npy"


def ease_weights(histories: Sequence[Sequence[int]], num_indices: int, l2: float) -> np.ndarray:
    """EASE's item-item weights `[N, N]` (float32, zero diagonal) from each user's item indices."""
    if l2 <= 0:
        raise ValueError(f"EASE's l2 weight must be > 0, got {l2}")
    matrix = np.zeros((len(histories), num_indices), dtype=np.float64)  # [users, N]
    for row, items in enumerate(histories):
        matrix[row, list(items)] = 1.0
    gram = matrix.T @ matrix + l2 * np.eye(num_indices)  # [N, N]
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]  # column j divided by P[j, j]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


class CollabTable:
    """EASE weights `[N, N]` over catalog indices; `scores` is what a request's candidates get."""

    def __init__(self, weights: np.ndarray):
        if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
            raise ValueError(f"EASE weights must be square, got shape {weights.shape}")
        self.weights = weights

    @classmethod
    def fit(cls, histories: Sequence[Sequence[int]], num_indices: int, l2: float) -> "CollabTable":
        return cls(ease_weights(histories, num_indices, l2))

    @property
    def num_indices(self) -> int:
        return self.weights.shape[0]

    def scores(self, history: Sequence[int], candidates: Sequence[int]) -> list[float]:
        """Each candidate's EASE score: the sum of its column over the history's distinct items (catalog
        indices; an index outside the table, e.g. an item newer than the bundle, adds nothing and scores 0)."""
        n = self.num_indices
        rows = sorted({i for i in history if 0 <= i < n})
        columns = [c for c in candidates if 0 <= c < n]
        summed = self.weights[np.ix_(rows, columns)].sum(axis=0) if rows else np.zeros(len(columns))  # [C']
        by_column = dict(zip(columns, (float(s) for s in summed)))
        return [by_column.get(c, 0.0) for c in candidates]

    def save(self, path: str | Path) -> None:
        write_atomically(Path(path), lambda f: np.save(f, self.weights))  # to the open file: no .npy added

    @classmethod
    def load(cls, path: str | Path) -> "CollabTable":
        return cls(np.load(path))
