"""Retrieval fixtures: a real bundle (catalog, users, SASRec checkpoint, sasrec.onnx) built from
ML-100k by the real `compile sasrec` step with the `tiny` preset (a few training steps)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(ml100k_dir, tmp_path_factory) -> Path:
    """A bundle directory with catalog, users, sasrec_torch and sasrec_onnx (max_len 20, top_k 100).

    Shared by every test in the session: treat it as read-only (copy it to change it)."""
    from compile.presets import preset_for
    from compile.sasrec import SASRecConfig, run

    bundle = tmp_path_factory.mktemp("tiny-bundle")
    run(SASRecConfig(bundle=bundle, data=ml100k_dir, **preset_for("tiny", "sasrec")))
    return bundle
