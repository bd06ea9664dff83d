"""The onnxruntime-genai runtime pieces shared by the `ortgenai` engine (ranking_server/engines/ortgenai.py)
and the build that measures it (compile/targets): importing the library with a clear error, loading a model,
one batch-1 Generator with its KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from palr.errors import EngineError

INSTALL_HINT = "pip install -e '.[ortgenai]' (onnxruntime-genai==0.18.0, onnx-ir)"


def import_ortgenai():
    try:
        import onnxruntime_genai
    except ImportError as e:
        raise EngineError(f"the ortgenai engine needs onnxruntime-genai, which is not installed here or does not import "
                          f"({e}); "
                          f"{INSTALL_HINT}") from None
    return onnxruntime_genai


def load_model(model_dir: Path, num_threads: int | None = None):
    """An onnxruntime-genai Model from a builder output directory, optionally with its intra-op threads set."""
    og = import_ortgenai()
    config = og.Config(str(model_dir))
    if num_threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": num_threads}}}}))
    return og.Model(config)


def genai_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "genai_config.json"
    if not path.is_file():
        raise EngineError(f"{model_dir}: no genai_config.json; not an onnxruntime-genai model directory")
    return json.loads(path.read_text())


class GeneratorSlot:
    """One Generator (batch 1) and the tokens its KV cache holds, reused from request to request."""

    def __init__(self, model, max_length: int):
        og = import_ortgenai()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length)
        self.generator = og.Generator(model, params)
        self.tokens: list[int] = []

    def start(self, prefix: list[int]) -> int:
        """Keep the cached `prefix` if the cache starts with it, drop the rest; returns the tokens kept."""
        keep = len(prefix) if prefix and self.tokens[:len(prefix)] == prefix else 0
        self.generator.rewind_to(keep)
        del self.tokens[keep:]
        return keep

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Run `tokens`; the next-token logits after them `[V]` (fp32)."""
        self.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        self.tokens.extend(tokens)
        return self.generator.get_logits().reshape(-1)

    def feed_pieces(self, tokens: list[int], stops) -> Iterator[tuple[int, np.ndarray]]:
        """Feed a whole prompt (into an empty cache) in pieces ending at each of `stops` (positions in `tokens`;
        the generator gives the logits after the last token fed) and at its end: (stop, the logits there) each."""
        start, logits = len(self.tokens), None
        for stop in sorted({int(p) for p in stops if p < len(tokens)} | {len(tokens) - 1}):
            if stop >= start:
                logits = self.feed(tokens[start:stop + 1])
                start = stop + 1
            yield stop, logits

    def feed_reading(self, tokens: list[int], readout) -> tuple[np.ndarray, list[float]]:
        """Feed a whole prompt in pieces that end at the readout positions (`palr.prompt.Readout`); returns the
        logits after the prompt `[V]` and each candidate's readout logit."""
        read = [0.0] * len(readout)
        for stop, logits in self.feed_pieces(tokens, readout.positions):
            for c, (position, token) in enumerate(zip(readout.positions, readout.tokens)):
                if position == stop:
                    read[c] = float(logits[int(token)])
        return logits, read
