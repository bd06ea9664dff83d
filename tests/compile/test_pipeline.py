"""`compile all`: the shared fields it passes to its steps."""

from __future__ import annotations

from pathlib import Path

from compile import base_model, pipeline
from compile.fetch import GGUF_NAME


def base_model_config(**fields):
    step = next(s for s in pipeline.STEPS if s.name == "base-model")
    return pipeline.step_config(pipeline.PipelineConfig(preset="quick", **fields), step, base_model)


def test_the_gguf_is_looked_for_beside_the_dataset_compile_all_is_given():
    """`make bundle DATA=/mnt/d` fetched the GGUF into /mnt/d/models/..., and base-model looked in ./data."""
    assert base_model_config(data=Path("/mnt/d/ml-100k")).gguf == Path("/mnt/d/models/smollm2") / GGUF_NAME
    assert base_model_config().gguf == Path("data/models/smollm2") / GGUF_NAME
    assert base_model_config(gguf=Path("/models/other.gguf")).gguf == Path("/models/other.gguf")


def test_all_stops_after_a_finetune_that_stopped_early(tiny_llm_bundle, tiny_llama_dir, ml100k_dir, tmp_path,
                                                       monkeypatch, caplog):
    """A finetune stopped before its last step (--stop-after in a preset) leaves no adapter of its own: `compile all`
    ends there instead of merging (and building, evaluating) without one. The tiny bundle's earlier steps are
    current; finetune runs again under other options and stops after 2 steps."""
    from compile import presets
    from palr.bundle import Bundle
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    tiny = {**presets.PRESETS["tiny"], "finetune": {**presets.PRESETS["tiny"]["finetune"], "lr": 3e-3,
                                                    "stop_after": 2}}
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    merged_before = Bundle.open(bundle).manifest.steps["merge"]
    with caplog.at_level("INFO"):
        pipeline.run(pipeline.PipelineConfig(bundle=bundle, data=ml100k_dir, preset="tiny", base_model=tiny_llama_dir))
    assert "SFT data is current" in caplog.text  # the earlier adapter's inputs: only finetune's options changed
    assert "all: finetune stopped before its last step" in caplog.text and "all: step merge" not in caplog.text
    after = Bundle.open(bundle)
    assert not after.has("lora") and after.manifest.steps["merge"] == merged_before
