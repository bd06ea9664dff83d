"""Ranking-tier fixtures: `tiny_llm_bundle`, the tiny retrieval bundle completed by the real ranking
steps of `compile all` (base-model → profiles → sft-data → finetune → merge → evaluate-ranking) with
the `tiny` preset and the tiny random Llama as `--base-model`."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

RANKING_STEPS = ("base-model", "profiles", "sft-data", "finetune", "merge", "evaluate-ranking")


def run_ranking_steps(bundle: Path, data: Path, base_model: Path, preset: str = "tiny") -> None:
    """The ranking steps of the pipeline, configured exactly as `compile all --preset ...` does."""
    from compile import pipeline

    config = pipeline.PipelineConfig(bundle=bundle, data=data, preset=preset, base_model=base_model)
    for step in pipeline.STEPS:
        if step.name in RANKING_STEPS:
            module = importlib.import_module(step.module)
            module.run(pipeline.step_config(config, step, module))


@pytest.fixture(scope="session")
def tiny_llm_bundle(tiny_bundle, tiny_llama_dir, ml100k_dir, tmp_path_factory) -> Path:
    """A complete tiny bundle: catalog, users, sasrec.onnx, llm/base (links to the tiny Llama),
    profiles.json, llm/sft, llm/lora, llm/merged, llm/ranker.json, reports/eval_ranking.json.

    Shared by every test in the session: treat it as read-only (copy it to change it)."""
    bundle = tmp_path_factory.mktemp("tiny-llm-bundle")
    shutil.copytree(tiny_bundle, bundle, dirs_exist_ok=True)
    run_ranking_steps(bundle, ml100k_dir, tiny_llama_dir)
    return bundle
