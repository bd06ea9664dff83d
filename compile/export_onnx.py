"""`compile export-onnx`: models/sasrec.pt → sasrec.onnx, the graph the retrieval server runs.

Contract (docs/retrieval.md, "ONNX graph"; palr/sasrec_onnx.py runs it): inputs `history` int64
[batch, max_len] (left-padded with 0) and
`exclude` int64 [batch, n_exclude] (0-padded); outputs `scores` float32 [batch, top_k]
(descending, masked items -inf) and `indices` int64 [batch, top_k]. Masking and top-k run in
the graph; batch and n_exclude are dynamic, top_k is fixed here.

The torch.export-based exporter (dynamo=True) is tried first, the TorchScript one after it.
Every export is checked with onnx.checker and by an ONNX Runtime run against torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from palr.sasrec import SASRec, SASRecTopK
from palr.bundle import Bundle, fingerprint
from compile.steps import StepFailed

log = logging.getLogger(__name__)

STEP = "export-onnx"
ARTIFACT = "sasrec_onnx"
FILENAME = "sasrec.onnx"
INPUTS = ("history", "exclude")
OUTPUTS = ("scores", "indices")
VERSION = 1  # bump when the exported graph changes for the same checkpoint (not bumped for the stack traces left
# out since: that would re-export, and so retrain every LLM step downstream of sft-data, for the same graph)


@dataclass
class ExportConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle with models/sasrec.pt"})
    top_k: int = field(default=100, metadata={"help": "candidates the graph returns per row (fixed at export)"})
    opset: int = field(default=18, metadata={"help": "ONNX opset"})
    exporter: str = field(default="auto", metadata={
        "help": "dynamo (torch.export), torchscript, or auto (dynamo, falling back to torchscript)",
        "choices": ["auto", "dynamo", "torchscript"]})


def example_inputs(model: SASRec, batch: int = 4, n_exclude: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories with varied left padding (one empty) and exclusions, for tracing and checks."""
    generator = torch.Generator().manual_seed(seed)
    max_len, num_indices = model.arch.max_len, model.arch.num_indices
    history = torch.randint(1, num_indices, (batch, max_len), generator=generator)  # [B, T]
    lengths = torch.linspace(0, max_len, batch).long()  # [B]
    positions = torch.arange(max_len)[None, :]  # [1, T]
    history = history.masked_fill(positions < (max_len - lengths)[:, None], 0)
    exclude = torch.randint(0, num_indices, (batch, n_exclude), generator=generator)  # [B, E]
    return history, exclude


def _export_dynamo(wrapper: SASRecTopK, args: tuple, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    n_exclude = torch.export.Dim("n_exclude", min=1)
    program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, opset_version=opset, input_names=list(INPUTS),
                                output_names=list(OUTPUTS), external_data=False,
                                dynamic_shapes={"history": {0: batch}, "exclude": {0: batch, 1: n_exclude}})
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: SASRecTopK, args: tuple, path: Path, opset: int) -> None:
    torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=list(INPUTS),
                      output_names=list(OUTPUTS), dynamic_axes={"history": {0: "batch"},
                                                                 "exclude": {0: "batch", 1: "n_exclude"},
                                                                 "scores": {0: "batch"}, "indices": {0: "batch"}})


EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
SOURCE_LOCATIONS = "pkg.torch.onnx.stack_trace"  # a node's Python stack at export: absolute paths of this checkout


def strip_source_locations(path: Path) -> None:
    """Drops each node's export-time stack trace (and doc string) from the graph at `path`: they name the files of
    the checkout and venv it was exported from, so the same weights exported in two clones made two files, two
    checksums and two model versions. The graph, its names and the other node metadata stay."""
    import onnx

    model = onnx.load(str(path))

    def strip(graph) -> None:
        for node in graph.node:
            node.doc_string = ""
            kept = [entry for entry in node.metadata_props if entry.key != SOURCE_LOCATIONS]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    strip(subgraph)

    strip(model.graph)
    for function in model.functions:
        strip(function)
    onnx.save(model, str(path))


def check_against_torch(path: Path, wrapper: SASRecTopK, tolerance: float = 1e-4) -> float:
    """onnx.checker, then ORT vs torch on fresh inputs of another batch size; returns the max score gap."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    history, exclude = example_inputs(wrapper.model, batch=5, n_exclude=3, seed=1)
    scores, indices = session.run(list(OUTPUTS), {"history": history.numpy(), "exclude": exclude.numpy()})
    with torch.no_grad():
        want_scores, want_indices = wrapper(history, exclude)
    finite = np.isfinite(want_scores.numpy())
    gap = float(np.abs(scores[finite] - want_scores.numpy()[finite]).max())
    if not np.array_equal(indices[finite], want_indices.numpy()[finite]) or gap > tolerance:
        raise RuntimeError(f"{path}: ONNX Runtime disagrees with torch (max score gap {gap:.2e}, "
                           f"ids equal: {np.array_equal(indices, want_indices.numpy())})")
    return gap


def export(model: SASRec, path: Path, top_k: int, opset: int = 18, exporter: str = "auto") -> tuple[str, float]:
    """Writes the top-k graph to `path`, only once it is checked against torch (it is written beside it first, so a
    failed or interrupted export leaves the model there as it was); returns (exporter used, ORT-vs-torch max score
    gap). StepFailed when no exporter's graph passes."""
    partial = path.with_name(path.name + ".partial")
    try:
        name, gap = _export_checked(model, partial, top_k, opset, exporter)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return name, gap


def _export_checked(model: SASRec, path: Path, top_k: int, opset: int, exporter: str) -> tuple[str, float]:
    for name in ("onnxscript", "onnx_ir"):  # their graph-optimizer INFO lines drown the step's log
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    wrapper = SASRecTopK(model.eval(), top_k).eval()
    args = example_inputs(model)
    errors = []
    for name in ("dynamo", "torchscript") if exporter == "auto" else (exporter,):
        try:
            EXPORTERS[name](wrapper, args, path, opset)
            strip_source_locations(path)
            return name, check_against_torch(path, wrapper)
        except Exception as e:  # noqa: BLE001 — try the next exporter, report all failures below
            log.warning("%s exporter failed: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            errors.append(f"{name}: {e}")
    raise StepFailed("ONNX export failed:\n" + "\n".join(errors))


def run(config: ExportConfig) -> None:
    bundle = Bundle.open(config.bundle)
    checkpoint = bundle.artifact("sasrec_torch")
    step_fp = fingerprint(STEP, VERSION, checkpoint["sha256"], config.top_k, config.opset, config.exporter)
    if bundle.step_is_current(STEP, step_fp, [ARTIFACT]):
        log.info("export-onnx: skipped, %s is current for this checkpoint and options", FILENAME)
        return
    started = time.perf_counter()
    model = SASRec.load(bundle.path("sasrec_torch"))
    top_k = min(config.top_k, model.arch.num_indices - 1)
    if top_k != config.top_k:
        log.warning("top_k %d is more than the %d catalog items; exporting top_k=%d", config.top_k, top_k, top_k)
    exporter, gap = export(model, bundle.root / FILENAME, top_k, config.opset, config.exporter)
    bundle.add_artifact(ARTIFACT, FILENAME, max_len=model.arch.max_len, top_k=top_k,
                        num_items=model.arch.num_indices - 1, opset=config.opset, exporter=exporter,
                        inputs=list(INPUTS), outputs=list(OUTPUTS), ort_max_score_gap=gap)
    seconds = time.perf_counter() - started
    bundle.record_step(STEP, step_fp, seconds, exporter=exporter)
    bundle.save()
    log.info("export-onnx: wrote %s with the %s exporter in %.1fs (top_k=%d, ORT vs torch max gap %.1e)",
             FILENAME, exporter, seconds, top_k, gap)
