"""compile evaluate --tier ranking on the tiny bundle (report keys and invariants), and the pieces it
shares with the server: TitleConstraint decoding and score fusion."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest

from palr import metrics
from palr.decoding import LabelConstraint, TitleConstraint, answer_constraint
from palr.ranking import complete_order, fit_fusion_weight, fuse, generation_bias, order_by_scores, target_rank

REQUIRED = ("retrieval_hr@10", "retrieval_ndcg@10", "score_hr@10", "score_ndcg@10", "generate_hr@10",
            "generate_ndcg@10", "generate_invalid_rate", "users", "k")


@pytest.fixture(scope="module")
def report(tiny_llm_bundle):
    return json.loads((tiny_llm_bundle / "reports" / "eval_ranking.json").read_text())


@pytest.fixture(scope="module")
def user_rows(tiny_llm_bundle):
    return [json.loads(x) for x in (tiny_llm_bundle / "reports" / "eval_ranking_users.jsonl").read_text().splitlines()]


def test_report_has_the_contract_keys_and_sane_values(report):
    assert set(REQUIRED) <= set(report)
    assert report["users"] == 6 and report["k"] == 20
    assert report["generate_invalid_rate"] == 0.0
    for key in REQUIRED[:6]:
        assert 0.0 <= report[key] <= report[key.replace("ndcg", "hr")] <= 1.0


def test_report_metrics_follow_from_the_per_user_ranks(report, user_rows, ml100k):
    assert len(user_rows) == report["users"]
    for mode in ("retrieval", "score", "generate"):
        ranks = [row[f"{mode}_rank"] for row in user_rows]
        assert report[f"{mode}_ndcg@10"] == pytest.approx(metrics.ndcg(ranks, 10))
    for row in user_rows:
        emitted = row["emitted"]
        assert len(emitted) == len(set(emitted)) and all(0 <= i < 20 for i in emitted)
        if row["target_position"] is None:  # not retrieved: a miss in every mode
            assert row["score_rank"] is row["generate_rank"] is row["retrieval_rank"] is None
    assert report["retrieval_term_ndcg@10"] == pytest.approx(metrics.ndcg([r["retrieval_term_rank"] for r in user_rows], 10))


def test_the_llm_alone_is_reported_beside_its_two_parts(report, user_rows, tiny_llm_bundle):
    """"The LLM alone" is its readout plus the head's learned per-bucket bias (of the retriever's and EASE's rank):
    the report gives the readout without the bias and the bias without the LLM, so neither is credited to the
    other."""
    from palr.ranking import calibrated, head_bias, load_ranker
    from palr.bundle import Bundle

    ranker = load_ranker(Bundle.open(tiny_llm_bundle))
    for row in user_rows:
        position = row["target_position"]
        bias = head_bias(ranker.get("trend_bias"), row["trend"], ranker.get("rank_bias"), row["ranks"])
        assert row["llm_readout_rank"] == target_rank(order_by_scores(row["llm_scores"]), position)
        assert row["head_bias_rank"] == target_rank(order_by_scores(bias or [0.0] * 20), position)
        assert row["llm_rank"] == target_rank(order_by_scores(calibrated(row["llm_scores"], bias)), position)
    for name in ("llm_readout", "head_bias"):
        assert report[f"{name}_ndcg@10"] == pytest.approx(metrics.ndcg([r[f"{name}_rank"] for r in user_rows], 10))


def test_the_retrieval_term_reads_the_bundles_ease_table_on_test_users(user_rows, tiny_llm_bundle, ml100k):
    """Test users: the EASE scores are the serving table's for the user's train + valid history, weighed as
    ranker.json says; the retrieval term's order is what the report ranks as `retrieval_term`."""
    from palr.bundle import Bundle
    from palr.catalog import Catalog
    from palr.collab import CollabTable
    from palr.ranking import order_by_scores, retrieval_prior, target_rank

    bundle = Bundle.open(tiny_llm_bundle)
    catalog, table = Catalog.load(bundle.path("catalog")), CollabTable.load(bundle.path("collab"))
    ranker = json.loads((tiny_llm_bundle / "llm" / "ranker.json").read_text())
    assert ranker["retrieval_collab_weight"]
    for row in user_rows:
        scores = row["collab"]
        history = catalog.indices(ml100k.split.test_history(row["user"]))
        assert scores == pytest.approx(table.scores(history, catalog.indices(row["candidates"])))
        prior = retrieval_prior(row["retrieval_scores"], row["trend"], ranker["retrieval_trend_weights"], scores,
                                ranker["retrieval_collab_weight"])
        assert row["retrieval_term_rank"] == target_rank(order_by_scores(prior), row["target_position"])


def test_validation_split_evaluates_valid_targets_into_its_own_report(tiny_llm_bundle, ml100k_dir, ml100k, tmp_path,
                                                                     caplog):
    from compile.evaluate_ranking import EvaluateRankingConfig, report_names, run

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, bundle)
    test_report = (bundle / "reports" / "eval_ranking.json").read_text()
    report = run(EvaluateRankingConfig(bundle=bundle, data=ml100k_dir, users=6, split="valid", modes=["score"]))
    assert report_names("valid") == ("eval_ranking_valid.json", "eval_ranking_valid_users.jsonl")
    assert report["split"] == "valid" and report["users"] == 6 and "fusion_fit_users_in_sample" in report
    rows = [json.loads(x) for x in (bundle / "reports" / "eval_ranking_valid_users.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == [ml100k.split.valid[r["user"]] for r in rows]
    assert report["score_ndcg@10"] == pytest.approx(metrics.ndcg([r["score_rank"] for r in rows], 10))
    assert (bundle / "reports" / "eval_ranking.json").read_text() == test_report  # the test report is untouched
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"evaluate-ranking", "evaluate-ranking:valid"} <= set(manifest["steps"])
    config = EvaluateRankingConfig(bundle=bundle, data=ml100k_dir, users=6, split="valid", modes=["score"])
    with caplog.at_level("INFO", logger="compile.evaluate_ranking"):
        run(config)  # current: read back
        assert "skipped" in caplog.text
        caplog.clear()
        run(dataclasses.replace(config, force=True))
        assert "skipped" not in caplog.text


def test_title_constraint_writes_k_whole_candidate_lines():
    labels, lines = [330, 331, 332], [[10, 11, 12], [20], [30, 31]]
    c = TitleConstraint(labels, lines, k=2)
    assert c.max_new_tokens == 2 + 3 + 2
    assert c.allowed_tokens() == [330, 331, 332]
    assert c.token_bias([0.5, 1.0, 2.0]) == [0.5, 1.0, 2.0]
    c.advance(332)
    assert c.allowed_tokens() == [30] and c.token_bias([0.5, 1.0, 2.0]) == [0.0]
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(331)  # inside a title only its next token is allowed
    c.advance(30)
    c.advance(31)
    assert c.allowed_tokens() == [330, 331] and not c.done  # a named candidate is never offered again
    c.advance(330)
    for token in (10, 11, 12):
        assert not c.done
        c.advance(token)
    assert c.done and c.allowed_tokens() == [] and c.emitted() == [2, 0]


def test_answer_constraint_follows_the_ranker_format():
    labels, lines = [330, 389, 340], [[5, 6], [7], [8, 9, 10]]
    titles = answer_constraint("titles", labels, lines, 2)
    assert isinstance(titles, TitleConstraint) and titles.allowed_tokens() == labels
    assert isinstance(answer_constraint("labels", labels, lines, 2), LabelConstraint)
    with pytest.raises(ValueError, match="generate_format 'json'"):
        answer_constraint("json", labels, lines, 2)


def test_title_constraint_under_the_reference_decoder(tiny_llama_dir):
    from palr.llm import generate_constrained, load_causal_lm

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    labels = [tokenizer.encode(f" {c}", add_special_tokens=False)[0] for c in "ABCDE"]
    lines = [tokenizer.encode(f" Movie number {i}\n", add_special_tokens=False) for i in range(5)]
    prompt = tokenizer.encode("Pick movies:", add_special_tokens=False)
    emitted = generate_constrained(model, prompt, TitleConstraint(labels, lines, k=4))
    assert len(emitted) == 4 == len(set(emitted)) and all(0 <= i < 5 for i in emitted)
    # a bias that dwarfs the logits decides the order
    biased = generate_constrained(model, prompt, TitleConstraint(labels, lines, k=4), bias=[1e4, 2e4, 0, 4e4, 3e4])
    assert biased == [3, 4, 1, 0]


def test_fusion_weight_moves_from_llm_order_to_retrieval_order():
    llm = [math.log(p) for p in (0.1, 0.2, 0.7)]
    retrieval = [3.0, 2.0, 1.0]
    assert order_by_scores(fuse(llm, retrieval, 0.0)) == [2, 1, 0]
    assert order_by_scores(fuse(llm, retrieval, 100.0)) == [0, 1, 2]
    assert generation_bias(retrieval, 0.0) is None
    bias = generation_bias(retrieval, 2.0)
    assert fuse(llm, retrieval, 2.0) == pytest.approx([s + b for s, b in zip(llm, bias)])
    assert complete_order([2, 0], 4) == [2, 0, 1, 3]  # no bias: the rest in candidate order
    assert complete_order([2], 4, [0.1, 0.5, 0.9, 0.3]) == [2, 1, 3, 0]  # the rest by the decoding's bias


def test_fit_fusion_weight_prefers_what_ranks_validation_targets_best():
    # the LLM is right for users 0 and 1, retrieval for user 2: a small weight wins
    llm = [[-3.0, -0.1, -3.0], [-3.0, -3.0, -0.1], [-0.1, -3.0, -3.0]]
    retrieval = [[1.0, 0.9, 0.0], [1.0, 0.9, 0.0], [0.0, 1.0, 0.9]]
    targets = [1, 2, 1]
    weight, curve = fit_fusion_weight(llm, retrieval, targets, k=1, grid=(0.0, 1.0, 100.0))
    assert curve[0.0] == pytest.approx(2 / 3) and curve[100.0] == pytest.approx(1 / 3)
    assert weight == 0.0
    weight, _ = fit_fusion_weight(llm, retrieval, [0, 0, 1], k=1, grid=(0.0, 100.0))
    assert weight == 100.0


def test_default_grid_falls_back_to_retrieval_order_when_the_llm_only_hurts():
    import random

    rng = random.Random(0)
    retrieval = [[3.0 - 0.1 * i + rng.uniform(0, 0.05) for i in range(20)] for _ in range(50)]  # gaps >= 0.05
    targets = [rng.choice([0, 0, 1, 2]) for _ in range(50)]  # retrieval's top is mostly right
    llm = [[-5.0 if i == t else -0.5 - 0.01 * i for i in range(20)] for t in targets]  # the LLM never is
    weight, curve = fit_fusion_weight(llm, retrieval, targets)
    retrieval_ndcg = metrics.ndcg([target_rank(range(20), t) for t in targets], 10)
    assert weight == max(curve) and curve[weight] == pytest.approx(retrieval_ndcg)


def test_the_base_model_is_refused_up_front_for_a_ranker_whose_prompts_use_the_fine_tunes_tokens(tiny_llm_bundle):
    """`--llm llm_base` with the pipeline's default (hybrid) ranker failed mid-run with an index error: its soft item,
    trend, rank and score tokens are rows only the merged model has."""
    from compile.evaluate_ranking import check_vocabulary
    from palr.bundle import Bundle
    from palr.ranking import load_ranker

    bundle = Bundle.open(tiny_llm_bundle)
    ranker = load_ranker(bundle)
    assert ranker["item_tokens"], "the tiny preset's ranker should use the extra tokens, as the shipped ones do"
    check_vocabulary(bundle, "llm_merged", ranker)
    with pytest.raises(ValueError, match="--llm llm_base has .* tokens, but this ranker's prompts use tokens from"):
        check_vocabulary(bundle, "llm_base", ranker)
    check_vocabulary(bundle, "llm_base", {**ranker, "item_tokens": None})  # no extra vocabulary at all: fine
    # a text-only ranker still names the extra vocabulary sft-data made (every ranker.json does), but uses none
    text_only = {**ranker, "prompt": {**ranker["prompt"], "prompt": "text", "trend": False, "rank_tokens": [],
                                      "readout": "label"}}
    check_vocabulary(bundle, "llm_base", text_only)
    for uses in ({"trend": True}, {"rank_tokens": ["collab"]}, {"readout": "candidate"}, {"prompt": "ids"}):
        with pytest.raises(ValueError, match="tokens from"):
            check_vocabulary(bundle, "llm_base", {**text_only, "prompt": {**text_only["prompt"], **uses}})
