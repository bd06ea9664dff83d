"""palr.ranking's retrieval term: retrieval log-softmax + a per-trend-bucket weight, and the listwise fit of
those weights (synthetic lists where a bucket carries signal; a hand computation of the term)."""

from __future__ import annotations

import math
import random

import pytest

from palr.ranking import fit_bucket_weights, fit_prior_weights, fuse, log_softmax, order_by_scores, retrieval_prior


def test_retrieval_prior_adds_each_candidates_bucket_weight_to_the_log_softmax():
    scores, trends, weights = [2.0, 1.0, 0.0], [0, 2, 1], [0.0, 0.5, 3.0]
    norm = math.log(math.exp(2.0) + math.exp(1.0) + 1.0)
    assert retrieval_prior(scores, trends, weights) == pytest.approx([2.0 - norm, 1.0 - norm + 3.0, 0.0 - norm + 0.5])
    assert retrieval_prior(scores, trends, None) == scores and retrieval_prior(scores, None, weights) == scores
    with pytest.raises(ValueError, match="2 trend buckets for 3 candidates"):
        retrieval_prior(scores, [0, 1], weights)
    # fused with an LLM at weight w: w x (log-softmax + weights); the order moves to the trending candidate
    fused = fuse([0.0, 0.0, 0.0], retrieval_prior(scores, trends, weights), 1.0)
    assert order_by_scores(fused) == [1, 0, 2]
    assert order_by_scores(fuse([0.0] * 3, scores, 1.0)) == [0, 1, 2]
    assert log_softmax(retrieval_prior(scores, trends, weights)) == pytest.approx(
        log_softmax([s + w for s, w in zip(log_softmax(scores), [0.0, 3.0, 0.5])]))


def test_bucket_weights_learn_which_bucket_holds_the_target():
    rng = random.Random(0)
    scores, trends, targets = [], [], []
    for _ in range(400):  # retrieval scores say nothing; the target is always the one candidate in bucket 3
        trend = [rng.choice([0, 1, 2]) for _ in range(10)]
        target = rng.randrange(10)
        trend[target] = 3
        scores.append([rng.gauss(0, 1) for _ in range(10)])
        trends.append(trend)
        targets.append(target)
    weights = fit_bucket_weights(scores, trends, targets, buckets=4)
    assert len(weights) == 4 and weights[3] > max(weights[:3]) + 2
    hits = sum(order_by_scores(retrieval_prior(s, t, weights))[0] == y for s, t, y in zip(scores, trends, targets))
    assert hits == len(targets)


def test_retrieval_prior_adds_the_weighted_ease_score_with_or_without_trend_buckets():
    scores, trends, weights, collab = [2.0, 1.0, 0.0], [0, 2, 1], [0.0, 0.5, 3.0], [0.1, 0.0, 0.4]
    norm = math.log(math.exp(2.0) + math.exp(1.0) + 1.0)
    assert retrieval_prior(scores, trends, weights, collab, 10.0) == pytest.approx(
        [2.0 - norm + 1.0, 1.0 - norm + 3.0, 0.0 - norm + 0.5 + 4.0])
    assert retrieval_prior(scores, None, None, collab, 10.0) == pytest.approx([2.0 - norm + 1.0, 1.0 - norm, -norm + 4.0])
    assert retrieval_prior(scores, trends, weights, collab, None) == retrieval_prior(scores, trends, weights)
    assert retrieval_prior(scores, None, None, None, 10.0) == scores
    with pytest.raises(ValueError, match="2 collab scores for 3 candidates"):
        retrieval_prior(scores, trends, weights, [0.1, 0.2], 10.0)


def test_prior_weights_learn_the_ease_scores_weight_beside_the_buckets():
    rng = random.Random(1)
    scores, trends, collab, targets = [], [], [], []
    for _ in range(400):  # trend buckets say nothing; the target has the largest EASE score, by 0.3
        values = [rng.uniform(0.0, 0.5) for _ in range(10)]
        target = rng.randrange(10)
        values[target] = max(values) + 0.3
        scores.append([rng.gauss(0, 0.2) for _ in range(10)])
        trends.append([rng.choice([0, 1]) for _ in range(10)])
        collab.append(values)
        targets.append(target)
    weights, collab_weight = fit_prior_weights(scores, trends, targets, 2, collab)
    assert collab_weight > 5 and max(abs(w) for w in weights) < 1
    hits = sum(order_by_scores(retrieval_prior(s, t, weights, c, collab_weight))[0] == y
               for s, t, c, y in zip(scores, trends, collab, targets))
    assert hits == len(targets)
    assert fit_prior_weights(scores, trends, targets, 2)[1] is None  # no scores: no weight


def test_rank_buckets_are_each_candidates_rank_bucketed_tied_candidates_sharing_the_best_rank():
    from palr.ranking import rank_buckets

    scores = [0.5, 3.0, 0.5, 2.0] + [-1.0 - i for i in range(16)]  # ranks 2, 0, 2 (tied), 1, then 4..19
    assert rank_buckets(scores) == [2, 0, 2, 1] + [3] * 4 + [4] * 8 + [5] * 4
    assert rank_buckets([0.0] * 6) == [0] * 6 and rank_buckets([1.0, 0.0, 0.0, 0.0]) == [0, 1, 1, 1]
    tied = [0.0, 0.0, 0.0, 0.0, 1.0, 2.0] + [-1.0 - i for i in range(14)]  # the tied four rank 2..5 together
    assert rank_buckets(tied)[:4] == [2] * 4
    for seed, case in enumerate((scores, tied)):
        shuffled = list(range(20))
        random.Random(seed).shuffle(shuffled)
        assert [rank_buckets(case)[i] for i in shuffled] == rank_buckets([case[i] for i in shuffled]), \
            "a candidate's bucket does not depend on the order the candidates come in, ties included"


def test_candidate_ranks_one_bucket_per_ranking_in_the_prompts_order():
    from palr.ranking import candidate_ranks

    retrieval, collab = [3.0, 2.0, 1.0], [0.0, 5.0, 1.0]
    assert candidate_ranks(["collab", "retrieval"], retrieval, collab) == [[2, 0], [0, 1], [1, 2]]
    assert candidate_ranks(["retrieval"], retrieval, None) == [[0], [1], [2]]
    assert candidate_ranks([], retrieval, collab) is None
    with pytest.raises(ValueError, match="collab scores"):
        candidate_ranks(["collab"], retrieval, None)
    with pytest.raises(ValueError, match="unknown ranking"):
        candidate_ranks(["popularity"], retrieval, collab)


def test_head_bias_sums_the_trend_buckets_and_each_rankings_bucket_bias():
    from palr.ranking import RANK_BUCKETS, head_bias

    trend_bias = [0.0, 1.0, 2.0]
    rank_bias = [0.1 * b for b in range(RANK_BUCKETS)] + [-1.0 * b for b in range(RANK_BUCKETS)]
    trends, ranks = [2, 0], [[3, 1], [0, 5]]
    assert head_bias(trend_bias, trends, rank_bias, ranks) == pytest.approx([2.0 + 0.3 - 1.0, 0.0 + 0.0 - 5.0])
    assert head_bias(None, trends, rank_bias, ranks) == pytest.approx([0.3 - 1.0, -5.0])
    assert head_bias(trend_bias, trends) == [2.0, 0.0]
    assert head_bias(None, None, None, None) is None


def test_non_finite_readouts_fail_the_request():
    from palr.errors import EngineError
    from palr.ranking import decoding_bias, finite_readout

    assert finite_readout([1, -2.5]) == [1.0, -2.5]
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(EngineError, match=r"not finite for candidates \[1\]"):
            finite_readout([0.0, bad, 1.0])
        with pytest.raises(EngineError):
            decoding_bias([0.0, 0.0], [0.5, bad])


def test_prior_weights_are_the_same_whatever_the_thread_count():
    """ranker.json's version hashes these weights: an indexed gather's backward summed in a thread-dependent
    order, and the fit differed run to run in the 6th decimal (with 2 threads, on the quick bundle's rows)."""
    import torch

    rng = random.Random(2)
    n, k, buckets = 4000, 20, 8
    scores = [[rng.gauss(0, 1) for _ in range(k)] for _ in range(n)]
    trends = [[rng.randrange(buckets) for _ in range(k)] for _ in range(n)]
    collab = [[rng.uniform(0, 0.5) for _ in range(k)] for _ in range(n)]
    targets = [min(range(k), key=lambda i: (t[i] != 3, -c[i])) for t, c in zip(trends, collab)]
    before = torch.get_num_threads()
    try:
        fits = []
        for threads in (1, 2, 2, 2):
            torch.set_num_threads(threads)
            fits.append(fit_prior_weights(scores, trends, targets, buckets, collab, steps=100))
    finally:
        torch.set_num_threads(before)
    assert fits[1:] == fits[:1] * 3
