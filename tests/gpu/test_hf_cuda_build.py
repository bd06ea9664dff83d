"""`compile build --target hf-cuda` on a real GPU: pinned to its SM, served by the hf engine like the
reference, refused on another SM. Skipped without a CUDA GPU."""

from __future__ import annotations

import asyncio
import json

import pytest

from compile import build
from palr.bundle import Bundle
from palr.builds import BuildMismatch, open_build
from ranking_server.engines.base import EngineRequest
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.factory import engine_from_build
from tests.fixtures.builds import build_config, copy_bundle

pytestmark = pytest.mark.gpu


def test_hf_cuda_build_is_pinned_to_this_gpu_and_answers_like_the_reference(cuda, tiny_llm_bundle, tmp_path):
    import torch

    from palr.llm import score_labels
    from palr.hf_build import load_hf_build

    bundle_dir = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    build.run(build_config(bundle_dir, "hf-cuda"))
    bundle = Bundle.open(bundle_dir)
    entry = bundle.artifact("engine:hf-cuda")
    major, minor = torch.cuda.get_device_capability(0)
    assert entry["device"] == "cuda" and entry["compute_capability"] == f"{major}.{minor}"
    assert entry["device_name"] == torch.cuda.get_device_name(0)
    report = json.loads((bundle_dir / "reports" / "build_hf-cuda.json").read_text())
    half = "bf16" if major >= 8 else "fp16"  # kept only if it ranks the probes like fp32 (the hf-cpu bar)
    assert report["quality"]["verdict"].split(":")[1].strip().startswith(half)
    kept = report["quality"]["verdict"].startswith("kept")
    assert entry["dtype"] == (half if kept else "fp32") and entry["attn_implementation"] == "sdpa"
    model, _, _ = load_hf_build(bundle.path("engine:hf-cuda"), "cuda")
    ids = list(range(1000, 1100))
    labels = list(range(330, 340))
    engine = engine_from_build(bundle, "hf-cuda", EngineConfig(max_batch_size=4, max_tokens_per_step=256))
    try:
        result = asyncio.run(engine.rank(EngineRequest("s", ids[:20], ids[20:], labels)))
    finally:
        engine.close()
    assert result.scores == pytest.approx(score_labels(model, ids, labels), abs=3e-2)  # half precision: batched vs single
    entry["compute_capability"] = "7.0" if f"{major}.{minor}" != "7.0" else "8.0"
    bundle.save()
    with pytest.raises(BuildMismatch, match="compute capability: built for SM"):
        open_build(Bundle.open(bundle_dir), "hf-cuda")
