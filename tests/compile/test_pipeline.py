"""`compile all`: the shared fields it passes to its steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compile import base_model, pipeline
from compile.fetch import GGUF_NAME


def base_model_config(**fields):
    step = next(s for s in pipeline.STEPS if s.name == "base-model")
    return pipeline.step_config(pipeline.PipelineConfig(preset="quick", **fields), step, base_model)


def test_the_gguf_is_looked_for_beside_the_dataset_compile_all_is_given(tmp_path, monkeypatch):
    """`make bundle DATA=/mnt/d` fetched the GGUF into /mnt/d/models/..., and base-model looked in ./data; a dataset
    of one's own elsewhere (~/mydata/books) has none beside it: the one `make data` fetched into ./data is taken."""
    monkeypatch.chdir(tmp_path)
    fetched = Path("data/models/smollm2") / GGUF_NAME
    beside = tmp_path / "mnt" / "models" / "smollm2" / GGUF_NAME
    for gguf in (fetched, beside):
        gguf.parent.mkdir(parents=True)
        gguf.write_bytes(b"GGUF")
    assert base_model_config(data=tmp_path / "mnt" / "ml-100k").gguf == beside
    assert base_model_config().gguf == fetched
    assert base_model_config(data=tmp_path / "mydata" / "books").gguf == fetched
    assert base_model_config(gguf=Path("/models/other.gguf")).gguf == Path("/models/other.gguf")


def test_a_missing_llm_is_refused_before_any_step_trains(tmp_path, monkeypatch):
    """Without the GGUF, base-model failed after SASRec, its export and evaluation, trends and collab (minutes)."""
    import pytest

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no GGUF of the embedded LLM"):
        pipeline.run(pipeline.PipelineConfig(bundle=tmp_path / "bundle", data=tmp_path / "mydata" / "books"))
    assert not (tmp_path / "bundle").exists()  # nothing started


def test_a_bundle_built_with_another_preset_is_not_rebuilt_under_this_one_unasked(tmp_path, monkeypatch):
    """`make bundle PRESET=full` (30 minutes), then `make demo` (PRESET quick by default): every step after SASRec
    was redone with quick settings and replaced, without a word."""
    import pytest

    from palr.bundle import Bundle

    monkeypatch.chdir(tmp_path)
    bundle = Bundle.open_or_create(tmp_path / "bundle")
    bundle.record_step(pipeline.STEP, "fp", 1.0, preset="full")  # as compile all --preset full records it
    bundle.save()
    config = pipeline.PipelineConfig(bundle=tmp_path / "bundle", preset="quick", base_model=tmp_path)
    with pytest.raises(ValueError, match="built by compile all --preset full; --preset quick would redo its steps"):
        pipeline.run(config)
    assert Bundle.open(tmp_path / "bundle").manifest.steps[pipeline.STEP]["preset"] == "full"
    pipeline.check_before_running(dataclasses.replace(config, preset="full"))
    pipeline.check_before_running(dataclasses.replace(config, switch_preset=True))


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
