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
