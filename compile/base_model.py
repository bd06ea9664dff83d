"""`compile base-model`: the base LLM as a plain Hugging Face checkpoint + tokenizer in `llm/base/`.

Two kinds of source, one path through the rest of the pipeline:

    --gguf FILE        (default: the SmolLM2-135M-Instruct GGUF from `compile fetch`) is
                       dequantized on load (`GgufConfig(dequantize=True)`; a plain GGUF load keeps
                       the quantizer attached and `save_pretrained` refuses it), saved once as fp32
                       safetensors, reloaded, and its logits checked against the GGUF-loaded model's.
    --base-model DIR   any local Llama-family Hugging Face checkpoint (a 7B included). It is
                       already what the later steps read, so it is not converted and not copied:
                       `llm/base/` gets one symbolic link per file (`--copy` copies instead, for a
                       bundle that must not depend on DIR). Its config must name a causal LM.

Every later step (finetune, merge, evaluate, the server) reads `llm/base/` the same way,
whichever source it came from.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile.fetch import gguf_path
from compile.llm_common import config_record
from compile.steps import StepFailed
from palr.bundle import Bundle, file_checksums, fingerprint, write_directory

log = logging.getLogger(__name__)

BASE_DIR = "llm/base"
# A fixed, ordinary sentence for the logits check: what the model sees, not random ids.
CHECK_TEXT = "The user watched Toy Story (1995), Heat (1995) and Fargo (1996). Next they will watch"


@dataclass
class BaseModelConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory"})
    gguf: Path = field(default=gguf_path(Path("data")),
                       metadata={"help": "GGUF file of the embedded default LLM (used unless --base-model)"})
    base_model: Path | None = field(default=None, metadata={
        "help": "a local Llama-family Hugging Face checkpoint directory to use instead of the GGUF"})
    copy: bool = field(default=False, metadata={
        "help": "copy --base-model's files into the bundle instead of linking them"})
    check_tolerance: float = field(default=0.0, metadata={
        "help": "max |logit difference| allowed between the GGUF-loaded model and the saved checkpoint"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})


def _source(config: BaseModelConfig) -> Path:
    source = Path(config.base_model) if config.base_model else Path(config.gguf)
    if config.base_model and not (source / "config.json").is_file():
        raise FileNotFoundError(f"--base-model {source}: no config.json; expected a Hugging Face checkpoint directory")
    if not config.base_model and not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file; run `python -m compile fetch` first")
    return source.resolve()


def _source_stamp(source: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) per source file: cheap to take, changes when the files do (no 13 GB hash)."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return [(p.relative_to(source.parent).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def max_logit_difference(model_a, model_b, tokenizer) -> float:
    """max |logits_a - logits_b| over every position of CHECK_TEXT."""
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids  # [1, T]
    with torch.inference_mode():
        a = model_a(input_ids=ids).logits.float()  # [1, T, V]
        b = model_b(input_ids=ids).logits.float()  # [1, T, V]
    return float((a - b).abs().max())


def convert_gguf(gguf: Path, out: Path, tolerance: float) -> dict:
    """Dequantize `gguf` into an fp32 HF checkpoint at `out`; returns what the manifest records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    source = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        **source, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)).eval()
    tokenizer = AutoTokenizer.from_pretrained(**source)
    log.info("loaded and dequantized %s in %.1f s (%s, %.1fM parameters)", gguf.name,
             time.perf_counter() - started, type(model).__name__, model.num_parameters() / 1e6)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = max_logit_difference(model, saved, tokenizer)
    log.info("logits check: saved checkpoint vs GGUF-loaded model, max |diff| = %.3g (tolerance %.3g)",
             diff, tolerance)
    if diff > tolerance:
        raise StepFailed(f"{out}: saved checkpoint's logits differ from the GGUF-loaded model's by {diff:.3g} "
                           f"(> {tolerance:.3g}); the conversion is broken")
    return {"source": "gguf", "gguf": gguf.name, "dtype": "float32", "logits_max_abs_diff": diff}


def link_checkpoint(source: Path, out: Path, copy: bool) -> dict:
    """Expose an existing HF checkpoint as `out`: per-file symlinks (or copies)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise ValueError(f"--base-model {source}: config.json architectures {architectures} name no causal LM")
    out.mkdir(parents=True)
    files = sorted(p for p in source.rglob("*") if p.is_file() and ".cache" not in p.parts)
    for path in files:
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(path, target)
        else:
            target.symlink_to(path)
    log.info("%s %d files of %s (%s, %s) into %s", "copied" if copy else "linked", len(files), source,
             config.model_type, ",".join(architectures), out)
    return {"source": "hf", "base_model": str(source), "linked": not copy,
            "dtype": str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None))}


def run(config: BaseModelConfig) -> Path:
    source = _source(config)  # checked first: a wrong path must not leave an empty bundle folder behind
    bundle = Bundle.open_or_create(config.bundle)
    step_fp = fingerprint("base-model", str(source), _source_stamp(source), config.copy, config.check_tolerance)
    out = bundle.root / BASE_DIR
    if not config.force and bundle.step_is_current("base-model", step_fp, ["llm_base"]):
        log.info("base model is current (%s); skipping", out)
        return out
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)

    def made(part: Path) -> tuple[dict, dict[str, str]]:
        meta = link_checkpoint(source, part, config.copy) if config.base_model else \
            convert_gguf(source, part, config.check_tolerance)
        return meta, file_checksums(part)

    # made and checked beside llm/base, which stays as the manifest names it until the new one passed (a refused
    # --base-model or a failed conversion check deleted it first, leaving the bundle without the base it records)
    meta, files = write_directory(out, made)
    bundle.add_artifact("llm_base", BASE_DIR, files=files, **meta)
    bundle.record_step("base-model", step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("base model ready at %s (%.1f s)", out, time.perf_counter() - started)
    return out
