"""sasrec.onnx in ONNX Runtime against the torch model it was exported from (tiny_bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import palr
from compile.sasrec import left_pad
from palr.sasrec import SASRec, SASRecTopK
from palr.bundle import Bundle
from palr.catalog import Catalog


@pytest.fixture(scope="module")
def exported(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    meta = bundle.artifact("sasrec_onnx")
    session = ort.InferenceSession(str(bundle.path("sasrec_onnx")), providers=["CPUExecutionProvider"])
    wrapper = SASRecTopK(SASRec.load(bundle.path("sasrec_torch")), meta["top_k"]).eval()
    catalog = Catalog.load(bundle.path("catalog"))
    users = json.loads(bundle.path("users").read_text())["users"]
    histories = [catalog.indices(users[u]["history"]) for u in sorted(users)]
    return meta, session, wrapper, histories


def run_both(session, wrapper, history: np.ndarray, exclude: np.ndarray):
    got = session.run(["scores", "indices"], {"history": history, "exclude": exclude})
    with torch.no_grad():
        want = wrapper(torch.from_numpy(history), torch.from_numpy(exclude))
    return got, [t.numpy() for t in want]


def assert_same_top_k(indices, scores, want_indices, want_scores, atol=1e-4):
    """ORT's top-k equals torch's, scores within `atol`; where the two rank different items, each one's score
    ties (within `atol`) with the item torch put there: ORT's and torch's kernels round differently by ~1e-6,
    which can swap neighbours (or the k-th and the next) on another CPU, never a gap wider than that."""
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)
    for row, (got, want) in enumerate(zip(indices, want_indices)):
        torch_score = dict(zip(want.tolist(), want_scores[row].tolist()))
        for position in np.flatnonzero(got != want):
            item = int(got[position])
            assert abs(torch_score.get(item, want_scores[row, -1]) - want_scores[row, position]) <= atol, \
                f"user row {row}: ORT ranks item {item} at {position} where torch has {int(want[position])}"


def test_manifest_records_the_contract(tiny_bundle):
    meta = Bundle.open(tiny_bundle).artifact("sasrec_onnx")
    assert meta["path"] == "sasrec.onnx"
    assert (meta["max_len"], meta["top_k"], meta["num_items"]) == (20, 100, 1682)
    assert meta["opset"] >= 17 and meta["exporter"] in ("dynamo", "torchscript")
    assert meta["inputs"] == ["history", "exclude"] and meta["outputs"] == ["scores", "indices"]


def test_the_graph_names_no_file_of_the_checkout_it_was_exported_from(tiny_bundle):
    graph = Bundle.open(tiny_bundle).path("sasrec_onnx").read_bytes()
    checkout, torch_dir = Path(palr.__file__).resolve().parents[1], Path(torch.__file__).resolve().parent
    assert str(checkout).encode() not in graph and str(torch_dir).encode() not in graph


def test_ort_matches_torch_for_200_users_with_seen_items_masked(exported):
    meta, session, wrapper, histories = exported
    rows = histories[:200]
    history = left_pad(rows, meta["max_len"])  # [200, max_len]
    exclude = left_pad(rows, max(map(len, rows)))  # [200, longest history]: the whole history
    (scores, indices), (want_scores, want_indices) = run_both(session, wrapper, history, exclude)
    assert scores.shape == indices.shape == (200, meta["top_k"])
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert_same_top_k(indices, scores, want_indices, want_scores)
    assert np.isfinite(scores).all()  # every user has more than top_k unseen items
    assert (np.diff(scores, axis=1) <= 0).all()
    for row, seen in zip(indices, rows):
        assert not set(row.tolist()) & (set(seen) | {0})


@pytest.mark.parametrize("batch, n_exclude", [(1, 1), (37, 250), (4, 0)])
def test_dynamic_batch_and_exclude_sizes(exported, batch, n_exclude):
    meta, session, wrapper, histories = exported
    rows = histories[300:300 + batch]
    history = left_pad(rows, meta["max_len"])
    exclude = left_pad([r[:n_exclude] for r in rows], n_exclude)  # [batch, n_exclude] (possibly empty)
    (scores, indices), (want_scores, want_indices) = run_both(session, wrapper, history, exclude)
    assert indices.shape == (batch, meta["top_k"])
    assert_same_top_k(indices, scores, want_indices, want_scores)
    for row, excluded in zip(indices, exclude):
        assert not set(row.tolist()) & (set(excluded.tolist()) | {0})


def test_empty_history_and_excluding_everything(exported):
    meta, session, _, _ = exported
    everything = np.arange(1, meta["num_items"] + 1, dtype=np.int64)[None]  # [1, num_items]
    history = np.zeros((1, meta["max_len"]), dtype=np.int64)
    scores, _ = session.run(["scores", "indices"], {"history": history, "exclude": np.zeros((1, 1), np.int64)})
    assert np.isfinite(scores).all()  # a user with no history still gets scores (no NaN from padding)
    scores, _ = session.run(["scores", "indices"], {"history": history, "exclude": everything})
    assert np.isneginf(scores).all()  # nothing left to recommend: consumers drop non-finite scores


def test_a_failed_export_leaves_the_served_model_as_it_was(tiny_bundle, tmp_path, monkeypatch):
    """The graph is checked beside the served file and only then moved over it: an export whose check fails
    is a StepFailed (one line from `python -m compile`), and sasrec.onnx still matches the manifest."""
    import shutil

    from compile import export_onnx
    from compile.steps import StepFailed

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    served = (bundle_dir / "sasrec.onnx").read_bytes()

    def disagree(path, wrapper, tolerance=1e-4):
        assert path.name == "sasrec.onnx.partial"  # checked before it replaces the served one
        raise RuntimeError("ONNX Runtime disagrees with torch (on cue)")

    monkeypatch.setattr(export_onnx, "check_against_torch", disagree)
    with pytest.raises(StepFailed, match="on cue"):
        export_onnx.run(export_onnx.ExportConfig(bundle=bundle_dir, top_k=50, exporter="torchscript"))
    assert (bundle_dir / "sasrec.onnx").read_bytes() == served
    assert sorted(p.name for p in bundle_dir.glob("sasrec.onnx*")) == ["sasrec.onnx"]
    Bundle.open(bundle_dir).verify(["sasrec_onnx"])
