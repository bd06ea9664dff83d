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
    with pytest.raises(ValueError, match="no users"):
        hit_rate([], 10)
    with pytest.raises(ValueError, match="k must be positive"):
        hit_rate([0], 0)


def test_rank_of():
    assert rank_of("b", ["a", "b"]) == 1
    assert rank_of("z", ["a", "b"]) is None


def test_paired_bootstrap_ratio_resamples_users_together_and_counts_draws_without_a_ratio():
    from palr.metrics import paired_bootstrap_ratio

    same = paired_bootstrap_ratio([0.5, 0.1, 1.0, 0.25], [0.5, 0.1, 1.0, 0.25])
    assert (same["ratio"], same["low"], same["high"], same["undefined_draws"]) == (1.0, 1.0, 1.0, 0)
    # one user of 20 holds every hit: a draw without that user has no ratio (about (19/20)^20 = 36 % of draws); the
    # interval is over the others only, and says how many it is without
    few = paired_bootstrap_ratio([0.0] * 19 + [2.0], [0.0] * 19 + [1.0], samples=2000)
    assert few["ratio"] == 2.0 and few["low"] == few["high"] == 2.0
    assert 600 < few["undefined_draws"] < 850
    paired = paired_bootstrap_ratio([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], samples=4000)
    assert paired["ratio"] == 1.0 and paired["low"] < 1.0 < paired["high"]  # pairs resampled together: spread
    with pytest.raises(ValueError, match="paired samples"):
        paired_bootstrap_ratio([1.0], [1.0, 2.0])
