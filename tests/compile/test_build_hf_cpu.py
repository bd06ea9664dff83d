"""`compile build --target hf-cpu` on the tiny LLM bundle: what the build and its manifest entry hold,
and refusal: a build whose manifest says other hardware, another library version, a CPU feature
this machine lacks, or whose files changed, is refused by the server's engine loading and by
`compile build` when reusing; the untouched build starts and answers like the reference."""

from __future__ import annotations

import asyncio
import json
import platform
from pathlib import Path

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile import build  # noqa: E402
from compile.targets.hf_cpu import BUILD_RECORDS, CANDIDATES, plan_candidates  # noqa: E402
from palr.bundle import Bundle, BundleError  # noqa: E402
from palr.builds import BuildMismatch, open_build  # noqa: E402
from palr.machine import ISA_FLAGS, Machine  # noqa: E402
from palr.llm import score_labels  # noqa: E402
from palr.precision import torchao_version  # noqa: E402
from ranking_server.engines.base import EngineRequest  # noqa: E402
from ranking_server.engines.factory import engine_from_build  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from ranking_server.engines.hf import HFEngine  # noqa: E402
from palr.hf_build import load_hf_build  # noqa: E402
from tests.fixtures.builds import build_config  # noqa: E402

NAME = "engine:hf-cpu"


def edit_entry(bundle_dir, **changes) -> None:
    """Change fields of the hf-cpu manifest entry, as someone copying a build elsewhere would."""
    bundle = Bundle.open(bundle_dir)
    entry = bundle.artifact(NAME)
    for key, value in changes.items():
        if isinstance(value, dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    bundle.save()


def refusal(bundle_dir, machine: Machine | None = None) -> str:
    with pytest.raises(BuildMismatch) as caught:
        open_build(Bundle.open(bundle_dir), "hf-cpu", machine)
    return str(caught.value)


def test_build_writes_a_checkpoint_and_a_manifest_entry_pinned_to_this_machine(hf_cpu_bundle):
    bundle = Bundle.open(hf_cpu_bundle)
    entry = bundle.artifact(NAME)
    here = Machine.detect("cpu")
    assert entry["target"] == "hf-cpu" and entry["engine"] == "hf" and entry["device"] == "cpu"
    assert entry["device_name"] == here.cpu_name and entry["compute_capability"] is None
    assert entry["cpu_isa"] == list(here.cpu_isa) and entry["isa_tracked"] == list(ISA_FLAGS)
    assert entry["engine_libraries"] == {"torch": torch.__version__, "transformers": here.libraries["transformers"]}
    assert set(entry["libraries"]) >= {"torch", "transformers", "onnxruntime", "onnxruntime-genai", "tensorrt_llm"}
    assert entry["dtype"] in CANDIDATES and entry["tensor_parallel_size"] == 1
    assert entry["kernel_env"] == here.kernel_env  # the kernel-capping variables it was measured under
    assert entry["build_options"]["target"] == "hf-cpu" and entry["source"] == bundle.version("llm_merged")
    files = entry["files"]
    assert {"build.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert all(len(digest) == 64 for digest in files.values())
    bundle.verify([NAME])
    record = json.loads((bundle.path(NAME) / "build.json").read_text())
    assert {k: record[k] for k in BUILD_RECORDS[entry["dtype"]]} == BUILD_RECORDS[entry["dtype"]]
    assert record["quantization"] == entry["quantization"] and record["body_dtype"] == entry["body_dtype"]


def test_build_report_compares_every_candidate_this_cpu_runs_on_latency_and_quality(hf_cpu_bundle):
    report = json.loads((hf_cpu_bundle / "reports" / "build_hf-cpu.json").read_text())
    measured, skipped = plan_candidates(list(CANDIDATES), Machine.detect("cpu").cpu_isa, torchao_version())
    assert set(report["latency"]) == set(report["quality"]) == set(measured)
    assert set(report["verdicts"]) == set(report["candidates"]) == set(CANDIDATES)
    assert all(report["verdicts"][d] == why for d, why in skipped.items())
    for dtype, latency in report["latency"].items():
        assert latency["prefill_ms"] > 0 and latency["decode_ms"] > 0
    fp32 = report["quality"]["fp32"]
    assert 0 <= fp32["score_ndcg@10"] <= 1  # real validation users with targets (llm/sft/valid.jsonl); its
    # agreement with itself is 1 by construction (measure_quality compares the reference with its own answers)
    assert report["probes"].startswith("4 validation users")
    assert set(report["threads"]) == {str(n) for n in range(1, len(report["threads"]) + 1)}
    kept = report["manifest_entry"]["dtype"]
    assert report["verdicts"][kept].startswith(("kept", "reference"))
    assert all(v.startswith(("rejected", "not measured")) for d, v in report["verdicts"].items()
               if d not in (kept, "fp32"))
    # the manifest says why, too: the decision and every candidate's verdict
    entry = Bundle.open(hf_cpu_bundle).artifact(NAME)
    assert entry["verdicts"] == report["verdicts"] and entry["decision"] == report["decision"]
    decisive = report["quality"]["fp32"]["served_decisive_probes"]
    assert 0 <= decisive <= 4  # of the 4 probes, those whose served first pick the LLM can move
    assert all(f"on {decisive} of which the LLM can move" in report["verdicts"][d] for d in measured if d != "fp32")


def test_untouched_build_starts_and_answers_like_the_reference(hf_cpu_bundle):
    bundle = Bundle.open(hf_cpu_bundle)
    model, tokenizer, _ = load_hf_build(bundle.path(NAME))
    # which precision the build kept depends on the machine (its instructions, and a latency race): bf16 KV in
    # chunks vs one pass differ by bf16 rounding, torchao's int8 weight-only kernels round differently for a chunk
    # than for a whole prompt (0.01 measured), and dynamic int8 quantizes each chunk's activations with its own
    # scale; fp32 agrees to float noise
    tolerance = 1e-4 if bundle.artifact(NAME)["dtype"] == "fp32" else 0.05
    valid = [json.loads(line) for line in (bundle.path("sft_data") / "valid.jsonl").read_text().splitlines()][:2]
    engine = engine_from_build(bundle, "hf-cpu", EngineConfig(max_batch_size=2, max_tokens_per_step=64))
    try:
        assert isinstance(engine, HFEngine) and engine.check_health()
        assert engine.version == f"hf-cpu:{bundle.version('engine:hf-cpu')}"  # model_version names the build
        for i, row in enumerate(valid):
            prefix = row["input_ids"][:row["prefix_len"]]
            request = EngineRequest(f"v{i}", prefix, row["input_ids"][row["prefix_len"]:], row["label_token_ids"])
            result = asyncio.run(engine.rank(request))
            assert result.scores == pytest.approx(score_labels(model, row["input_ids"], row["label_token_ids"]),
                                                  abs=tolerance)
    finally:
        engine.close()


def test_edited_device_kind_is_refused_saying_what_it_was_built_for(hf_cpu_bundle_copy):
    edit_entry(hf_cpu_bundle_copy, device="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    message = refusal(hf_cpu_bundle_copy)
    assert "refusing engine:hf-cpu" in message
    assert "built for cuda: NVIDIA H100 80GB HBM3 (SM 9.0)" in message
    assert f"this machine is cpu: {Machine.detect('cpu').cpu_name}" in message
    assert "device kind: built for cuda, this server runs on cpu" in message
    assert "python -m compile build" in message and "--target hf-cpu --force" in message


def test_edited_compute_capability_is_refused_on_a_gpu_with_another_sm(hf_cpu_bundle_copy):
    """The SM check, against a described H100 (no GPU here): a build for SM 8.0 does not load on SM 9.0."""
    edit_entry(hf_cpu_bundle_copy, device="cuda", device_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    here = Machine.detect("cpu")
    h100 = Machine(device="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", gpu_count=1,
                   cpu_name=here.cpu_name, cpu_isa=here.cpu_isa, libraries=here.libraries)
    message = refusal(hf_cpu_bundle_copy, h100)
    assert ("compute capability: built for SM 8.0 (NVIDIA A100-SXM4-80GB), this GPU is SM 9.0 "
            "(NVIDIA H100 80GB HBM3)") in message
    assert "this machine is cuda: NVIDIA H100 80GB HBM3 (SM 9.0) x1" in message
    assert "device kind" not in message


def test_edited_library_version_is_refused(hf_cpu_bundle_copy):
    edit_entry(hf_cpu_bundle_copy, engine_libraries={"transformers": "4.40.0"})
    message = refusal(hf_cpu_bundle_copy)
    here = Machine.detect("cpu").libraries["transformers"]
    assert f"transformers: built with 4.40.0, this machine has {here}" in message
    assert f"transformers {here}" in message.split("this machine is")[1]


def test_a_cpu_feature_this_machine_lacks_is_refused(hf_cpu_bundle_copy):
    missing = [flag for flag in ISA_FLAGS if flag not in Machine.detect("cpu").cpu_isa]
    if not missing:
        pytest.skip("this CPU has every tracked ISA flag")
    edit_entry(hf_cpu_bundle_copy, requires_isa=[missing[-1]])
    message = refusal(hf_cpu_bundle_copy)
    assert f"CPU instructions: the build needs {missing[-1]}" in message
    assert platform.machine() and "this CPU" in message


def test_a_build_measured_on_another_instruction_set_is_refused_by_the_server_and_by_compile_build(hf_cpu_bundle_copy):
    """The manifest's cpu_isa is the set the build was measured on; one more or one fewer tracked flag here (an AMX
    Xeon's build on an AVX512-BF16 EPYC, say) is another machine's measurement."""
    here = Machine.detect("cpu")
    other = [flag for flag in ISA_FLAGS if flag not in here.cpu_isa][:1] or [here.cpu_isa[-1]]
    built_on = sorted(set(here.cpu_isa) ^ set(other))
    edit_entry(hf_cpu_bundle_copy, cpu_isa=built_on, device_name="Other CPU")
    message = refusal(hf_cpu_bundle_copy)
    assert "CPU kernels: built and measured on Other CPU (" in message
    assert f"this CPU ({here.cpu_name}) {'lacks' if other[0] not in here.cpu_isa else 'also has'} {other[0]}" in message
    with pytest.raises(BuildMismatch, match="CPU kernels"):
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu"))
    edit_entry(hf_cpu_bundle_copy, cpu_isa=list(here.cpu_isa))
    assert open_build(Bundle.open(hf_cpu_bundle_copy), "hf-cpu")[1]["device_name"] == "Other CPU"


def test_changed_file_is_refused(hf_cpu_bundle_copy):
    config = hf_cpu_bundle_copy / "engines" / "hf-cpu" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    message = refusal(hf_cpu_bundle_copy)
    assert "refusing engine:hf-cpu: its files are not the ones that were built" in message
    assert "config.json checksum" in message


def rewrite_input(bundle_dir, name: str, json_file: Path, key: str) -> None:
    """`json_file` of the bundle's artifact `name` gains `key`, and the artifact is recorded again, as merge does."""
    json_file.write_text(json_file.read_text().replace("{", f'{{\n  "{key}": true,', 1))
    bundle = Bundle.open(bundle_dir)
    bundle.add_artifact(name, bundle.artifact(name)["path"])
    bundle.save()


def test_a_build_made_from_an_earlier_merge_is_refused(hf_cpu_bundle_copy):
    """merge ran again (a new LoRA, new item tokens): the old build's own files still check out, but its weights
    are not the bundle's model any more; it used to be served under the new ranker and catalog."""
    merged = Bundle.open(hf_cpu_bundle_copy).path("llm_merged")
    rewrite_input(hf_cpu_bundle_copy, "llm_merged", merged / "generation_config.json", "_merged_again")
    message = refusal(hf_cpu_bundle_copy)
    assert "it was built from llm_merged version" in message and "merged again since" in message
    assert f"compile build --bundle {hf_cpu_bundle_copy} --target hf-cpu --force" in message


def test_a_build_measured_under_an_earlier_ranker_is_refused(hf_cpu_bundle_copy):
    """merge refit llm/ranker.json (fusion weights, answer format) and left the merged weights byte-identical: the
    build's files and source still check out, but its precision was chosen on the old ranker's scores."""
    bundle = Bundle.open(hf_cpu_bundle_copy)
    assert bundle.artifact(NAME)["ranker"] == bundle.version("ranker")
    rewrite_input(hf_cpu_bundle_copy, "ranker", bundle.path("ranker"), "_refit")
    message = refusal(hf_cpu_bundle_copy)
    assert "built and measured under ranker version" in message and "refit since" in message
    assert f"compile build --bundle {hf_cpu_bundle_copy} --target hf-cpu --force" in message


def test_a_build_that_fails_before_its_builder_runs_leaves_no_scratch_folder(hf_cpu_bundle_copy):
    """The scratch folder was made before the generate-token count was read from ranker.json: a failure there (or
    a Ctrl-C) left `engines/.hf-cpu.building.*` behind, one per try."""
    (hf_cpu_bundle_copy / "llm" / "ranker.json").write_text("{ not json")
    bundle = Bundle.open(hf_cpu_bundle_copy)  # recorded so: the build reads it, as it would a valid one
    entry = bundle.artifact("ranker")
    bundle.add_artifact("ranker", entry["path"], **{k: v for k, v in entry.items()
                                                   if k not in ("path", "sha256", "files", "created_at")})
    bundle.save()
    with pytest.raises(json.JSONDecodeError):  # ranker.json, read for the generate-token count
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu", generate_tokens=0, force=True))
    assert [p.name for p in (hf_cpu_bundle_copy / "engines").iterdir()] == ["hf-cpu"]


def test_a_build_refuses_merged_weights_the_manifest_does_not_name(hf_cpu_bundle_copy):
    """A merge stopped after rewriting llm/merged (before it recorded the new files) left new weights under the old
    version; the build made an engine of them and recorded it as built from that version."""
    before = Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["sha256"]
    changed = hf_cpu_bundle_copy / "llm" / "merged" / "generation_config.json"
    changed.write_text(changed.read_text().replace("{", '{"max_new_tokens": 7, ', 1))
    with pytest.raises(BundleError, match="llm_merged: generation_config.json checksum"):
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu", measure=False, dtype="fp32", force=True))
    assert [p.name for p in (hf_cpu_bundle_copy / "engines").iterdir()] == ["hf-cpu"]
    assert Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["sha256"] == before


@pytest.mark.parametrize("edit, named", [
    (lambda artifacts: artifacts["lora"].update(sft_data="0123456789ab"), "trained on sft_data 0123456789ab"),
    (lambda artifacts: artifacts["lora"].update(sha256="fedcba9876543210"), "the bundle's is fedcba987654"),
    (lambda artifacts: artifacts.pop("lora"), "a finetune run is unfinished"),  # finetune drops it while it runs
])
def test_a_build_refuses_probes_from_sft_data_the_served_model_was_not_trained_on(hf_cpu_bundle_copy, edit, named):
    """sft-data run again with other prompt options (or finetune without merge): the build chose the precision on
    validation prompts the merged model never saw."""
    from compile.steps import StepFailed

    manifest = json.loads((hf_cpu_bundle_copy / "manifest.json").read_text())
    edit(manifest["artifacts"])
    (hf_cpu_bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StepFailed, match=f"{named}.*(finetune and|finish it and) merge first"):
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu", measure=False, dtype="fp32", force=True))
    assert [p.name for p in (hf_cpu_bundle_copy / "engines").iterdir()] == ["hf-cpu"]


def test_a_build_whose_manifest_cannot_be_saved_puts_the_old_build_back(hf_cpu_bundle_copy, monkeypatch):
    """The old build was deleted before the new one was recorded: a failed save (a full disk, a kill) left files the
    manifest's checksums did not match, and the server refused to start until a rebuild."""
    before = Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["sha256"]

    def full_disk(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(Bundle, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu", measure=False, dtype="fp32", force=True))
    monkeypatch.undo()
    assert [p.name for p in (hf_cpu_bundle_copy / "engines").iterdir()] == ["hf-cpu"]
    bundle = Bundle.open(hf_cpu_bundle_copy)
    assert bundle.artifact(NAME)["sha256"] == before
    open_build(bundle, "hf-cpu")  # its files are the ones the manifest names: it serves


def test_an_unmeasured_build_is_still_refused_a_precision_this_cpu_lacks(tiny_llm_bundle, tmp_path):
    """--no-measure --dtype bf16 on a CPU without native bf16 wrote a build its own server then refused."""
    from compile.targets import BuildContext
    from compile.targets.hf_cpu import build as build_hf_cpu

    bundle = Bundle.open(tiny_llm_bundle)
    no_bf16 = Machine(device="cpu", device_name="test CPU", compute_capability=None, gpu_count=0,
                      cpu_name="test CPU", cpu_isa=("avx2", "fma", "avx512f"))
    config = build_config(tiny_llm_bundle, "hf-cpu", measure=False, dtype="bf16")
    with pytest.raises(ValueError, match="--dtype bf16: not measured: CPU lacks amx_bf16/avx512_bf16"):
        build_hf_cpu(BuildContext(config, no_bf16, bundle, bundle.path("llm_merged"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_builds_thread_count_applies_only_on_the_cpu_that_measured_it(hf_cpu_bundle):
    """A build made on a 2-core box ran a 32-core server on 2 threads; one made on 64 cores oversubscribed a
    4-CPU pod."""
    from palr.machine import cpu_cores
    from palr.builds import engine_threads

    here = Machine.detect("cpu")
    entry = {**Bundle.open(hf_cpu_bundle).artifact(NAME), "num_threads": 1}
    assert engine_threads(entry, here, 0) == (1, "measured fastest by the build")
    assert engine_threads(entry, here, 3) == (3, "--threads")
    threads, why = engine_threads({**entry, "device_name": "Other CPU"}, here, 0)
    assert threads == 0 and why.startswith("torch's default: the build measured 1 fastest on Other CPU")
    assert engine_threads({**entry, "num_threads": cpu_cores() + 1}, here, 0)[0] == 0


def test_a_build_from_another_cpu_is_served_with_this_machines_threads_not_the_build_machines(hf_cpu_bundle_copy):
    """engine_threads decided "torch's default" for a build measured on another CPU, but loading the build set
    torch to the build machine's count anyway (a 2-core build ran a 32-core server on 2 threads)."""
    import torch

    measured = Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["num_threads"]
    edit_entry(hf_cpu_bundle_copy, device_name="Other CPU")
    before = torch.get_num_threads()
    torch.set_num_threads(measured + 1)  # whatever this process runs with, as long as it is not the build's count
    try:
        engine = engine_from_build(Bundle.open(hf_cpu_bundle_copy), "hf-cpu", EngineConfig())
        engine.close()
        assert torch.get_num_threads() == measured + 1
    finally:
        torch.set_num_threads(before)


def test_server_engine_loading_refuses_before_loading_anything(hf_cpu_bundle_copy):
    edit_entry(hf_cpu_bundle_copy, engine_libraries={"torch": "1.0.0"})
    with pytest.raises(BuildMismatch, match="torch: built with 1.0.0"):
        engine_from_build(Bundle.open(hf_cpu_bundle_copy), "hf-cpu", EngineConfig())


def test_compile_build_reuses_a_current_build_and_refuses_one_made_elsewhere(hf_cpu_bundle_copy, caplog):
    config = build_config(hf_cpu_bundle_copy, "hf-cpu")
    before = Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["sha256"]
    with caplog.at_level("INFO"):
        build.run(config)
    assert "is current and fits this machine (" in caplog.text and "skipping" in caplog.text
    assert Bundle.open(hf_cpu_bundle_copy).artifact(NAME)["sha256"] == before
    edit_entry(hf_cpu_bundle_copy, device="cuda", compute_capability="9.0")
    with pytest.raises(BuildMismatch, match="device kind: built for cuda"):
        build.run(config)
    assert isinstance(BuildMismatch("x"), BundleError)


def test_compile_build_without_merged_model_says_what_is_missing(tmp_path):
    Bundle.open_or_create(tmp_path).save()
    with pytest.raises(BundleError, match="no artifact 'llm_merged'"):
        build.run(build_config(tmp_path, "hf-cpu"))


def test_ranking_server_serves_the_untouched_build(server_loop, hf_cpu_bundle, caplog):
    import grpc

    from recsys.v1 import ranking_pb2, ranking_pb2_grpc
    from tests.ranking_server.test_server import start_ranking, start_retrieval

    retrieval = start_retrieval(server_loop, hf_cpu_bundle)
    try:
        with caplog.at_level("INFO"):
            ranking = start_ranking(server_loop, hf_cpu_bundle, retrieval.server.address)
        assert "hf engine: build hf-cpu" in caplog.text
        with grpc.insecure_channel(ranking.server.address) as channel:
            response = ranking_pb2_grpc.RankingServiceStub(channel).Recommend(
                ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=60)
        assert len(response.items) == 3 and not response.degraded
        server_loop.run(ranking.drain())
    finally:
        server_loop.run(retrieval.drain())


def test_ranking_server_refuses_to_start_on_a_build_for_another_machine(hf_cpu_bundle_copy):
    import subprocess
    import sys

    edit_entry(hf_cpu_bundle_copy, device="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    result = subprocess.run([sys.executable, "-m", "ranking_server", "--bundle", str(hf_cpu_bundle_copy), "--port", "0",
                             "--retrieval", "127.0.0.1:9"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot serve: refusing engine:hf-cpu" in result.stderr
    assert "built for cuda: NVIDIA H100 80GB HBM3 (SM 9.0)" in result.stderr


def test_a_refit_ranker_json_makes_compile_build_measure_again(hf_cpu_bundle_copy, caplog):
    """A refit ranker.json (here: another generate label-logit weight) leaves the merged weights unchanged, but
    the build measured its generate-mode bar with the old one: `compile build` builds again instead of skipping."""
    bundle = Bundle.open(hf_cpu_bundle_copy)
    ranker = json.loads(bundle.path("ranker").read_text())
    ranker["generate_logit_weight"] = 0.5 if ranker.get("generate_logit_weight") != 0.5 else 0.25
    bundle.path("ranker").write_text(json.dumps(ranker))
    bundle.add_artifact("ranker", bundle.artifact("ranker")["path"])
    bundle.save()
    with caplog.at_level("INFO"):
        build.run(build_config(hf_cpu_bundle_copy, "hf-cpu"))
    assert "skipping" not in caplog.text and "build: hf-cpu on" in caplog.text


def test_a_changed_tokenizer_in_llm_merged_is_refused_though_a_build_serves(hf_cpu_bundle_copy):
    """With a build, llm/merged's weights are never loaded, but its tokenizer builds every prompt: it was read
    unverified (an interrupted merge rewrites llm/merged before the manifest). Only its small files are hashed."""
    from ranking_server.config import RankingServerConfig
    from ranking_server.server import RankingServer, not_weights

    assert not_weights("tokenizer.json") and not not_weights("model.safetensors")
    tokenizer = Bundle.open(hf_cpu_bundle_copy).path("llm_merged") / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text().replace("{", '{\n  "model_max_length": 7,', 1))
    with pytest.raises(BundleError, match="llm_merged: tokenizer_config.json checksum"):
        RankingServer(RankingServerConfig(bundle=hf_cpu_bundle_copy, port=0, retrieval="127.0.0.1:9"))


@pytest.mark.parametrize("logit_weight", [0.0, 1.0])
def test_the_latency_model_of_generate_mode_has_decode_steps_only_where_the_server_decodes(tiny_llm_bundle, tmp_path,
                                                                                           logit_weight):
    """At generate_logit_weight 0 the server writes the answer from the prompt pass's scores (no decode step), but
    the build modelled generate as prefill + k title lines of decode steps: ortgenai-cpu, slower to prefill and
    quicker to decode, then won generate mode on paper and was routed the requests it serves slower."""
    from tests.fixtures.builds import copy_bundle

    bundle_dir = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    ranker_path = bundle_dir / "llm" / "ranker.json"
    ranker = json.loads(ranker_path.read_text())
    ranker_path.write_text(json.dumps(ranker | {"generate_logit_weight": logit_weight}))
    tokens, why = build.served_generate_tokens(Bundle.open(bundle_dir))
    if logit_weight == 0:
        assert tokens == 1 and "generate_logit_weight 0" in why
    else:
        assert tokens > ranker["generate_k"]  # k answer lines, each a label and its title's tokens


def test_a_gpu_build_on_gpus_of_different_kinds_is_refused_naming_the_remedy(tiny_llm_bundle, monkeypatch):
    """A described machine (no GPU here): an H100 beside an A100 read as device 0's SM before; now "mixed", which
    the build's dtype choice could not parse (a ValueError deep in the target)."""
    from compile.steps import StepFailed

    here = Machine.detect("cpu")
    mixed = Machine(device="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="mixed: 8.0, 9.0",
                    gpu_count=2, cpu_name=here.cpu_name, cpu_isa=here.cpu_isa, libraries=here.libraries)
    monkeypatch.setattr(build.Machine, "detect", staticmethod(lambda device="cpu": mixed))
    with pytest.raises(StepFailed, match=r"GPUs differ in compute capability \(mixed: 8.0, 9.0\).*CUDA_VISIBLE_DEVICES"):
        build.run(build_config(tiny_llm_bundle, "hf-cuda"))


def test_a_candidate_whose_readouts_are_not_finite_is_rejected_and_the_build_goes_on(tiny_llm_bundle, tmp_path,
                                                                                     monkeypatch):
    """The int8 candidate's label rows made NaN (a precision that overflows): the whole hf-cpu build, its report
    and its log, rejects it with the reason and keeps a candidate that reads finite."""
    from compile.targets import BuildContext
    from compile.targets import hf_cpu

    real_variant = hf_cpu.variant

    def spoilt(model, dtype):
        built = real_variant(model, dtype)
        if dtype == "int8":
            with torch.no_grad():
                built.lm_head = torch.nn.Linear(built.lm_head.in_features, built.lm_head.out_features, bias=False)
                built.lm_head.weight.fill_(float("nan"))
        return built

    if "int8" not in plan_candidates(["int8"], Machine.detect("cpu").cpu_isa, torchao_version())[0]:
        pytest.skip("this CPU runs no dynamic int8 build (it needs avx2)")
    monkeypatch.setattr(hf_cpu, "variant", spoilt)
    bundle = Bundle.open(tiny_llm_bundle)
    config = build_config(tiny_llm_bundle, "hf-cpu", candidates=["fp32", "int8"], threads=1)
    result = hf_cpu.build(BuildContext(config, Machine.detect("cpu"), bundle, bundle.path("llm_merged"),
                                       tmp_path / "out"))
    report = result.report
    assert "not finite" in report["quality"]["int8"]["error"]
    assert report["verdicts"]["int8"].startswith("rejected: ") and "not finite" in report["verdicts"]["int8"]
    assert report["decision"].startswith("kept fp32")
    assert report["latency_threads"] == 1  # the candidates are compared at the --threads count that serves
    asked = build_config(tiny_llm_bundle, "hf-cpu", candidates=["fp32", "int8"], threads=1, dtype="int8")
    with pytest.raises(ValueError, match="--dtype int8: .*not finite"):  # asked for, it is refused, not shipped
        hf_cpu.build(BuildContext(asked, Machine.detect("cpu"), bundle, bundle.path("llm_merged"), tmp_path / "asked"))
