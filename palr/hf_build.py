"""An `hf-cpu` / `hf-cuda` build directory: a Hugging Face checkpoint plus `build.json`, which says
how to load it so the model runs as it was measured at build time.

    engines/hf-cpu/
      config.json  model.safetensors  tokenizer files
      build.json   {"dtype": "fp32" | "bf16" | "fp16", "quantization": null | "dynamic-int8" | "int8-weight-only",
                    "body_dtype": null | "bf16", "fp32_last_layers": 0 | 1, "num_threads": 2,
                    "attn_implementation": "sdpa"}

`body_dtype` (absent in older builds: null) casts the decoder layers to that dtype at load while the
final norm, the LM head and the scores stay in `dtype` (fp32), and so do the last `fp32_last_layers`
decoder layers (absent: 0): see `palr.precision.body_dtype`.
`int8-weight-only` is torchao's weight-only int8 of the decoder's Linear layers, also applied at load.

Dynamic int8 (torch.ao `quantize_dynamic` of the decoder's Linear layers: int8 weights, activations
quantized per call) is applied at load time rather than saved: a quantized state dict is a pickle
tied to the torch version, while the fp32 checkpoint plus one line of build.json is not. The LM head
stays in float: the engines read only the label rows of it (`hf.HFEngine._token_logits`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from palr.precision import INT8_WEIGHT_ONLY, body_dtype, int8_weight_only

log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DYNAMIC_INT8 = "dynamic-int8"


def quantize_dynamic_int8(model):
    """int8 weights for every Linear inside the decoder layers (in place); returns the model."""
    from torch.ao.quantization import quantize_dynamic

    decoder = model.get_decoder()
    quantize_dynamic(decoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def save_hf_build(out: Path, model, tokenizer, *, dtype: str, quantization: str | None,
                  num_threads: int | None, attn_implementation: str, body_dtype: str | None = None,
                  fp32_last_layers: int = 0) -> dict[str, Any]:
    """Writes the checkpoint in `dtype` (fp32 under int8 or a bf16 body: applied at load) and build.json."""
    if (quantization or body_dtype) and dtype != "fp32":
        raise ValueError(f"{quantization or 'a ' + str(body_dtype) + ' body'} applies to an fp32 model, not {dtype}")
    if body_dtype is not None and body_dtype not in DTYPES:
        raise ValueError(f"unknown body dtype {body_dtype!r}")
    if fp32_last_layers and body_dtype is None:
        raise ValueError("fp32_last_layers applies to a model with a body dtype")
    out.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"dtype": dtype, "quantization": quantization, "body_dtype": body_dtype,
              "fp32_last_layers": fp32_last_layers, "num_threads": num_threads,
              "attn_implementation": attn_implementation}
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def body_tail(record: dict[str, Any]) -> str:
    """", last N layers fp32" for a build that keeps them so, else ""."""
    n = record.get("fp32_last_layers", 0)
    return f", last {n} layer{'s' if n > 1 else ''} fp32" if n else ""


def read_build(path: Path) -> dict[str, Any]:
    file = Path(path) / BUILD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {BUILD_FILE}; not an hf build directory (python -m compile build)")
    return json.loads(file.read_text())


def load_bundle_hf_cpu(bundle, without: str) -> tuple[Any, dict[str, Any], int] | None:
    """(model, manifest entry, threads) of the bundle's hf-cpu build when it has one made for this machine, else
    None (a build for another machine is logged, with `without`: what the caller does instead). `threads`: the
    count the server would run it with here (`palr.builds.engine_threads`; 0: torch's default), left set."""
    from palr.builds import BuildMismatch, engine_threads, open_build
    from palr.machine import Machine

    if not bundle.has("engine:hf-cpu"):
        return None
    machine = Machine.detect("cpu")
    try:
        path, entry = open_build(bundle, "hf-cpu", machine)
    except BuildMismatch as e:
        log.warning("the bundle's hf-cpu build is not for this machine (%s): %s", e, without)
        return None
    threads, _ = engine_threads(entry, machine)
    return load_hf_build(path, threads=threads)[0], entry, threads


def load_hf_build(path: Path, device: str = "cpu", threads: int | None = None):
    """(model, tokenizer, build record) as the build says: dtype, attention, int8 quantization, threads (`threads`:
    None = the count the build measured fastest; a count = that one; 0 = leave torch's, e.g. on another CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = read_build(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[record["dtype"]],
                                                 attn_implementation=record["attn_implementation"])
    model.to(device).eval().requires_grad_(False)
    if record["quantization"] == DYNAMIC_INT8:
        if device != "cpu":
            raise ValueError(f"{path}: dynamic int8 quantization runs on CPU only, not {device}")
        quantize_dynamic_int8(model)
    elif record["quantization"] == INT8_WEIGHT_ONLY:
        int8_weight_only(model)
    elif record["quantization"]:
        raise ValueError(f"{path}: unknown quantization {record['quantization']!r} in {BUILD_FILE}")
    if record.get("body_dtype"):
        body_dtype(model, DTYPES[record["body_dtype"]], record.get("fp32_last_layers", 0))
    threads = int(record.get("num_threads") or 0) if threads is None else threads
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    log.info("hf build %s: %s%s%s, attention %s, %s threads", path, record["dtype"],
             f" ({record['quantization']})" if record["quantization"] else "",
             f" ({record['body_dtype']} body{body_tail(record)})" if record.get("body_dtype") else "", record["attn_implementation"],
             threads or f"torch's {torch.get_num_threads()}")
    return model, AutoTokenizer.from_pretrained(path), record
