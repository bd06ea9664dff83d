"""`trtllm`: a TensorRT-LLM engine of the merged checkpoint, built with the LLM API (TensorRT flow)
and saved with `llm.save(dir)`; the `trtllm` ranking engine loads it (ranking_server/engines/trtllm.py).

    BuildConfig(max_input_len, max_seq_len, max_batch_size, max_num_tokens)
        plugin_config.use_paged_context_fmha = True   # KV block reuse of the shared prompt prefix needs it
        kv_cache_type: paged (the default; checked in the saved config)
        gather_context_logits = candidate readout     # a candidate-readout ranker reads context logits; a
                                                      # label-readout one the generation logits
    LLM(model=merged, tokenizer=merged, dtype=bf16|fp16, tensor_parallel_size=tp, build_config=...,
        [quant_config=QuantConfig(QuantAlgo.FP8, kv_cache_quant_algo=FP8) | QuantConfig(W4A16_AWQ),
         calib_config=CalibConfig(calib_dataset=...)])          # tensorrt_llm._tensorrt_engine.LLM in 1.x
    llm.save(out)   # config.json {version, pretrained_config, build_config}, rank*.engine, tokenizer

The engine only deserializes on the SM and TensorRT release it was built with, and its config.json
does not record the SM: the manifest entry does (palr/builds.py checks it). Needs TensorRT-LLM and
a GPU; everywhere else it stops with a clear message before doing anything.
"""

from __future__ import annotations

import json
import logging
import shutil

from compile.steps import StepFailed
from compile.targets import BuildContext, BuildResult
from compile.targets.hf_cuda import gpu_dtype
from palr.ranking import load_ranker
from palr.trtllm_runtime import import_trtllm, read_engine_config, trt_backend_llm_class

log = logging.getLogger(__name__)

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def quant_arguments(quantization: str, calib_dataset: str, compute_capability: str) -> dict:
    """LLM-API keyword arguments for `--quantization` (empty for none)."""
    if quantization == "none":
        return {}
    from tensorrt_llm.llmapi import CalibConfig, QuantAlgo, QuantConfig

    major, minor = (int(x) for x in compute_capability.split("."))
    if quantization == "fp8":
        if (major, minor) < (8, 9):
            raise ValueError(f"FP8 needs SM 8.9 (Ada) or newer; this GPU is SM {compute_capability}")
        quant = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8)
    elif quantization == "int4_awq":
        quant = QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ)
    else:
        raise ValueError(f"unknown quantization {quantization!r}")
    return {"quant_config": quant, "calib_config": CalibConfig(calib_dataset=calib_dataset)}


def trt_build_config(config, context_logits: bool = False):
    """BuildConfig with our limits, paged context FMHA on, context logits only where the ranker reads them."""
    from tensorrt_llm.llmapi import BuildConfig

    build_config = BuildConfig(max_input_len=config.max_input_len, max_seq_len=config.max_seq_len,
                               max_batch_size=config.max_batch_size, max_num_tokens=config.max_num_tokens,
                               gather_context_logits=context_logits)
    build_config.plugin_config.use_paged_context_fmha = True
    return build_config


def ranker_readout(bundle) -> str:
    """What the bundle's ranker reads in score mode (llm/ranker.json prompt.readout)."""
    return load_ranker(bundle).get("prompt", {}).get("readout", "label")


def check_saved_engine(out) -> dict:
    """What the saved engine says about itself; refuses one without paged KV / paged context FMHA."""
    engine = read_engine_config(out)
    build, plugins = engine["build_config"], engine["build_config"].get("plugin_config", {})
    kv_type = str(build.get("kv_cache_type", "PAGED")).upper()
    if "PAGED" not in kv_type or not plugins.get("use_paged_context_fmha", False):
        raise StepFailed(f"{out}: engine built without paged KV cache / paged context FMHA "
                           f"(kv_cache_type={kv_type}, use_paged_context_fmha={plugins.get('use_paged_context_fmha')}); "
                           f"KV block reuse needs both")
    pretrained = engine["pretrained_config"]
    return {"engine_version": engine.get("version"), "kv_cache_type": kv_type,
            "use_paged_context_fmha": True, "max_seq_len": build.get("max_seq_len"),
            "max_batch_size": build.get("max_batch_size"), "max_num_tokens": build.get("max_num_tokens"),
            "architecture": pretrained.get("architecture"), "engine_dtype": pretrained.get("dtype"),
            "quantization_config": pretrained.get("quantization"), "mapping": pretrained.get("mapping")}


def build(ctx: BuildContext) -> BuildResult:
    tensorrt_llm = import_trtllm()
    config, machine = ctx.config, ctx.machine
    dtype = gpu_dtype(config.dtype, machine.compute_capability)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"trtllm builds bf16 or fp16 (with optional --quantization), not {dtype}")
    if config.tp > machine.gpu_count:
        raise ValueError(f"--tp {config.tp} needs {config.tp} GPUs; this machine has {machine.gpu_count}")
    llm_class = trt_backend_llm_class()
    log.info("trtllm: building %s (%s, tp %d, quantization %s) with TensorRT-LLM %s", ctx.source, dtype, config.tp,
             config.quantization, tensorrt_llm.__version__)
    candidate_readout = ranker_readout(ctx.bundle) == "candidate"
    llm = llm_class(model=str(ctx.source), tokenizer=str(ctx.source), dtype=DTYPE_NAMES[dtype],
                    tensor_parallel_size=config.tp, build_config=trt_build_config(config, candidate_readout),
                    **quant_arguments(config.quantization, config.calib_dataset, machine.compute_capability))
    try:
        llm.save(str(ctx.out))
    finally:
        llm.shutdown()
    for name in TOKENIZER_FILES:  # engines from the LLM API carry the tokenizer; make sure of it
        if (ctx.source / name).is_file() and not (ctx.out / name).exists():
            shutil.copy2(ctx.source / name, ctx.out / name)
    engine = check_saved_engine(ctx.out)
    meta = {"dtype": dtype, "quantization": None if config.quantization == "none" else config.quantization,
            "tensor_parallel_size": config.tp, "requires_isa": [], "serves_modes": ["score", "generate"],
            "context_logits": candidate_readout, **engine}
    return BuildResult(meta, {"engine_config": json.loads((ctx.out / "config.json").read_text())},
                       summary=f"{dtype}{'/' + config.quantization if config.quantization != 'none' else ''}, "
                               f"tp {config.tp}, engine version {engine['engine_version']}")
