"""palr.collab: EASE's closed form against its definition (the constrained least squares, solved column by
column on a small random matrix), the scores a request's candidates get, and the table file."""

from __future__ import annotations

import numpy as np
import pytest

from palr.collab import CollabTable, ease_weights


def constrained_least_squares(matrix: np.ndarray, l2: float) -> np.ndarray:
    """argmin ||X - XB||² + l2 ||B||² with diag(B) = 0, one column at a time: column j regresses X[:, j] on the
    other items' columns (ridge), its own coefficient fixed at 0."""
    n = matrix.shape[1]
    weights = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        x = matrix[:, others]
        weights[others, j] = np.linalg.solve(x.T @ x + l2 * np.eye(n - 1), x.T @ matrix[:, j])
    return weights


def test_ease_closed_form_is_the_constrained_ridge_regression():
    rng = np.random.default_rng(0)
    matrix = (rng.random((40, 7)) < 0.4).astype(float)
    histories = [list(np.flatnonzero(row)) for row in matrix]
    weights = ease_weights(histories, 7, l2=3.0)
    assert weights.dtype == np.float32 and np.all(np.diag(weights) == 0)
    np.testing.assert_allclose(weights, constrained_least_squares(matrix, 3.0), atol=1e-5)


def test_scores_sum_the_history_rows_at_the_candidates_ignoring_repeats_and_unknown_items():
    weights = np.arange(16, dtype=np.float32).reshape(4, 4)
    table = CollabTable(weights)
    # history {1, 2} (2 repeated, 9 outside the table); candidates 0, 3, 0 and 7 (outside: 0)
    assert table.scores([1, 2, 2, 9], [0, 3, 0, 7]) == [4.0 + 8.0, 7.0 + 11.0, 12.0, 0.0]
    assert table.scores([], [0, 1]) == [0.0, 0.0]


def test_items_that_co_occur_score_higher_than_items_that_do_not():
    # users who watched 0 also watched 1; item 2 is watched by others only
    histories = [[0, 1]] * 20 + [[2, 3]] * 20 + [[0, 1, 3]] * 5
    table = CollabTable.fit(histories, 4, l2=1.0)
    scores = table.scores([0], [1, 2])
    assert scores[0] > 0.5 > scores[1]


def test_table_round_trips_through_its_file_and_refuses_bad_input(tmp_path):
    table = CollabTable.fit([[0, 1], [1, 2]], 3, l2=1.0)
    table.save(tmp_path / "collab.npy")
    np.testing.assert_array_equal(CollabTable.load(tmp_path / "collab.npy").weights, table.weights)
    with pytest.raises(ValueError, match="square"):
        CollabTable(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="l2"):
        ease_weights([[0]], 2, l2=0.0)
