"""SASRec on ONNX Runtime: turns item-index histories into top-k item indices and scores.

The graph (contract in the bundle's `sasrec_onnx` artifact) takes `history` [B, max_len], left-padded
with 0, and `exclude` [B, n]; it masks excluded items inside the graph and returns `scores` [B, top_k]
(descending, -inf where masked) and `indices` [B, top_k]. This module packs variable-length Python
inputs into those tensors and drops the masked tail of each row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from palr.bundle import Bundle, BundleError
from palr.catalog import PAD_INDEX

log = logging.getLogger(__name__)

ARTIFACT = "sasrec_onnx"
INPUTS = ("history", "exclude")
OUTPUTS = ("scores", "indices")


@dataclass(frozen=True)
class Query:
    """One request as the model sees it (item indices, not ids)."""

    history: Sequence[int]  # oldest first, any length: the model reads the most recent max_len
    exclude: Sequence[int]  # never returned (the server passes the whole history plus the request's)
    k: int


@dataclass(frozen=True)
class Ranked:
    indices: np.ndarray  # [n] int64 item indices, best first; n ≤ k (masked items are dropped)
    scores: np.ndarray  # [n] float32, non-increasing


class SasrecOnnx:
    def __init__(self, path: Path, *, max_len: int, top_k: int, threads: int = 1):
        self.path = Path(path)
        self.max_len = max_len
        self.top_k = top_k
        self.session = _load_session(self.path, threads)
        self._check_signature()

    @staticmethod
    def manifest_record(bundle: Bundle, catalog_items: int | None = None) -> dict:
        """The model's manifest record, with the `max_len` and `top_k` it was exported with (BundleError if not);
        with `catalog_items`, checked to score exactly the catalog's items (a model of another catalog failed every
        batch holding a newer item, the innocent requests in it too, or indexed past the catalog's ids)."""
        meta = bundle.artifact(ARTIFACT)
        for key in ("max_len", "top_k"):
            if key not in meta:
                raise BundleError(f"{bundle.root}: artifact {ARTIFACT!r} has no {key!r} in the manifest")
        if catalog_items is not None and "num_items" in meta and int(meta["num_items"]) != catalog_items:
            raise BundleError(f"{bundle.root}: {meta['path']} scores {meta['num_items']} items, catalog.json has "
                              f"{catalog_items}: they come from different builds (re-run compile sasrec)")
        return meta

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int = 1) -> "SasrecOnnx":
        meta = cls.manifest_record(bundle)
        return cls(bundle.path(ARTIFACT), max_len=int(meta["max_len"]), top_k=int(meta["top_k"]), threads=threads)

    def retrieve(self, queries: Sequence[Query]) -> list[Ranked]:
        """One ORT call for the whole batch; each row cut to its own k, masked items dropped."""
        history = self.pack_histories([q.history for q in queries])  # [B, max_len]
        exclude = pack_excludes([q.exclude for q in queries])  # [B, n]
        scores, indices = self.session.run(OUTPUTS, {"history": history, "exclude": exclude})  # [B, top_k] x2
        ranked = []
        for row, q in enumerate(queries):
            row_scores, row_indices = scores[row, :q.k], indices[row, :q.k]  # [k]
            keep = np.isfinite(row_scores)
            ranked.append(Ranked(indices=row_indices[keep], scores=row_scores[keep]))
        return ranked

    def warm_up(self, batch_sizes: Sequence[int] = (1,), repeats: int = 3) -> float:
        """Runs every batch size a few times so the first real request pays no allocation cost;
        returns the seconds it took."""
        started = time.perf_counter()
        history = [PAD_INDEX + 1] * self.max_len  # item 1 exists in any catalog
        for batch_size in batch_sizes:
            queries = [Query(history=history, exclude=history, k=self.top_k)] * batch_size
            for _ in range(repeats):
                self.retrieve(queries)
        seconds = time.perf_counter() - started
        log.info("warmed up %s (batch sizes %s) in %.2f s", self.path.name, list(batch_sizes), seconds)
        return seconds

    def pack_histories(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """[B, max_len] int64: the most recent max_len items of each history, right-aligned."""
        packed = np.full((len(histories), self.max_len), PAD_INDEX, dtype=np.int64)
        for row, history in enumerate(histories):
            recent = history[-self.max_len:]
            if len(recent):
                packed[row, self.max_len - len(recent):] = recent
        return packed

    def _check_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if not set(INPUTS) <= inputs or not set(OUTPUTS) <= outputs:
            raise BundleError(f"{self.path}: expected inputs {list(INPUTS)} and outputs {list(OUTPUTS)}, "
                              f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}")


def pack_excludes(excludes: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, n] int64, 0-padded on the right; n ≥ 1 so the tensor is never empty (0 is masked anyway)."""
    width = max([len(e) for e in excludes] + [1])
    packed = np.full((len(excludes), width), PAD_INDEX, dtype=np.int64)
    for row, exclude in enumerate(excludes):
        packed[row, :len(exclude)] = exclude
    return packed


# what ONNX Runtime raises for a model it cannot load (a corrupt file, an opset newer than the installed ORT, a graph
# it cannot run): classes of its own, derived from Exception alone
ORT_LOAD_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in (
    "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented",
    "RuntimeException", "ModelLoaded") if hasattr(ort.capi.onnxruntime_pybind11_state, name))


def _load_session(path: Path, threads: int) -> ort.InferenceSession:
    """The model's ORT session; a model this ONNX Runtime cannot load is a BundleError naming the file and the
    version (the servers print it as `cannot serve: ...`, not as a traceback)."""
    try:
        return ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])
    except ORT_LOAD_ERRORS as e:
        raise BundleError(f"{path}: ONNX Runtime {ort.__version__} cannot load it ({type(e).__name__}: {e}); one "
                          f"exported for a newer ONNX Runtime is re-exported on this one by `python -m compile "
                          f"export-onnx --bundle DIR`") from None


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options
