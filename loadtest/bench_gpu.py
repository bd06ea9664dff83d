"""GPU benchmark: the `hf` ranking engine (in-flight batching, prefix KV reuse) on a random-weight
Llama-2-7B-shape model in bf16 on one CUDA GPU, against the GPU's physical limits.

    python -m loadtest.bench_gpu                  # on a CUDA machine; writes reports/gpu_bench.json + .md
                                                  # (= python -m loadtest.bench gpu where the serving stack is installed)

No weights are needed: `LlamaForCausalLM(config)` is initialised on the GPU (hidden 4096, 32
layers, 32 heads, intermediate 11008). Prompts are real PALR prompts (`palr.prompt`: profile,
history titles, 20 lettered candidates) through a real tokenizer: the SmolLM2 (Llama-family)
tokenizer by default, so the vocabulary is 49152 instead of Llama-2's 32000 (~0.35 B more
embedding/LM-head parameters, counted in the limits below). It is exported once from the GGUF
of `make data` into .cache/gpu-bench/tokenizer (`--prepare-only` does just that, on any machine;
carry that folder to a GPU machine that has no data/).

Measured (engine-level, no gRPC: neither the protobuf stubs nor grpc health/reflection are imported by
`python -m loadtest.bench_gpu`, so it runs on a stock CUDA image with torch and transformers):
    score mode   p50/p99 at batch 1 (one request at a time), throughput and p50/p99 at
                 concurrency 1, 8, 32 (closed loop, `engines.drive`)
    generate     time per output token at concurrency 1 (k labels; decode time / (tokens - 1)),
                 and generated tokens/s at concurrency 8 and 32
Physical limits (bf16, dense):
    decode step  >= weight bytes / memory bandwidth        (every weight is read once per step)
    prefill      >= 2 · params · prompt tokens / peak FLOP/s
The report gives measured / limit ratios (1.0 = at the limit). Peak numbers come from a table of
GPU names (H100 SXM: 3.35 TB/s, 989 TFLOP/s; H200: 4.8 TB/s, 989 TFLOP/s; ...) or the flags.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.report import machine_info, markdown_table, percentiles_ms, write_report

log = logging.getLogger(__name__)

TOKENIZER_CACHE = Path(".cache/gpu-bench/tokenizer")
GGUF_GLOB = "data/models/smollm2/*.gguf"

# name fragment → (memory bandwidth B/s, dense bf16 peak FLOP/s); first match wins (most specific first)
GPU_PEAKS: list[tuple[tuple[str, ...], float, float]] = [
    (("H200",), 4.8e12, 989e12),
    (("H100", "PCIe"), 2.0e12, 756e12),
    (("H100", "NVL"), 3.9e12, 835e12),
    (("H100",), 3.35e12, 989e12),            # SXM (HBM3)
    (("A100", "80GB"), 2.039e12, 312e12),    # SXM4 80GB (PCIe 80GB: 1.935 TB/s)
    (("A100",), 1.555e12, 312e12),
    (("L40S",), 0.864e12, 362e12),
    (("A10G",), 0.6e12, 70e12),
    (("L4",), 0.3e12, 121e12),
]


@dataclass
class GpuBenchConfig:
    out: Path = field(default=Path("reports"), metadata={"help": "where gpu_bench.json/.md go", "metavar": "DIR"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": f"Hugging Face tokenizer directory (default: {TOKENIZER_CACHE}, exported from the SmolLM2 GGUF "
                "if missing)", "metavar": "DIR"})
    prepare_only: bool = field(default=False, metadata={"help": "export the tokenizer and stop (no GPU needed)"})
    device: str = field(default="cuda", metadata={"help": "cuda (the benchmark); cpu only for a smoke run",
                                                  "choices": ("cuda", "cpu")})
    layers: int = field(default=32, metadata={"help": "decoder layers (Llama-2-7B: 32)"})
    hidden: int = field(default=4096, metadata={"help": "hidden size (Llama-2-7B: 4096)"})
    heads: int = field(default=32, metadata={"help": "attention heads = KV heads (Llama-2-7B: 32)"})
    intermediate: int = field(default=11008, metadata={"help": "MLP size (Llama-2-7B: 11008)"})
    dtype: str = field(default="bf16", metadata={"help": "weights and KV cache", "choices": ("bf16", "fp16", "fp32")})
    candidates: int = field(default=20, metadata={"help": "candidates per prompt (lettered labels)"})
    history: int = field(default=10, metadata={"help": "history titles per prompt"})
    score_requests: int = field(default=60, metadata={"help": "batch-1 score requests timed (after warm-up)"})
    requests: int = field(default=96, metadata={"help": "requests per concurrency level"})
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "closed-loop concurrency"})
    generate_k: int = field(default=10, metadata={"help": "labels generated per generate-mode request"})
    generate_requests: int = field(default=20, metadata={"help": "generate-mode requests at concurrency 1"})
    max_batch_size: int = field(default=32, metadata={"help": "engine slots (KV cache rows)"})
    max_tokens_per_step: int = field(default=4096, metadata={"help": "engine token budget per step"})
    max_seq_len: int = field(default=1024, metadata={"help": "KV slot length"})
    bandwidth: float = field(default=0.0, metadata={"help": "memory bandwidth in B/s (0: from the GPU name)"})
    peak_flops: float = field(default=0.0, metadata={"help": "dense peak FLOP/s in --dtype (0: from the GPU name)"})
    seed: int = field(default=0, metadata={"help": "random seed (weights, prompts)"})

    def __post_init__(self):
        if self.generate_k < 2:  # the time per output token is measured between generated tokens
            raise ValueError(f"--generate-k must be >= 2 (the time per output token needs two), got {self.generate_k}")
        if min(self.score_requests, self.requests, self.generate_requests) < 1 or not self.concurrency \
                or min(self.concurrency) < 1:
            raise ValueError("--score-requests, --requests, --generate-requests and --concurrency must be >= 1")


def gpu_peaks(name: str) -> tuple[float, float] | None:
    for fragments, bandwidth, flops in GPU_PEAKS:
        if all(f.lower() in name.lower() for f in fragments):
            return bandwidth, flops
    return None


def resolve_tokenizer(config: GpuBenchConfig) -> Path:
    """The tokenizer directory; exports the SmolLM2 tokenizer from the GGUF of `make data` once."""
    if config.tokenizer:
        return config.tokenizer
    if (TOKENIZER_CACHE / "tokenizer.json").is_file():
        return TOKENIZER_CACHE
    ggufs = sorted(Path().glob(GGUF_GLOB))
    if not ggufs:
        raise SystemExit(f"no tokenizer: pass --tokenizer DIR, or run `make data` (for {GGUF_GLOB}) and "
                         f"`python -m loadtest.bench gpu --prepare-only`, then carry {TOKENIZER_CACHE.parent}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name)
    tokenizer.save_pretrained(TOKENIZER_CACHE)
    log.info("exported the tokenizer of %s to %s", ggufs[0], TOKENIZER_CACHE)
    return TOKENIZER_CACHE


def build_model(config: GpuBenchConfig, vocab_size: int, tokenizer):
    """A random-weight Llama of the configured shape, created directly on the device in --dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.dtype]
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=config.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)
    torch.manual_seed(config.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(config.device):
            model = LlamaForCausalLM(llama)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def build_requests(config: GpuBenchConfig, tokenizer, n: int, mode: str, tag: str):
    """PALR prompts (real prompt builder, real tokenizer) over synthetic titles, one shared prefix."""
    from palr.prompt import PalrPrompt, Title
    from ranking_server.engines.base import EngineRequest

    prompt = PalrPrompt(tokenizer)
    rng = random.Random(f"{config.seed}-{tag}")
    titles = [Title(f"Film {i} {w}", str(1950 + i % 70)) for i, w in
              enumerate(rng.choices(["Night", "River", "Return", "Summer", "Empire", "Storm", "Garden"], k=2000))]
    requests = []
    for i in range(n):
        chosen = rng.sample(titles, config.history + config.candidates)
        parts = prompt.retrieval("drama, comedy, 1990s", chosen[:config.history], chosen[config.history:])
        requests.append(EngineRequest(f"{tag}{i}", parts.prefix_ids, parts.suffix_ids, parts.label_token_ids,
                                      mode=mode, k=config.generate_k))
    return requests


async def one_at_a_time(engine, requests) -> list:
    return [await engine.rank(r) for r in requests]


def run(config: GpuBenchConfig) -> dict:
    tokenizer_dir = resolve_tokenizer(config)
    if config.prepare_only:
        return {"tokenizer": str(tokenizer_dir)}
    import torch
    from transformers import AutoTokenizer

    from ranking_server.engines.config import EngineConfig
    from ranking_server.engines.hf import HFEngine

    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU (use --device cpu only for a smoke run)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    model = build_model(config, len(tokenizer), tokenizer)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("model: %.2f B parameters, %.1f GB of weights on %s, built in %.1f s", params / 1e9, weight_bytes / 1e9,
             config.device, time.perf_counter() - started)
    engine = HFEngine(model, EngineConfig(max_batch_size=config.max_batch_size,
                                          max_tokens_per_step=config.max_tokens_per_step,
                                          max_queue=max(config.requests, 64), max_seq_len=config.max_seq_len))
    report: dict = {"benchmark": "gpu", "config": {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in asdict(config).items()},
                    "machine": machine_info(), "device": device_info(config.device),
                    "model": {"parameters": params, "weight_bytes": weight_bytes, "vocab_size": len(tokenizer),
                              "attention": model.config._attn_implementation, "tokenizer": str(tokenizer_dir)}}
    try:
        report.update(measure(engine, config, tokenizer))
    finally:
        engine.close()
    report["limits"] = physical_limits(report, params, weight_bytes, config)
    write_report(config.out, "gpu_bench", report, markdown(report))
    log.info("wrote %s/gpu_bench.json and .md", config.out)
    return report


def measure(engine, config: GpuBenchConfig, tokenizer) -> dict:
    from loadtest.drive import drive

    warm = build_requests(config, tokenizer, 4, "score", "warm-s") + build_requests(config, tokenizer, 2, "generate",
                                                                                   "warm-g")
    asyncio.run(one_at_a_time(engine, warm))
    score = build_requests(config, tokenizer, config.score_requests, "score", "s")
    prompt_tokens = statistics.median(len(r.input_ids) for r in score)
    results = asyncio.run(one_at_a_time(engine, score))
    batch1 = [r.timings.total_ms / 1e3 for r in results]
    out = {"prompt_tokens_median": prompt_tokens, "prefix_tokens": len(score[0].prefix_ids),
           "score_batch1": {**percentiles_ms(batch1), "cached_tokens_median": statistics.median(
               r.cached_tokens for r in results)}}
    levels = []
    for c in config.concurrency:
        requests = build_requests(config, tokenizer, config.requests, "score", f"c{c}-")
        result = asyncio.run(drive(engine, requests, c, f"score c={c}"))
        levels.append({"mode": "score", "concurrency": c, **result.summary(),
                       **percentiles_ms([x / 1e3 for x in result.latencies_ms])})
    generate = build_requests(config, tokenizer, config.generate_requests, "generate", "g")
    results = asyncio.run(one_at_a_time(engine, generate))
    tpot = [r.timings.decode_ms / (r.generated_tokens - 1) for r in results if r.generated_tokens > 1]
    out["generate_batch1"] = {"time_per_output_token_ms": round(statistics.median(tpot), 3),
                              "prefill_ms": round(statistics.median(r.timings.prefill_ms for r in results), 3),
                              "total_ms": round(statistics.median(r.timings.total_ms for r in results), 3),
                              "tokens": config.generate_k}
    for c in [c for c in config.concurrency if c > 1]:
        requests = build_requests(config, tokenizer, config.requests, "generate", f"gc{c}-")
        before = engine.stats().generated_tokens
        result = asyncio.run(drive(engine, requests, c, f"generate c={c}"))
        tokens = engine.stats().generated_tokens - before
        levels.append({"mode": "generate", "concurrency": c, **result.summary(),
                       **percentiles_ms([x / 1e3 for x in result.latencies_ms]),
                       "generated_tokens_per_s": round(tokens / result.wall_s, 1)})
    out["levels"] = levels
    return out


def device_info(device: str) -> dict:
    import torch

    if device != "cuda":
        return {"device": device}
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return {"device": "cuda", "name": props.name, "compute_capability": f"{major}.{minor}",
            "memory_gb": round(props.total_memory / 1e9, 1), "torch": torch.__version__, "cuda": torch.version.cuda}


def physical_limits(report: dict, params: int, weight_bytes: int, config: GpuBenchConfig) -> dict:
    """Lower bounds from bandwidth and compute, and measured / bound ratios."""
    peaks = gpu_peaks(report["device"].get("name", "")) if config.device == "cuda" else None
    bandwidth = config.bandwidth or (peaks[0] if peaks else 0.0)
    flops = config.peak_flops or (peaks[1] if peaks else 0.0)
    if not (bandwidth and flops):
        return {"note": "no peak numbers for this device: pass --bandwidth and --peak-flops"}
    tokens = report["prompt_tokens_median"]
    decode_floor_ms = 1e3 * weight_bytes / bandwidth
    prefill_floor_ms = 1e3 * 2 * params * tokens / flops
    measured_tpot = report["generate_batch1"]["time_per_output_token_ms"]
    measured_score = report["score_batch1"]["p50_ms"]
    uncached = tokens - report["score_batch1"]["cached_tokens_median"]
    return {"bandwidth_bytes_per_s": bandwidth, "peak_flops": flops,
            "decode_step_floor_ms": round(decode_floor_ms, 3),
            "decode_step_measured_ms": measured_tpot,
            "decode_ratio": round(measured_tpot / decode_floor_ms, 2),
            "prefill_floor_ms": round(prefill_floor_ms, 3),
            "prefill_floor_uncached_ms": round(1e3 * 2 * params * uncached / flops, 3),
            "score_batch1_p50_ms": measured_score,
            "score_ratio_to_full_prefill_floor": round(measured_score / prefill_floor_ms, 2),
            "score_throughput_ceiling_rps": round(flops / (2 * params * uncached), 1),
            "note": "score mode runs only the non-prefix tokens when the prefix KV is reused; ratios > 1 are "
                    "distance from the hardware limit"}


def markdown(report: dict) -> str:
    limits, device = report["limits"], report["device"]
    shape = report["config"]
    lines = [f"# GPU benchmark: hf engine, Llama {shape['layers']} layers x hidden {shape['hidden']} "
             f"({shape['dtype']}, random weights)", "",
             f"Device: {device.get('name', device['device'])} (SM {device.get('compute_capability', '-')}), "
             f"{report['model']['parameters'] / 1e9:.2f} B parameters, vocab {report['model']['vocab_size']}; "
             f"median prompt {report['prompt_tokens_median']} tokens ({report['prefix_tokens']} shared prefix). "
             f"Load average {report['machine']['load_average_1_5_15']}.", "",
             f"Score mode, batch 1: p50 {report['score_batch1']['p50_ms']} ms, p99 {report['score_batch1']['p99_ms']} ms.",
             f"Generate mode, batch 1: {report['generate_batch1']['time_per_output_token_ms']} ms per output token "
             f"({report['generate_batch1']['tokens']} tokens, total {report['generate_batch1']['total_ms']} ms).", "",
             markdown_table(report["levels"], ["mode", "concurrency", "throughput_rps", "p50_ms", "p99_ms", "mean_batch",
                                               "generated_tokens_per_s"]), ""]
    if "decode_ratio" in limits:
        lines += ["Physical limits:", "",
                  markdown_table([
                      {"what": "decode step (batch 1)", "floor_ms": limits["decode_step_floor_ms"],
                       "measured_ms": limits["decode_step_measured_ms"], "ratio": limits["decode_ratio"]},
                      {"what": "score request (prefill, batch 1)", "floor_ms": limits["prefill_floor_ms"],
                       "measured_ms": limits["score_batch1_p50_ms"],
                       "ratio": limits["score_ratio_to_full_prefill_floor"]}],
                      ["what", "floor_ms", "measured_ms", "ratio"]),
                  "", f"Floors: decode = weight bytes / {limits['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; prefill = "
                      f"2 · params · tokens / {limits['peak_flops'] / 1e12:.0f} TFLOP/s (without prefix reuse: "
                      f"{limits['prefill_floor_uncached_ms']} ms for the uncached part only)."]
    else:
        lines.append(limits["note"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.bench_gpu [options]` (the same as `python -m loadtest.bench gpu`)."""
    from palr.cli import config_main

    return config_main(argv, "python -m loadtest.bench_gpu", __doc__, GpuBenchConfig, run)

if __name__ == "__main__":
    sys.exit(main())
