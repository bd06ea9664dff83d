"""Engines from the bundle's deployment builds (`compile build` → `engines/<target>/`).

Every build is opened through `palr.hardware.open_build` first: its files must be the ones built
(sha256) and it must fit this machine (device kind, GPU SM, engine-library versions, CPU ISA).
Otherwise the server refuses to start with a `BuildMismatch` naming what the build was made for
and what this machine is. Only then is anything loaded.

    hf-cpu / hf-cuda   HFEngine over the build's checkpoint (dtype, int8, threads as measured)
    ortgenai-cpu       OrtGenaiEngine for the modes its build won (`serves_modes`); the other modes
                       stay on the torch engine (`ModeRouter`)
    trtllm             TrtllmEngine over the TensorRT-LLM engine directory
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from palr.bundle import BundleError
from palr.hardware import BuildMismatch, Machine, artifact_name, open_build, target_spec
from ranking_server.engines.base import MODES, RankingEngine
from ranking_server.engines.hf import EngineConfig

log = logging.getLogger(__name__)


def has_build(bundle, target: str) -> bool:
    return bundle.has(artifact_name(target))


def engine_from_build(bundle, target: str, engine_config: EngineConfig, trtllm_config=None) -> RankingEngine:
    """The engine serving the bundle's `engine:<target>` build on this machine (checked first)."""
    spec = target_spec(target)
    if not has_build(bundle, target):
        raise BundleError(f"{bundle.root}: no {artifact_name(target)} build for --engine {spec.engine} --device "
                          f"{spec.device}; make it on this machine: python -m compile build --bundle {bundle.root} "
                          f"--target {target}")
    path, entry = open_build(bundle, target, Machine.detect(spec.device))
    threads = engine_config.num_threads or entry.get("num_threads")
    if spec.engine == "hf":
        from ranking_server.engines.hf import HFEngine
        from ranking_server.engines.hf_build import load_hf_build

        model, _, _ = load_hf_build(path, spec.device)
        return HFEngine(model, dataclasses.replace(engine_config, num_threads=threads))
    if spec.engine == "ortgenai":
        from ranking_server.engines.ortgenai import OrtGenaiEngine

        return OrtGenaiEngine(path, dataclasses.replace(engine_config, num_threads=threads))
    if spec.engine == "trtllm":
        from ranking_server.engines.trtllm import TrtllmEngine

        return TrtllmEngine(path, trtllm_config)
    raise ValueError(f"no engine serves target {target}")


def ortgenai_engine(bundle, engine_config: EngineConfig, torch_engine: Callable[[], RankingEngine]) -> RankingEngine:
    """The ortgenai build for the modes it won; `torch_engine()` for the others (if any)."""
    target = "ortgenai-cpu"
    entry = bundle.artifact(artifact_name(target))
    won = [m for m in MODES if m in (entry.get("serves_modes") or [])]
    if not won:
        raise BuildMismatch(f"refusing {artifact_name(target)}: its build measured no ranking mode where "
                            f"onnxruntime-genai beats torch on this model (reports/build_{target}.json); "
                            f"serve with --engine hf")
    ortgenai = engine_from_build(bundle, target, engine_config)
    if len(won) == len(MODES):
        return ortgenai
    from ranking_server.engines.routed import ModeRouter

    log.info("ortgenai serves %s (what its build won); torch serves the rest", ", ".join(won))
    torch = torch_engine()
    return ModeRouter({m: ortgenai if m in won else torch for m in MODES})
