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
from palr.bundle import MANIFEST, Bundle, fingerprint
from palr.cli import build_config

log = logging.getLogger(__name__)

STEPS: list[Step] = [REGISTRY[name] for name in ALL]
STEP = "all"  # its manifest record: the preset the bundle was last built with


@dataclass
class PipelineConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory to build"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory (RecBole atomic files)"})
    preset: str = field(default="full", metadata={"help": "option set for every step", "choices": sorted(PRESETS)})
    base_model: Path | None = field(default=None, metadata={
        "help": "ranking steps: a local Llama-family Hugging Face checkpoint to use instead of the embedded GGUF"})
    gguf: Path | None = field(default=None, metadata={
        "help": "the embedded LLM's GGUF (default: where `compile fetch` put it beside --data, "
                "DATA_ROOT/models/smollm2/..., else data/models/smollm2/...: a dataset of your own elsewhere)",
        "metavar": "FILE"})
    switch_preset: bool = field(default=False, metadata={
        "help": "rebuild a bundle made with another --preset under this one (refused without: its steps would be "
                "redone and replaced with other settings, e.g. a 30-minute full bundle by a quick one)"})


FETCHED_DATA = Path("data")  # `compile fetch`'s (make data's) default --data-dir


def gguf_for(config: PipelineConfig) -> Path:
    """The GGUF the base-model step reads: --gguf; else the one beside the dataset (`compile fetch --data-dir D`
    lays out D/ml-100k and D/models); else, for a dataset of one's own elsewhere, the one `make data` fetched."""
    if config.gguf:
        return config.gguf
    beside, fetched = gguf_path(config.data.parent), gguf_path(FETCHED_DATA)
    return beside if beside.is_file() or not fetched.is_file() else fetched


def step_config(config: PipelineConfig, step: Step, module: Any) -> Any:
    """The step's config: dataclass defaults < preset < the pipeline's shared fields (the GGUF resolved beside the
    dataset, as `compile fetch --data-dir` lays both out)."""
    shared = dataclasses.asdict(config) | {"gguf": gguf_for(config)}
    return build_config(getattr(module, step.config_class), shared, preset_for(config.preset, step.name))


def check_before_running(config: PipelineConfig) -> None:
    """What would stop the pipeline later, refused before its first step trains anything: a bundle made with another
    preset (its steps would be replaced with other settings), an embedded LLM that is not there (base-model failed
    after SASRec's minutes)."""
    recorded = Bundle.open(config.bundle).manifest.steps.get(STEP, {}).get("preset") \
        if (config.bundle / MANIFEST).is_file() else None
    if recorded and recorded != config.preset and not config.switch_preset:
        raise ValueError(f"{config.bundle} was built by compile all --preset {recorded}; --preset {config.preset} would "
                         f"redo its steps with other settings and replace them: pass --preset {recorded} (make ... "
                         f"PRESET={recorded}), another --bundle, or --switch-preset")
    gguf = gguf_for(config)
    if config.base_model is None and not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no GGUF of the embedded LLM (looked beside --data and in {FETCHED_DATA}/): "
                                f"run python -m compile fetch, or pass --gguf FILE or --base-model DIR")


def run(config: PipelineConfig) -> None:
    check_before_running(config)
    bundle = Bundle.open_or_create(config.bundle)  # the preset recorded first: a run stopped midway counts too
    bundle.record_step(STEP, fingerprint(STEP, config.preset), 0.0, preset=config.preset)
    bundle.save()
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
