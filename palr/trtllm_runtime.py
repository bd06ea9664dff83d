"""The small TensorRT-LLM helpers shared by the `trtllm` engine (ranking_server/engines/trtllm.py) and its
build (compile/targets/trtllm.py): importing the library with a clear error, the TensorRT-backend LLM
class, reading a built engine's config."""

from __future__ import annotations

import json
from pathlib import Path

from palr.errors import EngineError

INSTALL_HINT = ("TensorRT-LLM runs on NVIDIA GPUs under Linux: use the NGC image "
                "nvcr.io/nvidia/tensorrt-llm/release (deploy/docker/Dockerfile.trtllm) or `pip install tensorrt-llm` "
                "with CUDA; then `python -m compile build --target trtllm`")


def import_trtllm():
    """The tensorrt_llm module, or EngineError saying it is missing and how to get it."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise EngineError(f"the trtllm engine needs TensorRT-LLM, which is not installed here or does not import "
                          f"({e}). "
                          f"{INSTALL_HINT}") from None
    return tensorrt_llm


def trt_backend_llm_class():
    """The LLM class of the TensorRT-engine flow: `_tensorrt_engine.LLM` in 1.x (plain `LLM` is the
    PyTorch backend there and rejects engine-only arguments); plain `LLM` in 0.17-0.21."""
    import_trtllm()
    try:
        from tensorrt_llm._tensorrt_engine import LLM
    except ImportError:
        from tensorrt_llm import LLM
    return LLM


def read_engine_config(engine_dir: Path) -> dict:
    """The engine's config.json: {"version", "pretrained_config", "build_config"}."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise EngineError(f"{engine_dir}: no config.json; not a TensorRT-LLM engine directory")
    config = json.loads(path.read_text())
    if "build_config" not in config or "pretrained_config" not in config:
        raise EngineError(f"{path}: not a TensorRT-LLM engine config (no build_config/pretrained_config)")
    return config
