"""The check that refuses a deployment build made for another machine, and opening one that fits.

A deployment build (`compile build --target T` → `engines/<T>/`, manifest artifact `engine:<T>`)
is pinned to the hardware and libraries it was made with:

    hf-cpu        transformers on CPU        pinned: device kind, torch + transformers (+ torchao for int8
                                             weight-only), the CPU ISA it needs and the one it was measured on
    hf-cuda       transformers on an NVIDIA GPU  pinned: device kind, SM, torch + transformers
    ortgenai-cpu  onnxruntime-genai on CPU   pinned: device kind, onnxruntime-genai, the CPU ISA it was
                                             measured on
    trtllm        TensorRT-LLM engine        pinned: device kind, SM, tensorrt_llm and tensorrt

TensorRT engines only deserialize on the SM and TensorRT release they were built with (TRT says
"The engine plan file is generated on an incompatible device, expecting compute 9.0 got compute
8.9"), and its config.json does not record the SM, so the manifest does. The hf builds are held to
the same rule (their dtype and attention kernel were chosen for that GPU or CPU); rebuilding one
takes seconds. `check_build` lists every mismatch; `refuse` turns them into one message that says
what the build was made for and what this machine is.

The targets are `palr.targets`, the machine `palr.machine`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palr.bundle import BundleError
from palr.machine import ISA_FLAGS, KERNEL_ENV, Machine, cpu_cores, library_version
from palr.targets import TARGETS, target_spec


# the manifest key of an int8 weight-only hf-cpu build's torchao version (torchao quantizes it at load)
TORCHAO = "torchao"


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
    pinned = dict(entry.get("engine_libraries") or {})
    if entry.get(TORCHAO):  # an int8 weight-only build: torchao quantizes it at load, so its version is pinned too
        pinned[TORCHAO] = entry[TORCHAO]
    for name, built in pinned.items():
        here = machine.libraries[name] if name in machine.libraries else library_version(name)
        if built != here:
            problems.append(f"{name}: built with {built or 'none'}, this machine has {here or 'none installed'}")
    missing = [r for r in entry.get("requires_isa") or [] if not isa_satisfied(r, machine.cpu_isa)]
    if missing:
        problems.append(f"CPU instructions: the build needs {', '.join(missing)}; this CPU ({machine.cpu_name}) "
                        f"has {', '.join(machine.cpu_isa) or 'none of the tracked ones'}")
    elif built_on == machine.device == "cpu" and "cpu_isa" in entry:
        problems += other_cpu_kernels(entry, machine)
    if built_on == machine.device == "cpu" and entry.get("engine") == "hf" and "kernel_env" in entry \
            and entry["kernel_env"] != machine.kernel_env:  # (torch's kernels: ONNX Runtime does not read them)
        problems.append(f"CPU kernel settings: built and measured with {_env(entry['kernel_env'])}, this server runs "
                        f"with {_env(machine.kernel_env)}: they cap which instructions torch's kernels use, so the "
                        f"precision it kept and its timings do not hold here")
    return problems


def _env(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(values.items())) or "none of " + ", ".join(KERNEL_ENV) + " set"


def other_cpu_kernels(entry: dict[str, Any], machine: Machine) -> list[str]:
    """A CPU build measured where other kernels run: its precision was kept for its speed and its ranking
    agreement under the build machine's kernels (AMX tiles, AVX512-BF16 dot products, VNNI), which run at other
    speeds and round differently on another instruction set (a bf16 candidate sits near the agreement bar:
    docs/builds.md), and an fp32 build made without bf16 never measured the bf16 a newer CPU runs fast. [] when the
    tracked flags are the same (`palr.machine.ISA_FLAGS`, as far as the build tracked them too: a flag added to the
    list later does not turn every older build away); entries without `cpu_isa` (older builds) are not checked."""
    compared = set(entry.get("isa_tracked") or ISA_FLAGS) & set(ISA_FLAGS)
    built, here = set(entry["cpu_isa"]) & compared, set(machine.cpu_isa) & compared
    if built == here:
        return []
    differences = [f"{label} {', '.join(sorted(flags))}" for label, flags in
                   (("lacks", built - here), ("also has", here - built)) if flags]
    built_flags = ", ".join(entry["cpu_isa"]) or "none of the tracked flags"
    return [f"CPU kernels: built and measured on {entry.get('device_name')} ({built_flags}); this CPU "
            f"({machine.cpu_name}) {' and '.join(differences)}, so the precision it kept and its timings do not "
            f"hold here"]


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


SOURCE = "llm_merged"  # the artifact every build is made from; its version is recorded in the build's entry


def artifact_name(target: str) -> str:
    return f"engine:{target}"


def ranker_version(bundle) -> str | None:
    """The version of the bundle's ranker (llm/ranker.json), None without one; a build records the one it was
    measured under."""
    return bundle.version("ranker") if bundle.has("ranker") else None


def routing_baseline(bundle) -> str | None:
    """What an ortgenai-cpu build's modes were measured against: the version of the bundle's hf-cpu build, which
    serves the modes onnxruntime-genai does not win (None: none, torch fp32 from llm/merged)."""
    name = artifact_name("hf-cpu")
    return bundle.version(name) if bundle.has(name) else None


def stale_routing(entry: dict[str, Any], baseline_now: str | None) -> str | None:
    """Why an ortgenai-cpu build's `serves_modes` may no longer hold (the hf-cpu build it was measured against
    was built, rebuilt or removed since), or None. Builds made before the baseline was recorded: None."""
    if "routing_baseline" not in entry or entry["routing_baseline"] == baseline_now:
        return None
    return (f"its serves_modes were measured against hf-cpu build {entry['routing_baseline'] or '(none: torch fp32)'}"
            f", and the bundle's is now {baseline_now or '(none)'}")


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
    built_from, merged_now = entry.get("source"), bundle.version(SOURCE)
    if built_from != merged_now:
        raise BuildMismatch(f"refusing {name}: it was built from {SOURCE} version {built_from}, and the bundle's "
                            f"{SOURCE} is now {merged_now} (the model was merged again since): serving it would "
                            f"answer with the old weights under the new ranker, catalog and prompts.\nRebuild it: "
                            f"python -m compile build --bundle {bundle.root} --target {target} --force")
    measured_under, ranker_now = entry.get("ranker"), ranker_version(bundle)
    if "ranker" in entry and measured_under != ranker_now:  # builds made before it was recorded: not checked
        raise BuildMismatch(f"refusing {name}: it was built and measured under ranker version {measured_under}, and "
                            f"the bundle's ranker (llm/ranker.json) is now {ranker_now} (refit since): its "
                            f"precision was chosen on the old ranker's scores and answer length.\nRebuild it: "
                            f"python -m compile build --bundle {bundle.root} --target {target} --force")
    machine = machine or Machine.detect(spec.device)
    problems = check_build(entry, machine)
    if problems:
        raise refuse(name, entry, machine, problems, bundle.root)
    return bundle.path(name), entry


def engine_threads(entry: dict, machine: Machine, configured: int = 0) -> tuple[int, str]:
    """(threads, why) a build runs with here: --threads; else the count the build measured fastest, if this is the
    CPU it measured on and has that many cores; else 0 (torch's default: this machine's cores). The server's engines
    and whatever times a build as served (the ortgenai build's torch baseline, the bench) use this one rule."""
    if configured:
        return configured, "--threads"
    measured = int(entry.get("num_threads") or 0)
    if not measured:
        return 0, "torch's default"
    cores = cpu_cores()
    if entry.get("device") == "cpu" and (entry.get("device_name") != machine.cpu_name or measured > cores):
        return 0, (f"torch's default: the build measured {measured} fastest on {entry.get('device_name')}, this "
                   f"is {machine.cpu_name} with {cores} cores")
    return measured, "measured fastest by the build"
