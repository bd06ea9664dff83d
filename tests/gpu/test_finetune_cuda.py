"""`compile finetune --device cuda` with the default listwise loss: the batches it builds on the CPU reach the GPU
(they did not: every listwise step failed on mixed devices). Skipped without a CUDA GPU."""

from __future__ import annotations

import json
import shutil

import pytest

from compile.finetune import FinetuneConfig, run

pytestmark = pytest.mark.gpu


def test_listwise_finetune_runs_on_the_gpu(cuda, tiny_llm_bundle, tmp_path):
    bundle = shutil.copytree(tiny_llm_bundle, tmp_path / "bundle", symlinks=True)
    shutil.rmtree(bundle / "llm" / "checkpoints", ignore_errors=True)
    run(FinetuneConfig(bundle=bundle, max_steps=3, batch_size=4, warmup_steps=0, save_every=0, force=True,
                       device="cuda"))
    training = json.loads((bundle / "llm" / "lora" / "training.json").read_text())
    assert len(training["losses"]) == 3 and all(loss == loss for loss in training["losses"])  # ran, no NaN
