"""`compile evaluate-retrieval` (alias `compile evaluate --tier retrieval`) on the tiny bundle: the report, its numbers, and skipping."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from compile import pipeline
from compile.evaluate_retrieval import EvaluateRetrievalConfig, popularity_ranks, run
from compile.sasrec import target_ranks
from palr.sasrec import SASRec
from palr import metrics
from palr.bundle import Bundle, BundleError

KEYS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10", "pop_hr@10", "pop_ndcg@10")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def test_report_has_every_metric_and_matches_torch(bundle_copy, ml100k_dir, ml100k):
    report = run(EvaluateRetrievalConfig(bundle=bundle_copy, data=ml100k_dir))
    assert json.loads((bundle_copy / "reports" / "eval_retrieval.json").read_text()) == report
    assert report["users"] == 943
    for key in KEYS:
        assert 0.0 <= report[key] <= 1.0, key
    assert report["hr@10"] <= report["hr@20"] and report["ndcg@10"] <= report["ndcg@20"]
    assert report["mrr@10"] <= report["ndcg@10"] <= report["hr@10"]
    assert "leave-one-out" in report["protocol"] and "full ranking" in report["protocol"]

    # the same numbers from the torch checkpoint's full ranking (ranks ≥ top_k are misses in ORT)
    bundle = Bundle.open(bundle_copy)
    catalog = ml100k.catalog
    users = sorted(ml100k.split.test)
    histories = [catalog.indices(ml100k.split.test_history(u)) for u in users]
    targets = [catalog.index(ml100k.split.test[u]) for u in users]
    ranks = target_ranks(SASRec.load(bundle.path("sasrec_torch")), histories, targets)
    assert report["ndcg@10"] == pytest.approx(metrics.ndcg(ranks, 10), abs=1e-9)
    assert report["hr@20"] == pytest.approx(metrics.hit_rate(ranks, 20), abs=1e-9)


def test_popularity_ranks_by_brute_force(ml100k):
    catalog = ml100k.catalog
    order = catalog.popularity_order()
    users = sorted(ml100k.split.test)[:50]
    histories = [catalog.indices(ml100k.split.test_history(u)) for u in users]
    targets = [catalog.index(ml100k.split.test[u]) for u in users]
    for history, target, rank in zip(histories, targets, popularity_ranks(catalog, histories, targets)):
        unseen = [i for i in order if i not in set(history)]
        assert rank == unseen.index(target)
    assert popularity_ranks(catalog, [[order[0], 5]], [5]) == [None]  # a seen target can never be hit
    # cut at the model's list length, as SASRec's ranks are (a model exported with --top-k 10 was judged at 20)
    ranks = popularity_ranks(catalog, histories, targets)
    assert popularity_ranks(catalog, histories, targets, top_k=10) == [r if r < 10 else None for r in ranks]
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        EvaluateRetrievalConfig(batch_size=0)


def test_second_run_skips_and_other_data_is_refused(bundle_copy, ml100k_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = run(EvaluateRetrievalConfig(bundle=bundle_copy, data=ml100k_dir))
    caplog.clear()
    assert run(EvaluateRetrievalConfig(bundle=bundle_copy, data=ml100k_dir)) == first
    assert "evaluate: skipped" in caplog.text

    other = tmp_path / "ml-100k"
    shutil.copytree(ml100k_dir, other)
    inter = other / "ml-100k.inter"
    inter.write_text("".join(inter.read_text().splitlines(keepends=True)[:-1]))  # one interaction fewer
    with pytest.raises(BundleError, match="built from other data"):
        run(EvaluateRetrievalConfig(bundle=bundle_copy, data=other))


def test_pipeline_runs_the_retrieval_steps_in_order(bundle_copy, ml100k_dir, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    retrieval_steps = [s for s in pipeline.STEPS if s.name in ("sasrec", "export-onnx", "evaluate-retrieval")]
    assert [s.name for s in retrieval_steps] == ["sasrec", "export-onnx", "evaluate-retrieval"]
    assert pipeline.STEPS[:3] == retrieval_steps  # the retrieval tier comes first
    monkeypatch.setattr(pipeline, "STEPS", retrieval_steps)
    pipeline.run(pipeline.PipelineConfig(bundle=bundle_copy, data=ml100k_dir, preset="tiny"))
    assert "sasrec: skipped" in caplog.text and "export-onnx: skipped" in caplog.text  # built by tiny_bundle
    assert (bundle_copy / "reports" / "eval_retrieval.json").is_file()
    assert "all: done" in caplog.text


def test_a_bundle_whose_catalog_orders_items_unlike_the_data_is_refused(bundle_copy, ml100k_dir):
    """Offline steps index items through the catalog built from the data, the models and servers through the
    bundle's catalog.json: if the two orders differed, indices would point at other items without an error."""
    from palr.corpus import Corpus

    assert Corpus.load_for(Bundle.open(bundle_copy), ml100k_dir)  # as built: the same order
    path = bundle_copy / "catalog.json"
    catalog = json.loads(path.read_text())
    catalog["items"][1], catalog["items"][2] = catalog["items"][2], catalog["items"][1]
    path.write_text(json.dumps(catalog))
    with pytest.raises(BundleError, match="index 2: \\['3'\\] vs \\['2'\\]"):
        Corpus.load_for(Bundle.open(bundle_copy), ml100k_dir)
