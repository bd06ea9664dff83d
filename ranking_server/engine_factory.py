"""Bundle + server config → the `RankingEngine` the server runs: the one place a serving engine is
chosen, checked against the bundle and constructed (a new backend adds a branch here).

Runs in a worker thread while health says NOT_SERVING; it may take seconds (weights load).
"""

from __future__ import annotations

import logging
import time

from palr.bundle import Bundle
from ranking_server.config import RankingServerConfig
from ranking_server.engines.base import RankingEngine

log = logging.getLogger(__name__)

LLM_ARTIFACT = "llm_merged"


def build_engine(bundle: Bundle, config: RankingServerConfig) -> RankingEngine:
    """Verifies the artifacts the engine reads and starts it; ValueError/BundleError say why not.

    A deployment build for (--engine, --device) (`compile build`, `engines/<target>/`) is checked
    against this machine first (palr/hardware.py) and refused with a BuildMismatch (a BundleError)
    naming what it was built for; trtllm and ortgenai need one, hf without one serves llm/merged."""
    from palr.hardware import target_for
    from ranking_server.engines import builds

    target = target_for(config.engine, config.device)  # ValueError for e.g. --engine trtllm --device cpu
    if config.engine == "ortgenai":
        return builds.ortgenai_engine(bundle, _engine_config(config), lambda: _torch_engine(bundle, config))
    if config.engine == "trtllm":
        from ranking_server.engines.trtllm import TrtllmConfig

        return builds.engine_from_build(bundle, target, _engine_config(config),
                                        TrtllmConfig(max_batch_size=config.max_batch_size, max_queue=config.max_queue))
    return _torch_engine(bundle, config)


def _engine_config(config: RankingServerConfig):
    from ranking_server.engines.hf import EngineConfig

    return EngineConfig(max_batch_size=config.max_batch_size, max_tokens_per_step=config.max_tokens_per_step,
                        max_queue=config.max_queue, max_seq_len=config.max_seq_len,
                        prefix_reuse=config.prefix_reuse, num_threads=config.threads or None)


def _torch_engine(bundle: Bundle, config: RankingServerConfig) -> RankingEngine:
    """The hf engine from the bundle's hf-cpu/hf-cuda build when it has one, else from llm/merged."""
    from palr.hardware import target_for
    from ranking_server.engines import builds

    target = target_for("hf", config.device)
    if not builds.has_build(bundle, target):
        return _hf_engine(bundle, config)
    started = time.perf_counter()
    engine = builds.engine_from_build(bundle, target, _engine_config(config))
    log.info("hf engine: build %s (%s) on %s loaded in %.2f s", target, bundle.artifact(f"engine:{target}")["dtype"],
             config.device, time.perf_counter() - started)
    return engine


def _hf_engine(bundle: Bundle, config: RankingServerConfig) -> RankingEngine:
    import torch

    from palr.llm import load_causal_lm
    from ranking_server.engines.hf import HFEngine

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (torch "
                         f"{torch.__version__}); use --device cpu")
    bundle.verify([LLM_ARTIFACT])
    started = time.perf_counter()
    model, _ = load_causal_lm(bundle.path(LLM_ARTIFACT), config.device)
    engine = HFEngine(model, _engine_config(config))
    log.info("hf engine: %s on %s (%s) loaded in %.2f s; batch <= %d, <= %d tokens/step, queue <= %d, "
             "prefix reuse %s", bundle.path(LLM_ARTIFACT), config.device, model.dtype, time.perf_counter() - started,
             config.max_batch_size, config.max_tokens_per_step, config.max_queue,
             "on" if config.prefix_reuse else "off")
    return engine
