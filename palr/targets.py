"""The hardware build targets (`compile build --target T`, `engines/<T>/`): where each runs, which
ranking-server `--engine` serves it, and which library versions it is pinned to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetSpec:
    """A build target: where it runs, which backend serves it, and which library versions it is pinned to."""

    name: str
    device: str                    # "cpu" or "cuda"
    engine: str                    # the ranking server's --engine that serves it
    pinned: tuple[str, ...]        # libraries whose exact version the build needs


TARGETS: dict[str, TargetSpec] = {
    "hf-cpu": TargetSpec("hf-cpu", "cpu", "hf", ("torch", "transformers")),
    "hf-cuda": TargetSpec("hf-cuda", "cuda", "hf", ("torch", "transformers")),
    "ortgenai-cpu": TargetSpec("ortgenai-cpu", "cpu", "ortgenai", ("onnxruntime-genai",)),
    # a tensorrt_llm release takes a range of TensorRT releases (1.2: tensorrt~=10.13.3), and an engine plan loads
    # only under the TensorRT that built it: both pinned, so another one is refused up front, not at load
    "trtllm": TargetSpec("trtllm", "cuda", "trtllm", ("tensorrt_llm", "tensorrt")),
}


def target_spec(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown build target {name!r}; choose from {', '.join(TARGETS)}") from None


def target_for(engine: str, device: str) -> str:
    """The build target the ranking server's `--engine E --device D` serves."""
    for spec in TARGETS.values():
        if spec.engine == engine and spec.device == device:
            return spec.name
    served = ", ".join(f"--engine {s.engine} --device {s.device}" for s in TARGETS.values())
    raise ValueError(f"no build target for --engine {engine} --device {device} (there are: {served})")
