"""The held-out check of the running system (loadtest/served_quality.py): both real servers on loopback
serving the tiny bundle, asked over gRPC for the test users `compile evaluate --tier ranking` ranked
offline; the served answers score exactly what the offline evaluation measured, and none is invalid."""

from __future__ import annotations

import dataclasses
import json

import pytest


def test_served_answers_score_what_the_offline_evaluation_measured(tiny_llm_bundle, ml100k_dir, tmp_path):
    from loadtest.served_quality import ServedQualityConfig, failed_modes, run
    from loadtest.with_servers import TwoTierConfig, two_tier

    offline = json.loads((tiny_llm_bundle / "reports" / "eval_ranking.json").read_text())
    with two_tier(TwoTierConfig(bundle=tiny_llm_bundle, log_dir=tmp_path, startup_timeout=300)) as (retrieval, ranking):
        # by default the offline evaluation's own sample (its report's users and seed)
        config = ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, concurrency=2, out=tmp_path,
                                     ranking=ranking.target, retrieval=retrieval.target)
        report = run(config)
        # calls the servers refuse (more candidates than they allow) are counted by code; a user whose Retrieve
        # failed has no retrieval order to compare with and is left out of the comparison, and the report is written
        refused = run(dataclasses.replace(config, candidates=100_000, out=tmp_path / "refused"))
    assert refused["users_asked"] == offline["users"] and refused["users"] == 0
    assert "score_vs_retrieval_ndcg@10" not in refused and "retrieval_ndcg@10" not in refused  # nothing to compare
    assert refused["retrieval_errors"] == {"INVALID_ARGUMENT": offline["users"]}
    assert failed_modes(refused, ["score", "generate"]) == ["score", "generate"]  # main exits 1
    assert failed_modes(report, ["score", "generate"]) == []
    assert report["users"] == report["users_asked"] == offline["users"]
    assert report["candidates"] == offline["k"]  # and its candidate count (a fixed 20 failed on a ranker of other K)
    assert json.loads((tmp_path / "served_quality.json").read_text())["users"] == report["users"]
    for key in ("retrieval_ndcg@10", "score_ndcg@10", "generate_ndcg@10"):
        assert report[key] == pytest.approx(offline[key], abs=1e-9), key
    for mode in ("score", "generate"):
        assert report[f"{mode}_invalid"] == report[f"{mode}_degraded"] == 0 and report[f"{mode}_errors"] == {}
        assert report[f"{mode}_p50_n"] == report["users"] and report[f"{mode}_p50_ms"] > 0  # every call answered
        # the same users' paired ratio and interval as offline (neither has one when retrieval's NDCG is 0)
        ratio = f"{mode}_vs_retrieval_ndcg@10"
        assert report[ratio] == (pytest.approx(offline[ratio], abs=1e-4) if ratio in offline else None)
        assert report[f"{ratio}_ci95"] == (pytest.approx(offline[f"{ratio}_ci95"], abs=1e-4) if ratio in offline
                                           else None)


def test_data_the_bundle_was_not_built_from_is_refused_before_any_server_starts(tiny_llm_bundle, ml100k_dir, tmp_path,
                                                                               caplog):
    """Another dataset's test split is another answer key: scored against it the served answers mean nothing."""
    import shutil

    from loadtest.served_quality import main

    other = tmp_path / "ml-100k"
    shutil.copytree(ml100k_dir, other)
    inter = other / "ml-100k.inter"
    inter.write_text("".join(inter.read_text().splitlines(keepends=True)[:-1]))  # one interaction fewer
    code = main(["--bundle", str(tiny_llm_bundle), "--data", str(other), "--out", str(tmp_path / "reports")])
    assert code == 1 and not (tmp_path / "reports").exists()
    assert f"was built from other data than {other}" in caplog.text


def test_a_check_that_reaches_no_server_exits_1_and_half_a_target_is_refused(tiny_llm_bundle, ml100k_dir, tmp_path):
    """Nothing listens on the named ports: every call fails UNAVAILABLE, the report says so and the exit code is 1
    (it was 0). One of --ranking / --retrieval alone would start a pair of servers and measure those: refused."""
    import socket

    from loadtest.served_quality import ServedQualityConfig, main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    common = ["--bundle", str(tiny_llm_bundle), "--data", str(ml100k_dir), "--out", str(tmp_path), "--users", "5"]
    assert main([*common, "--ranking", dead, "--retrieval", dead]) == 1
    report = json.loads((tmp_path / "served_quality.json").read_text())
    assert report["users"] == 0 and report["retrieval_errors"] == {"UNAVAILABLE": 5}
    with pytest.raises(ValueError, match="go together"):
        ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, ranking=dead)
    with pytest.raises(ValueError, match="for running servers"):  # the pair it starts listens in plaintext
        ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, ranking=dead, retrieval=dead,
                            tls_cert=tmp_path / "client.pem")
