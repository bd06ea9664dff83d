"""`compile sasrec` / `export-onnx` as steps: the bundle they write, and skipping when unchanged."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from compile.presets import preset_for
from compile.sasrec import SASRecConfig, run
from palr.bundle import Bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def tiny_config(bundle, data, **changes) -> SASRecConfig:
    return SASRecConfig(bundle=bundle, data=data, **{**preset_for("tiny", "sasrec"), **changes})


def test_bundle_holds_catalog_users_and_models(tiny_bundle, ml100k):
    bundle = Bundle.open(tiny_bundle)
    bundle.verify(["catalog", "users", "sasrec_torch", "sasrec_onnx"])
    assert bundle.manifest.dataset == ml100k.dataset_info()
    users = json.loads(bundle.path("users").read_text())["users"]
    assert len(users) == 943
    for user in ("1", "500", "943"):  # train + valid: everything but the held-out test item
        assert users[user]["history"] == ml100k.split.train[user] + [ml100k.split.valid[user]]
    assert bundle.path("sasrec_torch").name == "sasrec.pt"
    assert bundle.manifest.steps["sasrec"]["valid"]["ndcg@10"] > 0


def test_unchanged_steps_skip_and_changed_options_rerun(bundle_copy, ml100k_dir, caplog):
    caplog.set_level(logging.INFO)
    before = Bundle.open(bundle_copy).manifest
    run(tiny_config(bundle_copy, ml100k_dir))
    after = Bundle.open(bundle_copy).manifest
    assert "sasrec: skipped" in caplog.text and "export-onnx: skipped" in caplog.text
    assert after.artifacts == before.artifacts and after.steps == before.steps

    caplog.clear()  # an export option: the model is kept, the graph re-exported
    run(tiny_config(bundle_copy, ml100k_dir, top_k=30))
    changed = Bundle.open(bundle_copy)
    assert "sasrec: skipped" in caplog.text and "export-onnx: wrote" in caplog.text
    assert changed.artifact("sasrec_torch") == before.artifacts["sasrec_torch"]
    assert changed.artifact("sasrec_onnx")["top_k"] == 30

    caplog.clear()  # a training option: retrained
    run(tiny_config(bundle_copy, ml100k_dir, top_k=30, max_steps=2))
    assert "sasrec: skipped" not in caplog.text and "sasrec: trained" in caplog.text
    retrained = Bundle.open(bundle_copy)
    assert retrained.artifact("sasrec_torch")["sha256"] != before.artifacts["sasrec_torch"]["sha256"]
    assert retrained.manifest.steps["export-onnx"]["fingerprint"] != changed.manifest.steps["export-onnx"]["fingerprint"]


@pytest.mark.parametrize("option", ["epochs", "batch_size", "eval_every"])
def test_a_zero_count_is_refused_before_training(option, tmp_path):
    """--eval-every 0 divided by zero after the first epoch, --epochs 0 failed with a KeyError, --batch-size 0 with a
    ZeroDivisionError: tracebacks, not what was wrong."""
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} must be >= 1"):
        SASRecConfig(bundle=tmp_path, **{option: 0})

