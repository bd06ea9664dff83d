"""`compile all`: every step in order, each skipping itself when its inputs are unchanged.

    sasrec → export-onnx → evaluate (retrieval)
    → base-model → profiles → sft-data → finetune → merge → evaluate (ranking) → build (this machine)

A step is a (name, module, config class) entry in STEPS; its config is the preset's options for
that step with the pipeline's shared fields (bundle, data, ...) filled in. To add a step, append
it to STEPS (and give its config the shared fields it needs).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compile.presets import PRESETS, preset_for

log = logging.getLogger(__name__)

# (step name as in `python -m compile <step>`, module, config class, fixed options)
STEPS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("sasrec", "compile.sasrec", "SASRecConfig", {}),
    ("export-onnx", "compile.export_onnx", "ExportConfig", {}),
    ("evaluate", "compile.evaluate", "EvaluateConfig", {"tier": "retrieval"}),
    # the ranking tier (PALR): base LLM → profiles → instruction data → LoRA → merged ranker
    ("base-model", "compile.base_model", "BaseModelConfig", {}),
    ("profiles", "compile.profiles", "ProfilesConfig", {}),
    ("sft-data", "compile.sft_data", "SftDataConfig", {}),
    ("finetune", "compile.finetune", "FinetuneConfig", {}),
    ("merge", "compile.merge", "MergeConfig", {}),
    ("evaluate", "compile.evaluate", "EvaluateConfig", {"tier": "ranking"}),
    # the deployment build for this machine (target detected: hf-cpu on CPU, hf-cuda/trtllm on a GPU)
    ("build", "compile.build", "BuildConfig", {}),
]


@dataclass
class PipelineConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory to build"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory (RecBole atomic files)"})
    preset: str = field(default="full", metadata={"help": "option set for every step", "choices": sorted(PRESETS)})
    base_model: Path | None = field(default=None, metadata={
        "help": "ranking steps: a local Llama-family Hugging Face checkpoint to use instead of the embedded GGUF"})


def step_config(config: PipelineConfig, name: str, module: Any, class_name: str, fixed: dict[str, Any]) -> Any:
    """The step's config: dataclass defaults < preset < the pipeline's shared fields < fixed options."""
    config_cls = getattr(module, class_name)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    values = {k: v for k, v in preset_for(config.preset, name).items() if k in names}
    values.update({k: v for k, v in dataclasses.asdict(config).items() if k in names})
    values.update(fixed)
    return config_cls(**values)


def run(config: PipelineConfig) -> None:
    timings = []
    for name, module_name, class_name, fixed in STEPS:
        module = importlib.import_module(module_name)
        step = step_config(config, name, module, class_name, fixed)
        log.info("all: step %s", name)
        started = time.perf_counter()
        module.run(step)
        timings.append((name, time.perf_counter() - started))
    width = max(len(name) for name, _ in timings)
    log.info("all: done in %.1fs\n%s", sum(s for _, s in timings),
             "\n".join(f"  {name:<{width}}  {seconds:7.1f}s" for name, seconds in timings))
