"""`compile all`: every step in order, each skipping itself when its inputs are unchanged.

    sasrec → export-onnx → evaluate-retrieval → trends → collab
    → base-model → profiles → sft-data → finetune → merge → evaluate-ranking → build (this machine)

The order is `compile.steps.ALL`, the steps `compile.steps.STEPS` (the one registry). A step's config
is the preset's options for that step with the pipeline's shared fields (bundle, data, ...) filled in,
merged by `palr.cli.build_config` like the command line is.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compile.fetch import gguf_path
from compile.presets import PRESETS, preset_for
from compile.steps import ALL
from compile.steps import STEPS as REGISTRY
from compile.steps import Step
from palr.cli import build_config

log = logging.getLogger(__name__)

STEPS: list[Step] = [REGISTRY[name] for name in ALL]


@dataclass
class PipelineConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory to build"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory (RecBole atomic files)"})
    preset: str = field(default="full", metadata={"help": "option set for every step", "choices": sorted(PRESETS)})
    base_model: Path | None = field(default=None, metadata={
        "help": "ranking steps: a local Llama-family Hugging Face checkpoint to use instead of the embedded GGUF"})
    gguf: Path | None = field(default=None, metadata={
        "help": "the embedded LLM's GGUF (default: where `compile fetch` put it beside --data, "
                "DATA_ROOT/models/smollm2/...)", "metavar": "FILE"})


def step_config(config: PipelineConfig, step: Step, module: Any) -> Any:
    """The step's config: dataclass defaults < preset < the pipeline's shared fields (the GGUF resolved beside the
    dataset, as `compile fetch --data-dir` lays both out)."""
    shared = dataclasses.asdict(config) | {"gguf": config.gguf or gguf_path(config.data.parent)}
    return build_config(getattr(module, step.config_class), shared, preset_for(config.preset, step.name))


def run(config: PipelineConfig) -> None:
    timings = []
    for step in STEPS:
        module = importlib.import_module(step.module)
        step_cfg = step_config(config, step, module)
        log.info("all: step %s", step.name)
        started = time.perf_counter()
        result = module.run(step_cfg)
        timings.append((step.name, time.perf_counter() - started))
        if step.name == "finetune" and result is None:  # stopped before its last step (--stop-after)
            log.warning("all: finetune stopped before its last step; rerun to continue from its checkpoint (the "
                        "steps after it need the finished adapter)")
            return
    width = max(len(name) for name, _ in timings)
    log.info("all: done in %.1fs\n%s", sum(s for _, s in timings),
             "\n".join(f"  {name:<{width}}  {seconds:7.1f}s" for name, seconds in timings))
