"""`compile build --target hf-cpu|hf-cuda|ortgenai-cpu|trtllm`: a deployment build of the merged
ranker (`llm/merged/`) pinned to this machine → `engines/<target>/`, manifest artifact `engine:<target>`.

    hf-cpu        measures fp32 vs bf16 vs dynamic int8 (and the thread count) on this CPU, side by
                  side: prefill of a ~350-token prompt, one decode step, and ranking quality against
                  fp32 on validation users; keeps the fastest that ranks like fp32
    ortgenai-cpu  onnxruntime-genai model builder (fp32 and int4), measured against torch fp32 per
                  ranking mode; records the modes where it wins (`serves_modes`)
    hf-cuda       bf16 (fp16 before SM 8.0) checkpoint, SDPA attention, for this GPU
    trtllm        TensorRT-LLM engine via the LLM API: bf16/fp16, optional FP8 / INT4-AWQ, paged KV
                  cache, paged context FMHA (KV block reuse), generation logits for score mode

With no --target: a visible CUDA GPU gives trtllm when TensorRT-LLM is installed, else hf-cuda;
no GPU gives hf-cpu. The manifest entry records the target, device name, SM, CPU ISA flags, dtype,
tensor-parallel size, library versions, build options and the sha256 of every file; servers
refuse a build that does not match their machine (palr/builds.py). Re-running with unchanged
inputs reuses the build after the same check (a build made elsewhere is refused; --force rebuilds).
Measurements go to reports/build_<target>.json.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile.llm_common import preset_flag
from compile.steps import StepFailed
from compile.targets import BUILDERS, BuildContext
from palr.bundle import Bundle, file_checksums, fingerprint, write_atomically
from palr.builds import SOURCE, artifact_name, open_build, ranker_version
from palr.machine import Machine, cuda_devices, library_version
from palr.ranking import generate_logit_weight, load_ranker
from palr.targets import TARGETS, target_spec

log = logging.getLogger(__name__)

VERSION = 1
DTYPES = ("auto", "fp32", "bf16", "bf16-body", "bf16-body-fp32-last", "fp16", "int8", "int8-wo", "int4")
QUANTIZATIONS = ("none", "fp8", "int4_awq")
INSTALL_HINTS = {
    "hf-cpu": "pip install -e '.[serve]' (after the CPU torch pin, see the Makefile)",
    "hf-cuda": "install a CUDA build of torch, then pip install -e '.[serve]'",
    "ortgenai-cpu": "pip install -e '.[ortgenai]' (onnxruntime-genai==0.18.0, onnx-ir)",
    "trtllm": ("TensorRT-LLM needs Linux with an NVIDIA GPU and CUDA: build inside the NGC image "
               "nvcr.io/nvidia/tensorrt-llm/release (deploy/docker/Dockerfile.trtllm) or pip install tensorrt-llm"),
}


@dataclass
class BuildConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs llm/merged)"})
    target: str | None = field(default=None, metadata={
        "help": "hardware target; omitted: CUDA visible → trtllm if TensorRT-LLM is installed, else hf-cuda; "
                "no CUDA → hf-cpu", "choices": tuple(TARGETS)})
    dtype: str = field(default="auto", metadata={
        "help": "auto: measured (CPU targets) or bf16 (fp16 before SM 8.0) on GPUs; hf-cpu: fp32|bf16|bf16-body "
                "(bf16 body, fp32 head)|bf16-body-fp32-last (and the last layer fp32)|int8 (dynamic int8)|int8-wo (torchao weight-only), ortgenai-cpu: fp32|int4, GPUs: bf16|fp16", "choices": DTYPES})
    quantization: str = field(default="none", metadata={
        "help": "trtllm only: fp8 (FP8 weights/activations + FP8 KV cache, SM 8.9+) or int4_awq (W4A16 AWQ)",
        "choices": QUANTIZATIONS})
    calib_dataset: str = field(default="cnn_dailymail", metadata={
        "help": "trtllm quantization calibration data: a Hugging Face dataset name or a local dataset path"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel size (GPUs per engine; trtllm)"})
    max_batch_size: int = field(default=64, metadata={"help": "trtllm: largest in-flight batch the engine supports"})
    max_num_tokens: int = field(default=8192, metadata={"help": "trtllm: most tokens one engine iteration runs"})
    max_input_len: int = field(default=2048, metadata={"help": "trtllm: longest prompt"})
    max_seq_len: int = field(default=2560, metadata={"help": "trtllm: prompt + generated tokens"})
    threads: int = field(default=0, metadata={
        "help": "CPU targets: intra-op threads (0: hf-cpu measures 1..cores and keeps the fastest; ortgenai-cpu "
                "runs on every core)"})
    measure: bool = field(default=True, metadata={
        "help": "measure the candidates side by side and keep the winner (hf-cuda: bf16 against the fp32 quality "
                "bar); --no-measure takes --dtype (auto: fp32) without measuring or the quality bar (trtllm: not "
                "read)"})
    candidates: list[str] = field(default_factory=lambda: [
        "fp32", "bf16", "bf16-body", "bf16-body-fp32-last", "int8", "int8-wo"], metadata={
        "help": "hf-cpu: dtypes measured against each other (fp32 is always the reference; the bf16 ones only "
                "where the CPU has avx512_bf16 or amx_bf16)"})
    probe_users: int = field(default=100, metadata={
        "help": "validation prompts for the quality comparison: enough to tell a candidate's top-1 agreement from "
                "the --min-agreement bar (with 8, one reordered probe is 0.875 and fails 0.9; a 4-layer ranker's "
                "bf16-body measured 0.875 on 8 and 16 probes, 0.88 and 0.94 in two builds on 100)"})
    generate_probes: int = field(default=8, metadata={
        "help": "of those, how many also generate whole lists (exact-list agreement, for the record); generate "
                "mode's first pick, what the quality bar reads, comes from each probe's prompt pass, so it is "
                "measured on all of them"})
    generate_k: int = field(default=5, metadata={"help": "labels generated per probe in the quality comparison"})
    generate_tokens: int = field(default=0, metadata={
        "help": "tokens of a generate-mode request in the latency model (prefill + (n-1) decode steps); 0: what "
                "llm/ranker.json generates (1 at generate_logit_weight 0: no decode step; labels: k; titles: k x "
                "(1 + mean title-line tokens of the catalog)), 10 without a ranker"})
    prompt_tokens: int = field(default=350, metadata={"help": "prompt length of the latency measurement"})
    decode_steps: int = field(default=16, metadata={"help": "decode steps timed per latency round"})
    repeats: int = field(default=5, metadata={"help": "latency rounds (medians are reported)"})
    min_agreement: float = field(default=0.9, metadata={
        "help": "a candidate must pick the same top candidate as fp32 on at least this share of probes"})
    max_ndcg_drop: float = field(default=0.01, metadata={"help": "... and lose at most this much NDCG@10"})
    min_gain: float = field(default=0.05, metadata={
        "help": "a candidate replaces fp32 / torch only when at least this much faster (noise margin)"})
    force: bool = field(default=False, metadata={"help": "rebuild even if a current build exists"})

    def __post_init__(self) -> None:
        for name in ("probe_users", "repeats", "decode_steps", "prompt_tokens", "generate_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.generate_probes < 0:
            raise ValueError(f"--generate-probes must be >= 0, got {self.generate_probes}")
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.max_seq_len < self.max_input_len:
            raise ValueError(f"--max-seq-len {self.max_seq_len} < --max-input-len {self.max_input_len}")


def detect_target() -> str:
    gpus, _, _ = cuda_devices()
    if gpus:
        return "trtllm" if library_version("tensorrt_llm") else "hf-cuda"
    return "hf-cpu"


def served_generate_tokens(bundle: Bundle) -> tuple[int, str]:
    """Tokens one generate-mode request writes as the server runs it (llm/ranker.json), and how that was found."""
    if not bundle.has("ranker"):
        return 10, "no llm/ranker.json: 10 (k=10 labels)"
    ranker = load_ranker(bundle)
    if generate_logit_weight(ranker) == 0:  # ranking_server: EngineRequest.decodes is false, as for score mode
        return 1, "llm/ranker.json: generate_logit_weight 0, the answer is written from the prompt pass's scores"
    k = int(ranker["generate_k"])
    if ranker["generate_format"] == "labels":
        return k, f"llm/ranker.json: {k} labels"
    from transformers import AutoTokenizer

    from palr.catalog import Catalog
    from palr.hybrid import ranker_prompt

    catalog = Catalog.load(bundle.path("catalog"))
    prompt = ranker_prompt(AutoTokenizer.from_pretrained(bundle.path(SOURCE)), ranker, catalog)
    lines = [len(prompt.title_line_ids(item)) for item in catalog.items]
    mean = sum(lines) / len(lines)
    return round(k * (1 + mean)), f"llm/ranker.json: {k} title lines of 1 label + {mean:.1f} tokens on average"


# the build a target's latency is measured against when the bundle has one (ortgenai-cpu must beat the hf-cpu
# build that serves the modes it does not win: compile/targets/ortgenai_cpu.py served_torch)
LATENCY_BASELINES = {"ortgenai-cpu": "hf-cpu"}


def build_inputs(bundle: Bundle, target: str) -> list[str]:
    """Versions of what a build reads: the merged model, and (where the bundle has them) the ranker, whose
    generate logit weight and answer length the builds measure with, the SFT data, whose validation
    users are the quality probes, and the build it is timed against (`LATENCY_BASELINES`). A refit
    ranker.json leaves the merged weights byte-identical, and a rebuilt baseline leaves this build's
    inputs as they were, yet either way the build must be measured again."""
    names = [SOURCE] + [name for name in ("ranker", "sft_data") if bundle.has(name)]
    baseline = LATENCY_BASELINES.get(target)
    if baseline and bundle.has(artifact_name(baseline)):
        names.append(artifact_name(baseline))
    return [bundle.version(name) for name in names]


def options_record(config: BuildConfig, target: str) -> dict:
    """The options `target`'s builder reads, as JSON values: what the manifest records as the build's options and
    the step's fingerprint covers (another target's option, e.g. a preset's --repeats on a GPU, changes nothing)."""
    record = json.loads(json.dumps(config.__dict__, default=str))
    return {key: value for key, value in record.items() if key in TARGET_OPTIONS[target]} | {"target": target}


# the options each target's builder reads (besides bundle, target, force)
MEASURED = frozenset({"dtype", "measure", "probe_users", "generate_probes", "generate_k", "prompt_tokens",
                      "decode_steps", "min_agreement", "max_ndcg_drop"})
CPU_MEASURED = MEASURED | {"threads", "repeats", "min_gain", "generate_tokens"}
TRTLLM = frozenset({"dtype", "quantization", "calib_dataset", "tp", "max_batch_size", "max_num_tokens",
                    "max_input_len", "max_seq_len"})
TARGET_OPTIONS = {"hf-cpu": CPU_MEASURED | {"candidates"}, "ortgenai-cpu": CPU_MEASURED, "hf-cuda": MEASURED,
                  "trtllm": TRTLLM}


def check_options_for(target: str, config: BuildConfig) -> None:
    """TensorRT-LLM's own options set for another target, or --calib-dataset without a --quantization: refused
    (they were ignored, yet recorded as the build's). Other options `target` does not read (a CPU target's, which
    presets set for every machine): a warning; they are not recorded."""
    defaults = BuildConfig()
    changed = [f.name for f in dataclasses.fields(BuildConfig) if f.name not in ("bundle", "target", "force")
               and getattr(config, f.name) != getattr(defaults, f.name)]
    unread = [name for name in changed if name not in TARGET_OPTIONS[target]]
    refused = [name for name in unread if name in TRTLLM]
    if refused:
        raise ValueError(f"--{', --'.join(n.replace('_', '-') for n in refused)}: TensorRT-LLM options, and the target "
                         f"is {target}, which does not read them")
    if "calib_dataset" in changed and config.quantization == "none":
        raise ValueError("--calib-dataset calibrates a --quantization (fp8, int4_awq); without one it is not read")
    if unread:
        log.warning("build: --%s not read by --target %s: ignored", ", --".join(n.replace("_", "-") for n in unread),
                    target)


def check_probes_match_the_model(bundle: Bundle) -> None:
    """StepFailed when the SFT data (whose validation prompts are the build's quality probes) is not what the merged
    model was trained on: sft-data run again with other prompt options, finetune and merge not, would choose the
    precision on prompts the served model never sees (their extra token ids may even run past its table)."""
    if not bundle.has("sft_data"):
        return
    merged_from = json.loads(bundle.path("ranker").read_text()).get("lora") if bundle.has("ranker") else None
    if not bundle.has("lora"):  # finetune drops it when a run starts, until the run finishes: the SFT data may be new
        if merged_from:
            raise StepFailed(f"build: a finetune run is unfinished (the bundle names no adapter), so its SFT data "
                             f"may not be what the merged model was trained on: finish it and merge first "
                             f"(python -m compile all --bundle {bundle.root} {preset_flag(bundle)}), then build")
        return
    lora = bundle.artifact("lora")
    trained_on = lora.get("sft_data")
    stale = []
    if merged_from and merged_from != bundle.version("lora"):
        stale.append(f"the merged model is of adapter {merged_from}, the bundle's is {bundle.version('lora')}")
    if trained_on and trained_on != bundle.version("sft_data"):
        stale.append(f"the adapter was trained on sft_data {trained_on}, the bundle's is {bundle.version('sft_data')}")
    if stale:
        raise StepFailed(f"build: {'; '.join(stale)}: finetune and merge first (python -m compile all --bundle "
                         f"{bundle.root} {preset_flag(bundle)}), then build")


def run(config: BuildConfig) -> Path:
    target = config.target or detect_target()
    check_options_for(target, config)
    bundle = Bundle.open(config.bundle)
    spec = target_spec(target)
    name = artifact_name(target)
    step = f"build:{target}"
    step_fp = fingerprint(step, VERSION, options_record(config, target),
                          build_inputs(bundle, target))
    if not config.force and bundle.has(name) and bundle.manifest.steps.get(step, {}).get("fingerprint") == step_fp:
        path, entry = open_build(bundle, target)  # refuses a build made for other hardware or changed since
        log.info("build: %s is current and fits this machine (%s, %s); skipping", path, entry.get("device_name"),
                 entry.get("dtype"))
        return path
    machine = Machine.detect(spec.device)
    missing = [lib for lib in spec.pinned if not machine.libraries.get(lib)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise StepFailed(f"--target {target} needs {' and '.join(missing)}, which {verb} not installed here. "
                           f"{INSTALL_HINTS[target]}")
    if spec.device == "cuda" and not machine.gpu_count:
        raise StepFailed(f"--target {target} builds for an NVIDIA GPU and this machine has no CUDA device "
                           f"({machine.describe()}); build it on the GPU it will serve on, or use --target hf-cpu")
    if spec.device == "cuda" and (machine.compute_capability or "").startswith("mixed"):
        raise StepFailed(f"--target {target}: this machine's GPUs differ in compute capability "
                         f"({machine.compute_capability}); a build is made for one kind: set CUDA_VISIBLE_DEVICES to "
                         f"GPUs of the kind it will serve on")
    # what is built from and measured with are the files the manifest names (the versions the build records); a
    # step stopped after rewriting them would otherwise pass new weights off under the old version
    bundle.verify([name for name in (SOURCE, "ranker", "sft_data") if bundle.has(name)])
    check_probes_match_the_model(bundle)
    started = time.perf_counter()
    final = bundle.root / "engines" / target
    final.parent.mkdir(parents=True, exist_ok=True)
    if not config.generate_tokens:
        tokens, why = served_generate_tokens(bundle)
        config = dataclasses.replace(config, generate_tokens=tokens)
        log.info("build: a generate-mode request writes %d tokens (%s)", tokens, why)
    builder = importlib.import_module(f"compile.targets.{BUILDERS[target]}")
    log.info("build: %s on %s", target, machine.describe(spec.pinned))
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{target}.building."))  # one per build process
    previous = final.with_name(f".{target}.previous")  # the old build, set aside during the swap
    try:  # whatever fails or is interrupted until the swap leaves no scratch directory behind
        result = builder.build(BuildContext(config, machine, bundle, bundle.path(SOURCE), scratch))
        files = file_checksums(scratch)  # before the swap: a big engine takes a minute to hash
        # the swap: from here to save() the manifest names the old build's checksums over the new files (a
        # server starting meanwhile refuses to); milliseconds, not the hashing time. The old build is set aside,
        # not deleted, until the manifest names the new one: a failed save puts it back
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)
        scratch.rename(final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if previous.exists() and not final.exists():  # stopped between the swap's two renames
            previous.rename(final)
        raise
    seconds = time.perf_counter() - started
    try:
        entry = bundle.add_artifact(name, final.relative_to(bundle.root), files=files, **machine.build_record(spec),
                                    **result.meta, source=bundle.version(SOURCE), ranker=ranker_version(bundle),
                                    build_options=options_record(config, target),
                                    build_seconds=round(seconds, 1))
        bundle.record_step(step, step_fp, seconds, target=target)
        bundle.save()
    except BaseException:  # the manifest still names the old build: its files go back where they were
        shutil.rmtree(final, ignore_errors=True)
        if previous.exists():
            previous.rename(final)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    report = {"target": target, "machine": machine.to_dict(), "seconds": round(seconds, 1),
              "manifest_entry": {k: v for k, v in entry.items() if k != "files"}, **result.report}
    write_atomically(bundle.reports_dir() / f"build_{target}.json", json.dumps(report, indent=2) + "\n")
    log.info("build: wrote %s in %.1f s (%d files): %s", final, seconds, len(entry["files"]), result.summary)
    return final
