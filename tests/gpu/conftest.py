"""GPU-only tests (`pytest -m gpu`): skipped, with the reason, where there is no CUDA device or no
TensorRT-LLM; meant for a GPU machine (see docs/builds.md: GPU runs)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def trtllm(cuda):
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip("TensorRT-LLM is not installed (NVIDIA GPUs; nvcr.io/nvidia/tensorrt-llm/release image)")
    import tensorrt_llm

    return tensorrt_llm
