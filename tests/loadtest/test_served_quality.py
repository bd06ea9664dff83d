"""The held-out check of the running system (loadtest/served_quality.py): both real servers on loopback
serving the tiny bundle, asked over gRPC for the test users `compile evaluate --tier ranking` ranked
offline; the served answers score exactly what the offline evaluation measured, and none is invalid."""

from __future__ import annotations

import json

import pytest


def test_served_answers_score_what_the_offline_evaluation_measured(tiny_llm_bundle, ml100k_dir, tmp_path):
    from loadtest.served_quality import ServedQualityConfig, run

    offline = json.loads((tiny_llm_bundle / "reports" / "eval_ranking.json").read_text())
    config = ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, users=offline["users"],
                                 seed=offline["seed"], concurrency=2, out=tmp_path)
    report = run(config)
    assert report["users"] == offline["users"]
    assert json.loads((tmp_path / "served_quality.json").read_text())["users"] == report["users"]
    for key in ("retrieval_ndcg@10", "score_ndcg@10", "generate_ndcg@10"):
        assert report[key] == pytest.approx(offline[key], abs=1e-9), key
    for mode in ("score", "generate"):
        assert report[f"{mode}_invalid"] == report[f"{mode}_degraded"] == 0
        low, high = report[f"{mode}_vs_retrieval_ndcg@10_ci95"]
        assert low <= report[f"{mode}_vs_retrieval_ndcg@10"] <= high or report["retrieval_ndcg@10"] == 0
