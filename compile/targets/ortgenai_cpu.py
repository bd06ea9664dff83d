"""`ortgenai-cpu`: the merged checkpoint through onnxruntime-genai's model builder (`-e cpu`), kept
for the ranking modes where it measures faster than torch without ranking differently.

    python -m onnxruntime_genai.models.builder -m SRC -i SRC -o OUT -p fp32|int4 -e cpu -c CACHE

Each precision asked for (default: fp32 and int4) is built, then measured side by side with torch on
the same prompts: latency per mode (score = prefill; generate = prefill + decode steps) against the torch
model that would serve the mode otherwise (the bundle's hf-cpu build when it has one for this machine, its
precision; else fp32), and quality per mode against torch fp32 (score: top-1 agreement and NDCG@10;
generate: first-pick agreement). A mode is won when the precision is at least --min-gain faster there
AND ranks like torch there. The precision
that wins the most modes is kept (ties: the faster generate mode); its won modes are recorded as
`serves_modes`, which is what the ranking server routes to it (the rest stays on torch). When no
mode is won, the build is still written (so the numbers are on record) with `serves_modes: []`,
and the server refuses `--engine ortgenai` for it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

from compile.targets import BuildContext, BuildResult
from compile.steps import StepFailed
from compile.targets.measure import (
    OrtGenaiRunner, TorchRunner, bundle_generate_logit_weight, latency_prompt, latency_readout_stops, load_average,
    load_probes, measure_latency, measure_quality, mode_latency_ms, quality_ok)
from palr.builds import routing_baseline
from palr.machine import cpu_cores
from palr.ortgenai_runtime import import_ortgenai
from palr.ranking import MODES

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int4")


def run_model_builder(source, out, precision: str, cache) -> None:
    """onnxruntime-genai's model builder as a subprocess (it is a CLI; its log goes to ours on failure)."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(source), "-i", str(source),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise StepFailed(f"onnxruntime-genai model builder failed ({' '.join(command)}):\n{done.stderr[-4000:]}")


def set_threads(model_dir, threads: int) -> None:
    """Writes the intra-op thread count into genai_config.json (what the engine loads with)."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4) + "\n")


def modes_won(latency: dict, quality: dict, name: str, config, baseline: str = "torch-fp32"
              ) -> tuple[list[str], dict[str, str]]:
    """The modes where runner `name` is faster than `baseline` (the torch model that would serve them) and
    ranks like torch fp32; why, per mode."""
    won, why = [], {}
    for mode in MODES:
        ratio = (mode_latency_ms(latency[name], mode, config.generate_tokens)
                 / mode_latency_ms(latency[baseline], mode, config.generate_tokens))
        good = quality_ok(quality[name], quality["torch-fp32"], config.min_agreement, config.max_ndcg_drop, mode)
        fast = ratio <= 1 - config.min_gain
        why[mode] = (f"{ratio:.2f}x {baseline} latency, "
                     + ("ranks like torch" if good else quality[name].get("error", "ranks differently"))
                     + ("" if fast else ", not faster"))
        if good and fast:
            won.append(mode)
    return won, why


def build(ctx: BuildContext) -> BuildResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_ortgenai()  # clear error when onnxruntime-genai is missing, before any work
    config = ctx.config
    precisions = list(PRECISIONS) if config.dtype == "auto" else [config.dtype]
    if any(p not in PRECISIONS for p in precisions):
        raise ValueError(f"ortgenai-cpu builds {' or '.join(PRECISIONS)}, not {config.dtype}")
    threads = config.threads or cpu_cores()
    staging = ctx.out.parent / f"{ctx.out.name}.candidates"  # next to this build's own scratch directory
    shutil.rmtree(staging, ignore_errors=True)
    try:
        dirs = {}
        for precision in precisions:
            dirs[precision] = staging / precision
            run_model_builder(ctx.source, dirs[precision], precision, staging / "cache")
            set_threads(dirs[precision], threads)
            log.info("ortgenai-cpu: built %s → %s", precision, dirs[precision])
        report: dict = {"load_average_before": load_average(), "threads": threads}
        if config.measure:
            tokenizer = AutoTokenizer.from_pretrained(ctx.source)
            reference = TorchRunner("torch-fp32", AutoModelForCausalLM.from_pretrained(
                ctx.source, dtype=torch.float32, attn_implementation="sdpa").eval().requires_grad_(False))
            served = served_torch(ctx.bundle)
            torch.set_num_threads(threads)  # torch and onnxruntime-genai on the same threads
            kept, won = measure_and_choose(ctx, reference, tokenizer, dirs, threads, report, served)
        else:
            kept, won = precisions[0], list(MODES)
            report["decision"] = f"--no-measure: {kept} for every mode, as asked"
        report["load_average_after"] = load_average()
        shutil.rmtree(ctx.out)
        shutil.move(str(dirs[kept]), ctx.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = {"dtype": kept, "quantization": "int4-rtn" if kept == "int4" else None, "tensor_parallel_size": 1,
            "num_threads": threads, "requires_isa": [], "serves_modes": won,
            # what the modes were measured against (the server warns when it changed since)
            "routing_baseline": routing_baseline(ctx.bundle) if config.measure and served else None}
    if not won:
        log.warning("ortgenai-cpu: %s wins no ranking mode on this machine; the server will not serve it", kept)
    return BuildResult(meta, report, summary=f"{kept}, serves {', '.join(won) or 'no mode'}; {report['decision']}")


def served_torch(bundle) -> TorchRunner | None:
    """The bundle's hf-cpu build, when it has one made for this machine: what serves the modes onnxruntime-genai
    does not win, so what it has to beat."""
    import torch

    from palr.hf_build import load_bundle_hf_cpu

    loaded = load_bundle_hf_cpu(bundle, without="ortgenai-cpu measures latency against torch fp32")
    if not loaded:
        return None
    model, entry, threads = loaded  # timed at the count the server runs it with (it set ortgenai's count before)
    return TorchRunner(f"torch-hf-cpu-{entry.get('dtype')}", model, threads=threads or torch.get_num_threads())


def measure_and_choose(ctx: BuildContext, reference: TorchRunner, tokenizer, dirs: dict, threads: int,
                       report: dict, served: TorchRunner | None = None) -> tuple[str, list[str]]:
    """Measure every precision beside torch fp32 (the quality reference) and `served` (the latency baseline,
    when the bundle has an hf-cpu build); keep the precision that wins the most modes."""
    config = ctx.config
    probes, source = load_probes(ctx.bundle, tokenizer, config.probe_users, config.prompt_tokens)
    ids = latency_prompt(probes, config.prompt_tokens)
    baseline = served or reference
    stops = latency_readout_stops(probes, len(ids))
    runners = [reference, *([served] if served else [])] + [OrtGenaiRunner(f"ortgenai-{p}", d, threads, stops)
                                                           for p, d in dirs.items()]
    log.info("ortgenai-cpu: measuring %s (latency: %d-token prompt, %d rounds, %d threads; quality: %s)",
             ", ".join(r.name for r in runners), len(ids), config.repeats, threads, source)
    latency = measure_latency(runners, ids, config.repeats, config.decode_steps)
    quality = measure_quality(runners, reference, probes, config.generate_k, config.generate_probes,
                              bundle_generate_logit_weight(ctx.bundle))
    verdicts = {p: modes_won(latency, quality, f"ortgenai-{p}", config, baseline.name) for p in dirs}
    kept = max(dirs, key=lambda p: (len(verdicts[p][0]),
                                    -mode_latency_ms(latency[f"ortgenai-{p}"], "generate", config.generate_tokens)))
    won = verdicts[kept][0]
    for runner in runners:
        q = quality[runner.name]
        log.info("ortgenai-cpu %-14s prefill %.1f ms, decode %.2f ms/token, %s", runner.name,
                 latency[runner.name]["prefill_ms"], latency[runner.name]["decode_ms"], q["error"] if "error" in q else
                 f"served top-1 agreement {q['served_top1_agreement']:.2f}, generate agreement "
                 f"{q['generate_first_agreement']:.2f}")
    report.update({"probes": source, "latency_prompt_tokens": len(ids), "latency_baseline": baseline.name,
                   "latency_baseline_threads": baseline.threads or threads,
                   "latency": latency, "quality": quality,
                   "modes": {p: {"won": w, "why": why} for p, (w, why) in verdicts.items()},
                   "decision": f"kept {kept}: wins {', '.join(won) or 'no mode'} "
                               f"({'; '.join(f'{m}: {verdicts[kept][1][m]}' for m in MODES)})"})
    return kept, won
