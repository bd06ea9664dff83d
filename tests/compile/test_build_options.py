"""`compile build`'s options: what each target reads is what the manifest records, options that cannot work are
refused up front, and an unmeasured GPU build is not given a precision nothing checked."""

from __future__ import annotations

import logging
import re

import pytest

from compile.build import TARGET_OPTIONS, BuildConfig, check_options_for, options_record
from compile.targets.hf_cuda import gpu_dtype


@pytest.mark.parametrize("name", ["probe_users", "repeats", "decode_steps", "prompt_tokens", "generate_k"])
def test_counts_that_cannot_work_are_refused_naming_the_option(name):
    """--probe-users 0 was a ZeroDivisionError in the latency prompt; --repeats 0 'no median for empty data'."""
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be >= 1, got 0"):
        BuildConfig(**{name: 0})


def test_a_presets_cpu_options_on_a_gpu_target_are_ignored_out_loud_and_not_recorded(caplog):
    """The quick preset sets --repeats for every machine: on a GPU it is not read, so neither refused (that would
    stop `compile all --preset quick` there) nor recorded as the build's option (it was, and in its fingerprint)."""
    config = BuildConfig(repeats=3, threads=4, generate_probes=4)
    with caplog.at_level(logging.WARNING, logger="compile.build"):
        check_options_for("hf-cuda", config)
    assert "--threads, --repeats not read by --target hf-cuda: ignored" in caplog.text
    record = options_record(config, "hf-cuda")
    assert record["generate_probes"] == 4 and "repeats" not in record and "threads" not in record
    assert options_record(config, "hf-cuda") == options_record(BuildConfig(generate_probes=4), "hf-cuda")
    assert options_record(config, "hf-cpu")["repeats"] == 3  # read there: recorded
    assert set(options_record(config, "trtllm")) == TARGET_OPTIONS["trtllm"] | {"target"}


def test_tensorrt_llm_options_elsewhere_and_a_calibration_set_without_quantization_are_refused():
    with pytest.raises(ValueError, match="--tp: TensorRT-LLM options, and the target is hf-cuda"):
        check_options_for("hf-cuda", BuildConfig(tp=2))
    with pytest.raises(ValueError, match="--calib-dataset calibrates a --quantization"):
        check_options_for("trtllm", BuildConfig(calib_dataset="my/data"))
    check_options_for("trtllm", BuildConfig(calib_dataset="my/data", quantization="int4_awq"))


def test_an_unmeasured_auto_gpu_build_is_fp32():
    """hf-cuda keeps bf16 only when it ranks like fp32 on the probes; --no-measure shipped bf16 unchecked."""
    assert gpu_dtype("auto", "9.0") == "bf16" and gpu_dtype("auto", "7.5") == "fp16"
    assert gpu_dtype("auto", "9.0", measured=False) == "fp32"
    assert gpu_dtype("bf16", "9.0", measured=False) == "bf16"  # asked for by name: taken


@pytest.mark.parametrize("options, named", [
    ({"heads": 0}, "--heads must be >= 1"),  # a ZeroDivisionError traceback after loading the data
    ({"hidden": 64, "heads": 3}, "--hidden 64 must be a multiple of --heads 3"),
    ({"hidden": 0}, "--hidden must be >= 1"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0"),
    ({"weight_decay": -1.0}, "--weight-decay must be a finite number >= 0"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
    ({"dropout": float("nan")}, "--dropout must be in [0, 1)"),
])
def test_sasrec_options_that_cannot_train_are_refused_naming_the_option(options, named):
    from compile.sasrec import SASRecConfig

    with pytest.raises(ValueError, match=re.escape(named)):
        SASRecConfig(**options)


@pytest.mark.parametrize("step, option", [("sft", "users"), ("sft", "valid_users"), ("evaluate", "users")])
def test_a_negative_user_count_is_refused_not_read_as_all(step, option, tmp_path):
    """`--users -1` sampled every user: a long run nobody asked for."""
    if step == "sft":
        from compile.sft_data import SftDataConfig, check_options

        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} must be >= 0"):
            check_options(SftDataConfig(**{option: -1}))
    else:
        from compile.evaluate_ranking import EvaluateRankingConfig, run

        with pytest.raises(ValueError, match="--users must be >= 0"):
            run(EvaluateRankingConfig(bundle=tmp_path, users=-1))
