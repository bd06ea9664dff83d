"""The real SmolLM2-135M-Instruct end to end on a handful of users and steps: GGUF → checked HF
checkpoint → profiles → SFT data → LoRA → merge → evaluate (score + generate). Minutes, so marked
slow; run with `pytest -m slow`."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_ranking_pipeline_end_to_end(tiny_bundle, ml100k_dir, smollm2_gguf, tmp_path):
    from compile import pipeline
    from compile.base_model import BaseModelConfig
    from compile.base_model import run as base_model
    from compile.evaluate_ranking import EvaluateRankingConfig
    from compile.evaluate_ranking import run as evaluate_ranking
    from compile.finetune import FinetuneConfig
    from compile.finetune import run as finetune
    from compile.merge import MergeConfig
    from compile.merge import run as merge
    from compile.profiles import ProfilesConfig
    from compile.profiles import run as profiles
    from compile.sft_data import SftDataConfig
    from compile.sft_data import run as sft_data

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    base_model(BaseModelConfig(bundle=bundle, gguf=smollm2_gguf))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["artifacts"]["llm_base"]["logits_max_abs_diff"] == 0.0  # saved == GGUF-loaded
    profiles(ProfilesConfig(bundle=bundle))
    for step in pipeline.STEPS:  # what sft-data's defaults read beside the tiny bundle: trend and EASE tables
        if step.name in ("trends", "collab"):
            module = importlib.import_module(step.module)
            module.run(pipeline.step_config(pipeline.PipelineConfig(bundle=bundle, data=ml100k_dir, preset="tiny"),
                                            step, module))
    sft_data(SftDataConfig(bundle=bundle, data=ml100k_dir, users=8, valid_users=4, retrieval_per_user=1))
    finetune(FinetuneConfig(bundle=bundle, max_steps=2, batch_size=2, save_every=0))
    merge(MergeConfig(bundle=bundle, fusion_users=4, tolerance=1e-3))
    report = evaluate_ranking(EvaluateRankingConfig(bundle=bundle, data=ml100k_dir, users=2))

    assert report["users"] == 2 and report["generate_invalid_rate"] == 0.0
    assert json.loads((bundle / "manifest.json").read_text())["artifacts"]["llm_merged"]["merge_max_abs_diff"] <= 1e-3
    rows = [json.loads(x) for x in (bundle / "reports" / "eval_ranking_users.jsonl").read_text().splitlines()]
    for row in rows:  # a real model puts most of its label mass somewhere: scores are a distribution
        assert abs(sum(2.718281828 ** s for s in row["llm_scores"]) - 1) < 1e-4
        assert len(set(row["emitted"])) == 10
