"""What this machine is: CPU model and ISA flags, CUDA devices and their SM, engine-library versions
(`Machine.detect`), as the build check (`palr.builds`) compares them with a build's manifest entry.

Import-light: torch and the engine libraries are imported only to look at a CUDA device.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from palr.targets import TargetSpec

CPUINFO = Path("/proc/cpuinfo")
# CPU features that change which kernels run (or whether they run at all): fbgemm's int8 needs
# AVX2; fast bf16 needs AVX512-BF16 or AMX; VNNI speeds int8 dot products.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "tensorrt_llm", "tensorrt")
# environment variables that change which instructions torch's CPU kernels use whatever the CPU has (ATen's
# vectorised kernels; oneDNN's matmuls), or in which precision they compute: a bf16 build served under
# ONEDNN_MAX_CPU_ISA=AVX2 runs emulated, an fp32 one under ONEDNN_DEFAULT_FPMATH_MODE=BF16 rounds as bf16
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
              "DNNL_DEFAULT_FPMATH_MODE")


def kernel_env() -> dict[str, str]:
    """The `KERNEL_ENV` variables set in this process ({} when none: every kernel may use all the CPU has)."""
    return {name: os.environ[name] for name in KERNEL_ENV if os.environ.get(name)}


def library_version(name: str) -> str | None:
    """Installed distribution version, or None. Accepts either spelling (tensorrt_llm / tensorrt-llm)."""
    for candidate in dict.fromkeys((name, name.replace("_", "-"), name.replace("-", "_"))):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    return {name: library_version(name) for name in names}


def cpu_description(cpuinfo: Path = CPUINFO) -> tuple[str, list[str]]:
    """(CPU model name, the ISA_FLAGS it has) from /proc/cpuinfo; (platform name, []) elsewhere."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return name, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.split())
        if name and flags:
            break
    return name, [f for f in ISA_FLAGS if f in flags]


def cuda_devices() -> tuple[int, str | None, str | None]:
    """(device count, name of device 0, the devices' compute capability "9.0"); (0, None, None) without CUDA.
    Devices of different capabilities (a tensor-parallel engine spans them) give "mixed: 8.0, 9.0", which no build
    records, so a build is refused on such a machine rather than checked against device 0 alone.

    Uses torch when it is installed (every image we ship has it); no torch means no CUDA for us."""
    try:
        import torch
    except ImportError:
        return 0, None, None
    if not torch.cuda.is_available():
        return 0, None, None
    count = torch.cuda.device_count()
    return count, torch.cuda.get_device_name(0), compute_capability(
        [torch.cuda.get_device_capability(i) for i in range(count)])


def compute_capability(capabilities: list[tuple[int, int]]) -> str:
    """"9.0" for devices that all have it; "mixed: 8.0, 9.0" otherwise."""
    distinct = sorted(set(capabilities))
    names = [f"{major}.{minor}" for major, minor in distinct]
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


@dataclass(frozen=True)
class Machine:
    """Where a build will run: the device kind chosen (cpu or cuda) and what this machine has."""

    device: str
    device_name: str
    compute_capability: str | None
    gpu_count: int
    cpu_name: str
    cpu_isa: tuple[str, ...]
    libraries: dict[str, str | None] = field(default_factory=dict)
    kernel_env: dict[str, str] = field(default_factory=dict)  # `KERNEL_ENV` as set here

    @classmethod
    def detect(cls, device: str = "cpu") -> "Machine":
        """This machine, running on `device` ("cpu" or "cuda"; "cuda" with no GPU describes that too)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        cpu_name, isa = cpu_description()
        gpus, gpu_name, sm = cuda_devices() if device == "cuda" else (0, None, None)
        if device == "cuda" and not gpus:
            gpu_name = "no CUDA device"
        return cls(device=device, device_name=gpu_name if device == "cuda" else cpu_name,
                   compute_capability=sm, gpu_count=gpus, cpu_name=cpu_name, cpu_isa=tuple(isa),
                   libraries=library_versions(), kernel_env=kernel_env())

    def describe(self, libraries: tuple[str, ...] = ()) -> str:
        """One line: "cuda: NVIDIA H100 80GB HBM3 (SM 9.0) x1; tensorrt_llm 1.2.1"."""
        if self.device == "cuda":
            where = f"cuda: {self.device_name}" + (f" (SM {self.compute_capability}) x{self.gpu_count}"
                                                   if self.compute_capability else "")
        else:
            where = f"cpu: {self.cpu_name} ({', '.join(self.cpu_isa) or 'no AVX2'})"
        libs = "; ".join(f"{n} {self.libraries.get(n) or 'not installed'}" for n in libraries)
        return where + (f"; {libs}" if libs else "")

    def build_record(self, target: TargetSpec) -> dict[str, Any]:
        """The hardware part of a build's manifest entry."""
        return {"target": target.name, "engine": target.engine, "device": self.device,
                "device_name": self.device_name, "compute_capability": self.compute_capability,
                "cpu_name": self.cpu_name, "cpu_isa": list(self.cpu_isa), "isa_tracked": list(ISA_FLAGS),
                "engine_libraries": {n: self.libraries.get(n) for n in target.pinned},
                "libraries": {n: v for n, v in self.libraries.items()}, "kernel_env": dict(self.kernel_env)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: a container's CPU set), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to `threads` inside the block and restored after it (a measurement at
    one count inside a process that keeps another)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
