"""`hf-cuda`: the merged checkpoint for this NVIDIA GPU: bf16 from SM 8.0 (Ampere) on, fp16 before
(no bf16 tensor cores there), SDPA attention.

Attention: the in-flight `hf` engine runs every batch with a per-row 4-D mask and per-row position
ids over its slot KV cache (`engines/kv.py`). flash-attention 2 in transformers takes no 4-D
masks, so even where `flash_attn` is installed the engine's kernel is SDPA (PyTorch picks its
memory-efficient kernel for masked batches); the build records which was available and why.
With --measure, one prefill and a few decode steps are timed on the GPU for the report, and the
half-precision model must rank like the fp32 one on the bundle's validation probes (the hf-cpu bar:
top-1 agreement and NDCG@10, score mode and generate mode's first pick); one that does not is
rejected and the build keeps fp32 (quality first; plain bf16 reordered this ranker's candidates on CPU).
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time

from compile.targets import BuildContext, BuildResult
from compile.targets.measure import TorchRunner, bundle_generate_logit_weight, load_probes, measure_quality, quality_ok
from palr.hf_build import DTYPES, save_hf_build
from palr.ranking import MODES

log = logging.getLogger(__name__)


def gpu_dtype(requested: str, compute_capability: str, measured: bool = True) -> str:
    """auto: bf16 from SM 8.0 on, fp16 before, when the build measures it against the fp32 quality bar; fp32 when
    it does not (`--no-measure`: nothing would check that it ranks like fp32, as on the CPU targets). An explicit
    request is checked against the GPU."""
    major = int(compute_capability.split(".")[0])
    if requested == "auto":
        return ("bf16" if major >= 8 else "fp16") if measured else "fp32"
    if requested not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"hf-cuda builds bf16, fp16 or fp32, not {requested}")
    if requested == "bf16" and major < 8:
        raise ValueError(f"bf16 needs SM 8.0 or newer; this GPU is SM {compute_capability}: use --dtype fp16")
    return requested


def attention_choice() -> tuple[str, str]:
    """(implementation, why)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash_attn is not installed"
    return "sdpa", "flash_attn is installed, but the in-flight engine needs 4-D per-row masks, which FA2 does not take"


def time_on_gpu(model, prompt_tokens: int, decode_steps: int) -> dict:
    """Median prefill and decode-step time of one request on the GPU (synchronized)."""
    import torch

    ids = torch.randint(100, model.config.vocab_size, (1, prompt_tokens), device="cuda")
    times = {"prefill": [], "decode": []}
    with torch.inference_mode():
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            times["prefill"].append(time.perf_counter() - started)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_steps):
                started = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times["decode"].append(time.perf_counter() - started)
                cache = out.past_key_values
    return {f"{k}_ms": round(1e3 * statistics.median(v), 3) for k, v in times.items()}


def keep_if_it_ranks_like(dtype: str, model, reference, ctx: BuildContext, tokenizer) -> tuple[str, dict]:
    """(`dtype` if `model` ranks the bundle's validation probes like the fp32 `reference`, else "fp32"; the
    comparison). Device-agnostic: the build runs it on the GPU."""
    config = ctx.config
    probes, source = load_probes(ctx.bundle, tokenizer, config.probe_users, config.prompt_tokens)
    runners = [TorchRunner("fp32", reference), TorchRunner(dtype, model)]
    quality = measure_quality(runners, runners[0], probes, config.generate_k, config.generate_probes,
                              bundle_generate_logit_weight(ctx.bundle))
    good = all(quality_ok(quality[dtype], quality["fp32"], config.min_agreement, config.max_ndcg_drop, mode)
               for mode in MODES)
    q = quality[dtype]
    verdict = f"{dtype}: {q['error']}" if "error" in q else (
        f"{dtype}: served top-1 agreement with fp32 {q['served_top1_agreement']:.2f}, generate first pick "
        f"{q['generate_first_agreement']:.2f}, the LLM's own top-1 {q['score_top1_agreement']:.2f} ({source}; bar "
        f"{config.min_agreement:g})")
    log.info("hf-cuda %s → %s", verdict, "kept" if good else "rejected, keeping fp32")
    return (dtype if good else "fp32"), {**quality, "verdict": ("kept: " if good else "rejected: ") + verdict}


def build(ctx: BuildContext) -> BuildResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, machine = ctx.config, ctx.machine
    dtype = gpu_dtype(config.dtype, machine.compute_capability, config.measure)
    attention, why = attention_choice()
    tokenizer = AutoTokenizer.from_pretrained(ctx.source)
    model = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=DTYPES[dtype], attn_implementation=attention)
    report = {"attention": {"implementation": attention, "why": why}}
    if config.measure:
        model.to("cuda").eval()
        if dtype != "fp32":
            reference = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=DTYPES["fp32"],
                                                             attn_implementation=attention).to("cuda").eval()
            dtype, report["quality"] = keep_if_it_ranks_like(dtype, model, reference, ctx, tokenizer)
            if dtype == "fp32":
                model = reference
            del reference
        report["latency_batch1"] = time_on_gpu(model, config.prompt_tokens, config.decode_steps)
        model.to("cpu")
    save_hf_build(ctx.out, model, tokenizer, dtype=dtype, quantization=None, num_threads=None,
                  attn_implementation=attention)
    meta = {"dtype": dtype, "quantization": None, "tensor_parallel_size": 1, "attn_implementation": attention,
            "requires_isa": [], "serves_modes": ["score", "generate"]}
    return BuildResult(meta, report, summary=f"{dtype} for SM {machine.compute_capability}, {attention} ({why})")
