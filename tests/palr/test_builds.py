"""palr/targets.py, palr/machine.py, palr/builds.py: reading the CPU, mapping server flags to build targets, and every kind of
mismatch `check_build` reports (the manifest-editing tests in test_build_hf_cpu.py go end to end)."""

from __future__ import annotations

import dataclasses

import pytest

from palr.builds import check_build, describe_build, isa_satisfied
from palr.machine import Machine, cpu_description, library_version
from palr.targets import TARGETS, target_for

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""


def h100(**changes) -> Machine:
    values = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", gpu_count=2,
                  cpu_name="x", cpu_isa=("avx2",), libraries={"tensorrt_llm": "1.2.1", "torch": "2.9.1"})
    return Machine(**(values | changes))


def trtllm_entry(**changes) -> dict:
    entry = {"target": "trtllm", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "tensor_parallel_size": 1, "engine_libraries": {"tensorrt_llm": "1.2.1"}, "dtype": "bf16"}
    return entry | changes


def test_cpu_model_and_the_isa_flags_that_matter_come_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    name, isa = cpu_description(path)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert isa == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                   "amx_int8"]
    assert cpu_description(tmp_path / "missing")[1] == []


def test_this_machine_is_described_for_cpu():
    machine = Machine.detect("cpu")
    assert machine.device == "cpu" and machine.compute_capability is None and machine.gpu_count == 0
    assert machine.libraries["torch"] == library_version("torch")
    assert machine.describe(("torch",)).startswith(f"cpu: {machine.cpu_name}")
    with pytest.raises(ValueError, match="cpu or cuda"):
        Machine.detect("tpu")


def test_server_flags_map_to_build_targets():
    assert target_for("hf", "cpu") == "hf-cpu" and target_for("hf", "cuda") == "hf-cuda"
    assert target_for("trtllm", "cuda") == "trtllm" and target_for("ortgenai", "cpu") == "ortgenai-cpu"
    with pytest.raises(ValueError, match="no build target for --engine trtllm --device cpu"):
        target_for("trtllm", "cpu")
    assert set(TARGETS) == {"hf-cpu", "hf-cuda", "ortgenai-cpu", "trtllm"}


def test_isa_requirements_accept_alternatives():
    assert isa_satisfied("amx_bf16|avx512_bf16", ("avx2", "avx512_bf16"))
    assert not isa_satisfied("amx_bf16|avx512_bf16", ("avx2",))


def test_a_matching_gpu_build_has_no_problems():
    assert check_build(trtllm_entry(), h100()) == []


def test_every_mismatch_is_listed():
    problems = check_build(trtllm_entry(compute_capability="8.0", device_name="NVIDIA A100-SXM4-80GB",
                                        tensor_parallel_size=4, engine_libraries={"tensorrt_llm": "0.21.0"}), h100())
    assert problems == [
        "compute capability: built for SM 8.0 (NVIDIA A100-SXM4-80GB), this GPU is SM 9.0 (NVIDIA H100 80GB HBM3)",
        "tensor parallelism: built for 4 GPUs, this machine has 2",
        "tensorrt_llm: built with 0.21.0, this machine has 1.2.1",
    ]


def test_gpu_build_on_a_cpu_machine_and_a_missing_library():
    cpu = Machine("cpu", "AMD EPYC", None, 0, "AMD EPYC", ("avx2",), {"tensorrt_llm": None})
    problems = check_build(trtllm_entry(), cpu)
    assert problems == ["device kind: built for cuda, this server runs on cpu",
                        "tensorrt_llm: built with 1.2.1, this machine has none installed"]
    no_gpu = h100(gpu_count=0, compute_capability=None, device_name="no CUDA device")
    assert "device kind: built for a CUDA GPU, this machine has no CUDA device" in check_build(trtllm_entry(), no_gpu)


def test_cpu_build_needing_instructions_this_cpu_lacks():
    entry = {"target": "hf-cpu", "device": "cpu", "device_name": "Xeon 8480+", "requires_isa": ["amx_bf16|avx512_bf16"],
             "engine_libraries": {}, "dtype": "bf16"}
    cpu = Machine("cpu", "AMD EPYC", None, 0, "AMD EPYC", ("avx2", "fma"), {})
    assert check_build(entry, cpu) == ["CPU instructions: the build needs amx_bf16|avx512_bf16; this CPU (AMD EPYC) "
                                       "has avx2, fma"]
    assert describe_build(entry) == "cpu: Xeon 8480+ (needs amx_bf16|avx512_bf16); bf16"


XEON_ISA = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
EPYC_ISA = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")


def test_a_cpu_build_is_refused_on_a_cpu_with_another_instruction_set():
    """A bf16-body build kept under AMX was served on an AVX512-BF16 EPYC without a word (its bf16 requirement
    holds there), and an fp32 build made without bf16 was served on an AMX Xeon: neither precision was measured
    where it ran."""
    xeon_build = {"target": "hf-cpu", "device": "cpu", "device_name": "Xeon 8480+", "requires_isa": ["amx_bf16|avx512_bf16"],
                  "cpu_isa": XEON_ISA, "engine_libraries": {}, "dtype": "bf16-body"}
    epyc = Machine("cpu", "AMD EPYC", None, 0, "AMD EPYC", EPYC_ISA, {})
    assert check_build(xeon_build, epyc) == [
        "CPU kernels: built and measured on Xeon 8480+ (" + ", ".join(XEON_ISA) + "); this CPU (AMD EPYC) lacks "
        "amx_bf16, amx_int8, amx_tile and also has avx_vnni, so the precision it kept and its timings do not hold here"]
    assert check_build(xeon_build, Machine("cpu", "Xeon 8480+", None, 0, "Xeon 8480+", tuple(XEON_ISA), {})) == []
    old_cpu_build = {"target": "ortgenai-cpu", "device": "cpu", "device_name": "AMD EPYC", "requires_isa": [],
                     "cpu_isa": ["avx2", "fma"], "engine_libraries": {}}
    xeon = Machine("cpu", "Xeon 8480+", None, 0, "Xeon 8480+", tuple(XEON_ISA), {})
    assert "this CPU (Xeon 8480+) also has amx_bf16, amx_int8, amx_tile, avx512_bf16, avx512_vnni, avx512bw, avx512f, " \
           "f16c, so" in check_build(old_cpu_build, xeon)[0]
    no_record = {k: v for k, v in old_cpu_build.items() if k != "cpu_isa"}  # built before the flags were recorded
    assert check_build(no_record, xeon) == []
    # a flag tracked since the build was made (not in its isa_tracked) is not held against it
    tracked_then = [f for f in XEON_ISA if not f.startswith("amx")]
    earlier = {**xeon_build, "cpu_isa": [f for f in XEON_ISA if f in tracked_then], "isa_tracked": tracked_then}
    assert check_build(earlier, xeon) == []
    # a missing required instruction is the one problem named, not twice
    assert [p.split(":")[0] for p in check_build(xeon_build, Machine("cpu", "AMD EPYC", None, 0, "AMD EPYC",
                                                                   ("avx2", "fma"), {}))] == ["CPU instructions"]


def test_an_int8_weight_only_build_pins_torchao():
    """torchao quantizes the int8 weight-only build at load: without it the server crashed in the load with an
    ImportError traceback; now the build check refuses it first, and another version too."""
    entry = {"target": "hf-cpu", "device": "cpu", "device_name": "Xeon", "requires_isa": [], "dtype": "int8-wo",
             "engine_libraries": {"torch": "2.13.0"}, "torchao": "0.18.0"}
    libraries = {"torch": "2.13.0"}
    assert check_build(entry, Machine("cpu", "Xeon", None, 0, "Xeon", (), libraries | {"torchao": "0.18.0"})) == []
    assert check_build(entry, Machine("cpu", "Xeon", None, 0, "Xeon", (), libraries | {"torchao": None})) == [
        "torchao: built with 0.18.0, this machine has none installed"]
    assert check_build(entry, Machine("cpu", "Xeon", None, 0, "Xeon", (), libraries | {"torchao": "0.19.0"})) == [
        "torchao: built with 0.18.0, this machine has 0.19.0"]
    assert check_build({k: v for k, v in entry.items() if k != "torchao"},
                       Machine("cpu", "Xeon", None, 0, "Xeon", (), libraries | {"torchao": None})) == []


def test_an_ortgenai_routing_measured_against_another_hf_cpu_build_is_stale():
    """serves_modes says where onnxruntime-genai beat the hf-cpu build of its day; a build made, rebuilt or
    removed since makes the split unproven (the server warns); entries from before the record are not judged."""
    from palr.builds import stale_routing

    entry = {"serves_modes": ["score"], "routing_baseline": "abc"}
    assert stale_routing(entry, "abc") is None
    assert "measured against hf-cpu build abc, and the bundle's is now def" in stale_routing(entry, "def")
    assert "is now (none)" in stale_routing(entry, None)
    assert "(none: torch fp32)" in stale_routing(entry | {"routing_baseline": None}, "def")
    assert stale_routing({"serves_modes": ["score"]}, "def") is None


def test_gpus_of_different_compute_capabilities_are_one_mixed_value_no_build_matches():
    """Only device 0's SM was read: a tensor-parallel engine built on two H100s passed the check on an H100 + A100."""
    from palr.machine import compute_capability

    assert compute_capability([(9, 0), (9, 0)]) == "9.0"
    mixed = compute_capability([(9, 0), (8, 0), (9, 0)])
    assert mixed == "mixed: 8.0, 9.0"
    assert any(p.startswith("compute capability: built for SM 9.0") for p in
               check_build(trtllm_entry(tensor_parallel_size=2), h100(compute_capability=mixed)))


def test_a_cpu_build_is_refused_under_other_kernel_settings(monkeypatch):
    """ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY cap which instructions torch's kernels use whatever the CPU has: a
    build measured without them and served under ONEDNN_MAX_CPU_ISA=AVX2 runs its bf16 emulated, unannounced."""
    from palr.machine import KERNEL_ENV

    for name in KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    build = {"target": "hf-cpu", "engine": "hf", "device": "cpu", "device_name": "AMD EPYC", "requires_isa": [],
             "cpu_isa": EPYC_ISA, "engine_libraries": {}, "kernel_env": Machine.detect("cpu").kernel_env}
    assert build["kernel_env"] == {}
    epyc = Machine("cpu", "AMD EPYC", None, 0, "AMD EPYC", EPYC_ISA, {})
    assert check_build(build, epyc) == []
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = dataclasses.replace(epyc, kernel_env=Machine.detect("cpu").kernel_env)
    assert check_build(build, capped) == [
        f"CPU kernel settings: built and measured with none of {', '.join(KERNEL_ENV)} set, this server runs with "
        "ONEDNN_MAX_CPU_ISA=AVX2: they cap which instructions torch's kernels use, so the precision it kept and its "
        "timings do not hold here"]
    assert check_build({k: v for k, v in build.items() if k != "kernel_env"}, capped) == []  # older builds: unchecked
    assert check_build({**build, "target": "ortgenai-cpu", "engine": "ortgenai"}, capped) == []  # ORT reads none
