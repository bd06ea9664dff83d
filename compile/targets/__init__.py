"""One module per build target of `compile build`; each has `build(ctx: BuildContext) -> BuildResult`.

A builder writes its files into `ctx.out` (a fresh directory that becomes `engines/<target>/`)
and returns what the manifest entry and the build report should say. The hardware part of the
entry (device, SM, CPU ISA, library versions) is added by `compile.build` for every target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# target → module under compile/targets/
BUILDERS = {"hf-cpu": "hf_cpu", "hf-cuda": "hf_cuda", "ortgenai-cpu": "ortgenai_cpu", "trtllm": "trtllm"}


@dataclass
class BuildContext:
    config: Any              # compile.build.BuildConfig
    machine: Any             # palr.machine.Machine
    bundle: Any              # palr.bundle.Bundle
    source: Path             # the merged HF checkpoint (llm/merged/)
    out: Path                # where the build's files go


@dataclass
class BuildResult:
    """`meta` goes into the manifest entry (dtype, quantization, tensor_parallel_size, requires_isa,
    build_options, serves_modes, ...); `report` into reports/build_<target>.json (measurements)."""

    meta: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    summary: str = ""        # one line for the log: what was kept and why
