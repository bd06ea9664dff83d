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


def test_a_resumed_run_on_the_gpu_continues_as_the_uninterrupted_one(cuda, tiny_llm_bundle, tmp_path):
    """Checkpoints kept only the CPU RNG: a run resumed on cuda drew other LoRA dropout masks than the run that
    did not stop (same losses up to the GPU kernels' own non-determinism now)."""
    settings = dict(max_steps=4, batch_size=4, lr=1e-2, save_every=2, seed=3, warmup_steps=0, device="cuda",
                    dropout=0.5)  # masks that matter: other draws move the adapter well past the tolerance below
    bundles = []
    for name in ("straight", "resumed"):
        bundle = shutil.copytree(tiny_llm_bundle, tmp_path / name, symlinks=True)
        shutil.rmtree(bundle / "llm" / "checkpoints", ignore_errors=True)
        bundles.append(bundle)
    run(FinetuneConfig(bundle=bundles[0], force=True, **settings))
    run(FinetuneConfig(bundle=bundles[1], force=True, stop_after=2, **settings))
    run(FinetuneConfig(bundle=bundles[1], **settings))
    losses = [json.loads((b / "llm" / "lora" / "training.json").read_text())["losses"] for b in bundles]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(x / "llm" / "lora" / "adapter_model.safetensors") for x in bundles)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
