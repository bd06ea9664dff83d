import math

import pytest

from palr.metrics import hit_rate, mrr, ndcg, rank_of, summary


def test_metrics_against_hand_computed_values():
    ranks = [0, 2, 9, 10, None]  # hits at 0, 2, 9 for k=10
    assert hit_rate(ranks, 10) == pytest.approx(3 / 5)
    assert ndcg(ranks, 10) == pytest.approx((1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(11)) / 5)
    assert mrr(ranks, 10) == pytest.approx((1 + 1 / 3 + 1 / 10) / 5)
    assert hit_rate(ranks, 1) == pytest.approx(1 / 5)
    assert ndcg([0], 1) == 1.0 and ndcg([1], 1) == 0.0


def test_summary_keys_and_errors():
    s = summary([0, None], ks=(10, 20))
    assert set(s) == {"hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10"}
    assert s["hr@20"] == 0.5
    with pytest.raises(ValueError):
        hit_rate([], 10)
    with pytest.raises(ValueError):
        hit_rate([0], 0)


def test_rank_of():
    assert rank_of("b", ["a", "b"]) == 1
    assert rank_of("z", ["a", "b"]) is None
