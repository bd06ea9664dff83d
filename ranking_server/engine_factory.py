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
    """Verifies the artifacts the engine reads and starts it; ValueError/BundleError say why not."""
    if config.engine == "hf":
        return _hf_engine(bundle, config)
    raise ValueError(f"--engine {config.engine}: this build has no {config.engine} backend "
                     f"(ranking_server/engines/{config.engine}.py); use --engine hf")


def _hf_engine(bundle: Bundle, config: RankingServerConfig) -> RankingEngine:
    import torch

    from palr.llm import load_causal_lm
    from ranking_server.engines.hf import EngineConfig, HFEngine

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (torch "
                         f"{torch.__version__}); use --device cpu")
    bundle.verify([LLM_ARTIFACT])
    started = time.perf_counter()
    model, _ = load_causal_lm(bundle.path(LLM_ARTIFACT), config.device)
    engine_config = EngineConfig(max_batch_size=config.max_batch_size, max_tokens_per_step=config.max_tokens_per_step,
                                 max_queue=config.max_queue, max_seq_len=config.max_seq_len,
                                 prefix_reuse=config.prefix_reuse, num_threads=config.threads or None)
    engine = HFEngine(model, engine_config)
    log.info("hf engine: %s on %s (%s) loaded in %.2f s; batch <= %d, <= %d tokens/step, queue <= %d, "
             "prefix reuse %s", bundle.path(LLM_ARTIFACT), config.device, model.dtype, time.perf_counter() - started,
             config.max_batch_size, config.max_tokens_per_step, config.max_queue,
             "on" if config.prefix_reuse else "off")
    return engine
