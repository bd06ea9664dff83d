"""Hardware targets, what this machine is, and the check that refuses a build made for another one.

A deployment build (`compile build --target T` → `engines/<T>/`, manifest artifact `engine:<T>`)
is pinned to the hardware and libraries it was made with:

    hf-cpu        transformers on CPU        pinned: device kind, torch + transformers, CPU ISA it needs
    hf-cuda       transformers on an NVIDIA GPU  pinned: device kind, SM, torch + transformers
    ortgenai-cpu  onnxruntime-genai on CPU   pinned: device kind, onnxruntime-genai, CPU ISA it needs
    trtllm        TensorRT-LLM engine        pinned: device kind, SM, tensorrt_llm (which pins TensorRT)

TensorRT engines only deserialize on the SM and TensorRT release they were built with (TRT says
"The engine plan file is generated on an incompatible device, expecting compute 9.0 got compute
8.9"), and its config.json does not record the SM, so the manifest does. The hf builds are held to
the same rule (their dtype and attention kernel were chosen for that GPU or CPU); rebuilding one
takes seconds. `check_build` lists every mismatch; `refuse` turns them into one message that says
what the build was made for and what this machine is.

Import-light: torch and the engine libraries are imported only to look at a CUDA device.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from palr.bundle import BundleError

CPUINFO = Path("/proc/cpuinfo")
# CPU features that change which kernels run (or whether they run at all): fbgemm's int8 needs
# AVX2; fast bf16 needs AVX512-BF16 or AMX; VNNI speeds int8 dot products.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "tensorrt_llm", "tensorrt")


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
    # a tensorrt_llm release pins its TensorRT, so its version covers both (tensorrt is recorded too)
    "trtllm": TargetSpec("trtllm", "cuda", "trtllm", ("tensorrt_llm",)),
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
    """(device count, name of device 0, its compute capability "9.0"); (0, None, None) without CUDA.

    Uses torch when it is installed (every image we ship has it); no torch means no CUDA for us."""
    try:
        import torch
    except ImportError:
        return 0, None, None
    if not torch.cuda.is_available():
        return 0, None, None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.device_count(), torch.cuda.get_device_name(0), f"{major}.{minor}"


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
                   libraries=library_versions())

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
                "cpu_name": self.cpu_name, "cpu_isa": list(self.cpu_isa),
                "engine_libraries": {n: self.libraries.get(n) for n in target.pinned},
                "libraries": {n: v for n, v in self.libraries.items()}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BuildMismatch(BundleError):
    """A build made for other hardware or other library versions: the server refuses to start."""


def isa_satisfied(requirement: str, isa: tuple[str, ...] | list[str]) -> bool:
    """A requirement is one flag or alternatives joined by "|" ("amx_bf16|avx512_bf16")."""
    return any(flag in isa for flag in requirement.split("|"))


def check_build(entry: dict[str, Any], machine: Machine) -> list[str]:
    """Every way the build in manifest entry `entry` does not fit `machine`; [] when it fits."""
    problems = []
    built_on = entry.get("device")
    if built_on != machine.device:
        problems.append(f"device kind: built for {built_on}, this server runs on {machine.device}"
                        + (f" ({machine.device_name})" if machine.device == "cuda" else ""))
    elif machine.device == "cuda":
        if not machine.gpu_count:
            problems.append("device kind: built for a CUDA GPU, this machine has no CUDA device")
        elif entry.get("compute_capability") != machine.compute_capability:
            problems.append(f"compute capability: built for SM {entry.get('compute_capability')} "
                            f"({entry.get('device_name')}), this GPU is SM {machine.compute_capability} "
                            f"({machine.device_name})")
        tp = int(entry.get("tensor_parallel_size") or 1)
        if machine.gpu_count and tp > machine.gpu_count:
            problems.append(f"tensor parallelism: built for {tp} GPUs, this machine has {machine.gpu_count}")
    for name, built in (entry.get("engine_libraries") or {}).items():
        here = machine.libraries[name] if name in machine.libraries else library_version(name)
        if built != here:
            problems.append(f"{name}: built with {built or 'none'}, this machine has {here or 'none installed'}")
    missing = [r for r in entry.get("requires_isa") or [] if not isa_satisfied(r, machine.cpu_isa)]
    if missing:
        problems.append(f"CPU instructions: the build needs {', '.join(missing)}; this CPU ({machine.cpu_name}) "
                        f"has {', '.join(machine.cpu_isa) or 'none of the tracked ones'}")
    return problems


def describe_build(entry: dict[str, Any]) -> str:
    """One line: what a build was made for (the manifest's view, like `Machine.describe`)."""
    if entry.get("device") == "cuda":
        where = f"cuda: {entry.get('device_name')} (SM {entry.get('compute_capability')})"
    else:
        where = f"cpu: {entry.get('device_name')}"
        if entry.get("requires_isa"):
            where += f" (needs {', '.join(entry['requires_isa'])})"
    libs = "; ".join(f"{n} {v or 'none'}" for n, v in (entry.get("engine_libraries") or {}).items())
    dtype = entry.get("dtype")
    return where + (f"; {dtype}" if dtype else "") + (f"; {libs}" if libs else "")


def refuse(name: str, entry: dict[str, Any], machine: Machine, problems: list[str], bundle_root: Path) -> BuildMismatch:
    """The error a server (or `compile build` when reusing) raises for a build that does not fit."""
    target = entry.get("target", name.partition(":")[2])
    spec = TARGETS.get(target)
    here = machine.describe(spec.pinned if spec else ())
    return BuildMismatch(
        f"refusing {name} in {bundle_root}: it was built for {describe_build(entry)}; this machine is "
        f"{here}.\n  - " + "\n  - ".join(problems)
        + f"\nRebuild it on this machine: python -m compile build --bundle {bundle_root} --target {target} --force")


def artifact_name(target: str) -> str:
    return f"engine:{target}"


def open_build(bundle, target: str, machine: Machine | None = None) -> tuple[Path, dict[str, Any]]:
    """(directory, manifest entry) of the bundle's build for `target`, after checking that its files
    are the ones built (sha256) and that it fits `machine` (default: this machine, on the target's
    device kind). Raises BuildMismatch saying what was built for what, and what this machine is."""
    spec = target_spec(target)
    name = artifact_name(target)
    entry = bundle.artifact(name)
    try:
        bundle.verify([name])
    except BundleError as e:
        raise BuildMismatch(f"refusing {name}: its files are not the ones that were built ({e})\n"
                            f"Rebuild it: python -m compile build --bundle {bundle.root} --target {target} "
                            f"--force") from None
    machine = machine or Machine.detect(spec.device)
    problems = check_build(entry, machine)
    if problems:
        raise refuse(name, entry, machine, problems, bundle.root)
    return bundle.path(name), entry
