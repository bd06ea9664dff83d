"""`hf-cpu`: the merged checkpoint in the dtype and thread count that are fastest on this CPU
without ranking worse than fp32.

Candidates (each a `TorchRunner` on the same weights): fp32; bf16 (fast only with AVX512-BF16 or
AMX, emulated otherwise); bf16-body ("bf16 body, fp32 head": decoder layers in bf16, final norm, LM
head and scores in fp32, `palr.precision.body_dtype`); bf16-body-fp32-last (the same with the last
decoder layer in fp32 too: the 4-layer ranker's bf16-body sits at the quality bar, this one above it);
dynamic int8 (torch.ao `quantize_dynamic`:
int8 weights for the decoder's Linear layers, activations quantized per call; fbgemm needs AVX2);
int8-wo (torchao int8 weight-only of the same layers; needs torchao). The bf16 candidates are
measured only where the CPU has native bf16 (avx512_bf16 or amx_bf16 in `palr.machine`'s ISA
flags); elsewhere the report says "not measured: ..." and they are never picked. A candidate replaces fp32 only
if it ranks like fp32 (top-1 agreement ≥ --min-agreement, NDCG@10 drop ≤ --max-ndcg-drop) AND is
at least --min-gain faster in both modes (score = prefill; generate = prefill + decode steps): one
model serves both modes. Then the thread count (1..cores) is measured for the winner.
"""

from __future__ import annotations

import copy
import logging

import torch

from compile.targets import BuildContext, BuildResult
from compile.targets.measure import (
    TorchRunner, bundle_generate_logit_weight, latency_prompt, load_average, load_probes, measure_latency,
    measure_quality, mode_latency_ms, quality_ok)
from palr.builds import TORCHAO, isa_satisfied
from palr.machine import cpu_cores, torch_threads
from palr.ranking import MODES
from palr.precision import INT8_WEIGHT_ONLY, body_dtype, int8_weight_only, torchao_version
from palr.hf_build import DTYPES, DYNAMIC_INT8, quantize_dynamic_int8, save_hf_build

log = logging.getLogger(__name__)

NATIVE_BF16 = "amx_bf16|avx512_bf16"
# What a candidate needs from the CPU to run as measured ("a|b": either).
REQUIRES_ISA = {"fp32": [], "bf16": [NATIVE_BF16], "bf16-body": [NATIVE_BF16], "bf16-body-fp32-last": [NATIVE_BF16],
                "int8": ["avx2"], "int8-wo": []}
LABELS = {"fp32": "fp32", "bf16": "bf16", "bf16-body": "bf16 body, fp32 head",
          "bf16-body-fp32-last": "bf16 body, last layer and head fp32", "int8": "dynamic int8",
          "int8-wo": "int8 weight-only (torchao)"}
# How each candidate is saved (build.json): the fp32 checkpoint plus what to apply at load, or plain bf16.
BUILD_RECORDS = {
    "fp32": {"dtype": "fp32", "quantization": None, "body_dtype": None},
    "bf16": {"dtype": "bf16", "quantization": None, "body_dtype": None},
    "bf16-body": {"dtype": "fp32", "quantization": None, "body_dtype": "bf16"},
    "bf16-body-fp32-last": {"dtype": "fp32", "quantization": None, "body_dtype": "bf16", "fp32_last_layers": 1},
    "int8": {"dtype": "fp32", "quantization": DYNAMIC_INT8, "body_dtype": None},
    "int8-wo": {"dtype": "fp32", "quantization": INT8_WEIGHT_ONLY, "body_dtype": None},
}
CANDIDATES = tuple(BUILD_RECORDS)


def variant(model, dtype: str):
    """A copy of the fp32 model as candidate `dtype` (fp32 is the model itself)."""
    if dtype == "fp32":
        return model
    if dtype == "int8":
        return quantize_dynamic_int8(copy.deepcopy(model))
    if dtype == "int8-wo":
        return int8_weight_only(copy.deepcopy(model))
    record = BUILD_RECORDS[dtype]
    if record["body_dtype"]:
        return body_dtype(copy.deepcopy(model), DTYPES[record["body_dtype"]], record.get("fp32_last_layers", 0))
    return copy.deepcopy(model).to(DTYPES[dtype])


def plan_candidates(requested, cpu_isa, torchao: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(the candidates to measure, fp32 first; {candidate: why it is not measured}) on a CPU with
    ISA flags `cpu_isa`. A bf16 candidate on a CPU without native bf16 is never measured (it would be
    emulated, ~5x slower) and so never picked; int8-wo needs torchao (`torchao`: its version or None)."""
    unknown = [d for d in requested if d not in BUILD_RECORDS]
    if unknown:
        raise ValueError(f"hf-cpu candidates are {', '.join(CANDIDATES)}, not {', '.join(unknown)}")
    measured, skipped = [], {}
    for dtype in dict.fromkeys(["fp32", *requested]):
        missing = [r for r in REQUIRES_ISA[dtype] if not isa_satisfied(r, tuple(cpu_isa))]
        if missing:
            skipped[dtype] = f"not measured: CPU lacks {'/'.join(m.replace('|', '/') for m in missing)}"
        elif dtype == "int8-wo" and torchao is None:
            skipped[dtype] = "not measured: torchao is not installed (pip install 'palr-serving[cpu-quant]')"
        else:
            measured.append(dtype)
    return measured, skipped


def choose(latency: dict, quality: dict, config) -> tuple[str, dict[str, str]]:
    """The kept dtype and, per candidate, why it was kept or not (with its ratios to fp32)."""
    ref_lat, ref_q = latency["fp32"], quality["fp32"]
    verdicts, winners = {"fp32": "reference"}, []
    for dtype in latency:
        if dtype == "fp32":
            continue
        ratios = {m: mode_latency_ms(latency[dtype], m, config.generate_tokens)
                  / mode_latency_ms(ref_lat, m, config.generate_tokens) for m in MODES}
        good = all(quality_ok(quality[dtype], ref_q, config.min_agreement, config.max_ndcg_drop, m) for m in MODES)
        faster = all(r <= 1 - config.min_gain for r in ratios.values())
        q = quality[dtype]
        if "error" in q:
            verdicts[dtype] = f"rejected: {LABELS.get(dtype, dtype)}: {q['error']}"
            continue
        why = (f"{LABELS.get(dtype, dtype)}: score {ratios['score']:.2f}x, generate {ratios['generate']:.2f}x fp32 "
               f"latency; served top-1 agreement {q['served_top1_agreement']:.2f}, generate first pick "
               f"{q['generate_first_agreement']:.2f} ({q['generate_first_probes']} probes, on "
               f"{ref_q['served_decisive_probes']} of which the LLM can move the served first pick; the LLM's own "
               f"top-1 {q['score_top1_agreement']:.2f})")
        verdicts[dtype] = ("kept: " if good and faster else "rejected: ") + why + (
            "" if good else " (ranks differently)") + ("" if faster else " (not faster in both modes)")
        if good and faster:
            winners.append(dtype)
    best = min(winners, key=lambda d: mode_latency_ms(latency[d], "score", config.generate_tokens), default="fp32")
    for dtype in winners:  # passed the bar, but only the fastest is kept
        if dtype != best:
            verdicts[dtype] = verdicts[dtype].replace("kept: ", f"rejected: passes, but {LABELS.get(best, best)} is "
                                                                f"faster; ", 1)
    return best, verdicts


def measure_threads(runner: TorchRunner, ids: list[int], config) -> tuple[int, dict]:
    """Latency at 1..cores threads (interleaved); the count with the lowest score-mode latency."""
    rows = {}
    for _ in range(config.repeats):
        for n in range(1, cpu_cores() + 1):
            with torch_threads(n):
                rows.setdefault(n, {"prefill": [], "decode": []})
                rows[n]["prefill"].append(runner.prefill(ids))
                rows[n]["decode"].append(runner.decode(ids, config.decode_steps))
    table = {n: {"prefill_ms": round(1e3 * sorted(r["prefill"])[len(r["prefill"]) // 2], 3),
                 "decode_ms": round(1e3 * sorted(r["decode"])[len(r["decode"]) // 2], 3)} for n, r in rows.items()}
    return min(table, key=lambda n: table[n]["prefill_ms"]), table


def build(ctx: BuildContext) -> BuildResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = ctx.config
    tokenizer = AutoTokenizer.from_pretrained(ctx.source)
    model = AutoModelForCausalLM.from_pretrained(ctx.source, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    report: dict = {"load_average_before": load_average()}
    if config.measure:
        dtype, threads = measure_and_choose(ctx, model, tokenizer, report)
    else:
        dtype = "fp32" if config.dtype == "auto" else config.dtype
        if dtype not in REQUIRES_ISA:
            raise ValueError(f"hf-cpu builds {', '.join(CANDIDATES)}, not {dtype}")
        _, skipped = plan_candidates([dtype], ctx.machine.cpu_isa, torchao_version())
        if dtype in skipped:  # unmeasured is no excuse for a build this machine cannot run
            raise ValueError(f"--dtype {dtype}: {skipped[dtype]}")
        threads = config.threads or None
        report["decision"] = f"--no-measure: {dtype} as asked"
    report["load_average_after"] = load_average()
    record = save_hf_build(ctx.out, model, tokenizer, **BUILD_RECORDS[dtype], num_threads=threads,
                           attn_implementation="sdpa")
    meta = {"dtype": dtype, "quantization": record["quantization"], "body_dtype": record["body_dtype"],
            "fp32_last_layers": record["fp32_last_layers"], "tensor_parallel_size": 1, "num_threads": threads,
            "attn_implementation": record["attn_implementation"], "requires_isa": REQUIRES_ISA[dtype],
            "serves_modes": list(MODES)}
    if record["quantization"] == INT8_WEIGHT_ONLY:
        meta[TORCHAO] = torchao_version()
    # why this precision, and why not each other one (the build's report has the measurements behind them)
    meta |= {"decision": report["decision"], **({"verdicts": report["verdicts"]} if "verdicts" in report else {})}
    return BuildResult(meta, report, summary=f"{dtype}, {threads or 'default'} threads; {report['decision']}")


def measure_and_choose(ctx: BuildContext, model, tokenizer, report: dict) -> tuple[str, int | None]:
    config = ctx.config
    requested = [config.dtype] if config.dtype != "auto" else list(config.candidates)
    candidates, skipped = plan_candidates(requested, ctx.machine.cpu_isa, torchao_version())
    if config.dtype != "auto" and config.dtype not in candidates:
        raise ValueError(f"--dtype {config.dtype}: {skipped[config.dtype]}")
    for dtype, why in skipped.items():
        log.info("hf-cpu %s: %s", dtype, why)
    probes, source = load_probes(ctx.bundle, tokenizer, config.probe_users, config.prompt_tokens)
    ids = latency_prompt(probes, config.prompt_tokens)
    # timed at the count that will serve: --threads (else torch's default, and the winner's count is scanned after)
    runners = [TorchRunner(d, variant(model, d), threads=config.threads) for d in candidates]
    latency_threads = config.threads or torch.get_num_threads()
    log.info("hf-cpu: measuring %s on %s (latency: %d-token prompt, %d rounds; quality: %s)", ", ".join(candidates),
             ctx.machine.cpu_name, len(ids), config.repeats, source)
    latency = measure_latency(runners, ids, config.repeats, config.decode_steps)
    quality = measure_quality(runners, runners[0], probes, config.generate_k, config.generate_probes,
                              bundle_generate_logit_weight(ctx.bundle))
    best, verdicts = choose(latency, quality, config)
    if config.dtype != "auto":
        best = config.dtype
        if "error" in quality[best]:  # every request would degrade: refuse the build rather than ship it
            raise ValueError(f"--dtype {best}: {quality[best]['error']}")
        verdicts[best] = f"kept: --dtype {best} asked for; measured: {verdicts[best]}"
    threads, thread_table = (config.threads, {}) if config.threads else measure_threads(
        next(r for r in runners if r.name == best), ids, config)
    verdicts.update(skipped)
    report.update({"probes": source, "latency_prompt_tokens": len(ids), "latency_threads": latency_threads,
                   "latency": latency, "quality": quality,
                   "candidates": {d: LABELS[d] for d in [*candidates, *skipped]}, "verdicts": verdicts, "threads": thread_table, "chosen_threads": threads,
                   "decision": f"kept {best} ({verdicts[best]})"})
    for dtype in candidates:  # the verdict names an unmeasurable candidate's error
        q = quality[dtype]
        log.info("hf-cpu %-5s prefill %.1f ms, decode %.2f ms/token%s%s → %s", dtype,
                 latency[dtype]["prefill_ms"], latency[dtype]["decode_ms"],
                 f", served top-1 agreement {q['served_top1_agreement']:.2f}" if "error" not in q else "",
                 f", served NDCG@10 {q['served_ndcg@10']:.4f}" if "served_ndcg@10" in q else "", verdicts[dtype])
    return best, threads
