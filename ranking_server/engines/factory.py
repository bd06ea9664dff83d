"""Bundle + config → the `RankingEngine` the server runs: the one place a serving engine is chosen,
checked against the bundle and constructed (a new backend adds a branch here).

Every deployment build (`compile build` → `engines/<target>/`) is opened through `palr.builds.open_build`
first: its files must be the ones built (sha256) and it must fit this machine (device kind, GPU SM,
engine-library versions, CPU ISA). Otherwise the server refuses to start with a `BuildMismatch`
naming what the build was made for and what this machine is. Only then is anything loaded.

    hf-cpu / hf-cuda   HFEngine over the build's checkpoint (dtype, int8, threads as measured);
                       without a build, hf serves llm/merged as is
    ortgenai-cpu       OrtGenaiEngine for the modes its build won (`serves_modes`); the other modes
                       stay on the torch engine (`ModeRouter`)
    trtllm             TrtllmEngine over the TensorRT-LLM engine directory

Whichever it is, it answers behind an `AnswerCache` (`--answer-cache-size`): a request identical to one
answered before gets that answer without running the model.

Runs in a worker thread while health says NOT_SERVING; it may take seconds (weights load).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from palr.builds import BuildMismatch, artifact_name, engine_threads, open_build, routing_baseline, stale_routing
from palr.bundle import Bundle, BundleError
from palr.machine import Machine, cpu_cores
from palr.ranking import MODES
from palr.targets import TargetSpec, target_for, target_spec
from ranking_server.engines.answers import with_answer_cache
from ranking_server.engines.base import RankingEngine
from ranking_server.engines.config import EngineConfig

log = logging.getLogger(__name__)

LLM_ARTIFACT = "llm_merged"


def build_engine(bundle: Bundle, config) -> RankingEngine:
    """The engine for `config.engine` on `config.device` (a RankingServerConfig, or anything with those
    and the EngineConfig fields), its artifacts verified first; ValueError/BundleError say why not.

    A deployment build for (engine, device) is checked against this machine first and refused with a
    BuildMismatch (a BundleError) naming what it was built for; trtllm and ortgenai need one, hf
    without one serves llm/merged."""
    target = target_for(config.engine, config.device)  # ValueError for e.g. --engine trtllm --device cpu
    engine_config = EngineConfig.of(config)
    if config.engine == "ortgenai":
        engine = ortgenai_engine(bundle, engine_config, lambda part: _torch_engine(bundle, config.device, part))
    elif config.engine == "trtllm":
        engine = engine_from_build(bundle, target, engine_config)
    else:
        engine = _torch_engine(bundle, config.device, engine_config)
    return with_answer_cache(engine, engine_config.answer_cache_size)


def has_build(bundle, target: str) -> bool:
    return bundle.has(artifact_name(target))


def engine_from_build(bundle, target: str, engine_config: EngineConfig, trtllm_config=None) -> RankingEngine:
    """The engine serving the bundle's `engine:<target>` build on this machine (checked first)."""
    spec = target_spec(target)
    if not has_build(bundle, target):
        raise BundleError(f"{bundle.root}: no {artifact_name(target)} build for --engine {spec.engine} --device "
                          f"{spec.device}; make it on this machine: python -m compile build --bundle {bundle.root} "
                          f"--target {target}")
    machine = Machine.detect(spec.device)
    path, entry = open_build(bundle, target, machine)
    threads, why = engine_threads(entry, machine, engine_config.threads)
    log.info("%s engine threads: %s", target, f"{threads} ({why})" if threads else why)
    engine = _build_engine(spec, path, entry, engine_config, threads, trtllm_config)
    engine.version = f"{target}:{bundle.version(artifact_name(target))}"  # the build, its precision included
    return engine


def _build_engine(spec: TargetSpec, path, entry: dict, engine_config: EngineConfig, threads: int,
                  trtllm_config) -> RankingEngine:
    """The engine of `spec`'s library over the opened build at `path` (its manifest entry `entry`)."""
    if spec.engine == "hf":
        from palr.hf_build import load_hf_build
        from ranking_server.engines.hf import HFEngine

        model, _, _ = load_hf_build(path, spec.device, threads)  # 0: not the build machine's count
        return HFEngine(model, dataclasses.replace(engine_config, threads=threads))
    if spec.engine == "ortgenai":
        from ranking_server.engines.ortgenai import OrtGenaiEngine

        # its genai_config.json carries the build machine's thread count: "default" must mean this machine's
        return OrtGenaiEngine(path, dataclasses.replace(engine_config, threads=threads or cpu_cores()))
    if spec.engine == "trtllm":
        from ranking_server.engines.trtllm import TrtllmConfig, TrtllmEngine

        trtllm_config = trtllm_config or TrtllmConfig.of(engine_config)
        if entry.get("context_logits") and trtllm_config.enable_block_reuse:
            # readouts are read from context logits, which reused KV blocks do not have (trtllm_requests)
            log.info("trtllm: KV block reuse off (this ranker reads each candidate's own prompt position)")
            trtllm_config = dataclasses.replace(trtllm_config, enable_block_reuse=False)
        return TrtllmEngine(path, trtllm_config)
    raise ValueError(f"no engine serves target {spec.name}")


def ortgenai_engine(bundle, engine_config: EngineConfig,
                    torch_engine: Callable[[EngineConfig], RankingEngine]) -> RankingEngine:
    """The ortgenai build for the modes it won; `torch_engine(config)` for the others (if any), the two under one
    queue bound and one context-cache budget."""
    target = "ortgenai-cpu"
    entry = bundle.artifact(artifact_name(target))
    won = [m for m in MODES if m in (entry.get("serves_modes") or [])]
    if not won:
        raise BuildMismatch(f"refusing {artifact_name(target)}: its build measured no ranking mode where "
                            f"onnxruntime-genai beats torch on this model (reports/build_{target}.json); "
                            f"serve with --engine hf")
    if len(won) == len(MODES):
        return engine_from_build(bundle, target, engine_config)
    from ranking_server.engines.routed import ModeRouter

    stale = stale_routing(entry, routing_baseline(bundle))
    if stale:  # the split may be slower than it was measured to be; the answers are the same either way
        log.warning("ortgenai-cpu build: %s; the split of modes between the engines may no longer be the faster "
                    "one. Measure it again: python -m compile build --bundle %s --target %s --force",
                    stale, bundle.root, target)

    # --context-cache-mb bounds the torch engine's user contexts; ortgenai weighs none in bytes (it reuses an idle
    # generator whose cache starts with the user's context: at most --max-batch-size of them), so it takes no share
    log.info("ortgenai serves %s (what its build won); torch serves the rest, taking turns on the CPU, <= %d "
             "requests waiting in both, %.0f MB of user contexts in torch", ", ".join(won), engine_config.max_queue,
             engine_config.context_cache_mb)
    ortgenai = engine_from_build(bundle, target, engine_config)
    torch = torch_engine(engine_config)
    share_device(ortgenai, torch)
    return ModeRouter({m: ortgenai if m in won else torch for m in MODES}, max_queue=engine_config.max_queue)


def share_device(*engines: RankingEngine) -> None:
    """In-process engines on one device compute in turns (`DeviceTurns`), not at once."""
    from ranking_server.engines.loop import DeviceTurns, LoopEngine

    turns = DeviceTurns()
    for engine in engines:
        if isinstance(engine, LoopEngine):
            engine.share_device(turns)


def _torch_engine(bundle: Bundle, device: str, engine_config: EngineConfig) -> RankingEngine:
    """The hf engine from the bundle's hf-cpu/hf-cuda build when it has one, else from llm/merged."""
    target = target_for("hf", device)
    if not has_build(bundle, target):
        return _hf_engine(bundle, device, engine_config)
    started = time.perf_counter()
    engine = engine_from_build(bundle, target, engine_config)
    log.info("hf engine: build %s (%s) on %s loaded in %.2f s", target, bundle.artifact(f"engine:{target}")["dtype"],
             device, time.perf_counter() - started)
    return engine


def _hf_engine(bundle: Bundle, device: str, engine_config: EngineConfig) -> RankingEngine:
    import torch

    from palr.llm import load_causal_lm
    from ranking_server.engines.hf import HFEngine

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (torch "
                         f"{torch.__version__}); use --device cpu")
    bundle.verify([LLM_ARTIFACT])
    started = time.perf_counter()
    model, _ = load_causal_lm(bundle.path(LLM_ARTIFACT), device)
    engine = HFEngine(model, engine_config)
    engine.version = f"merged:{bundle.version(LLM_ARTIFACT)}"  # llm/merged as merge wrote it (fp32, no build)
    log.info("hf engine: %s on %s (%s) loaded in %.2f s; batch <= %d, <= %d tokens/step, queue <= %d, "
             "prefix reuse %s", bundle.path(LLM_ARTIFACT), device, model.dtype, time.perf_counter() - started,
             engine_config.max_batch_size, engine_config.max_tokens_per_step, engine_config.max_queue,
             "on" if engine_config.prefix_reuse else "off")
    return engine
