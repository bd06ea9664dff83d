"""`python -m compile <step>`: a refused option or input is one logged line and exit 1, not a traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from loadtest.servers import REPO


@pytest.mark.parametrize("args, reason", [
    (["build", "--tp", "0"], "build failed: --tp must be >= 1, got 0"),
    (["trends", "--bundle", "{tmp}/no-bundle"], "trends failed: "),
    (["build", "--bundle", "{tmp}/no-bundle", "--target", "hf-cpu", "--tp", "2", "--quantization", "fp8"],
     "build failed: --quantization, --tp: TensorRT-LLM options, and the target is hf-cpu"),  # ignored, yet recorded
])
def test_a_refused_step_says_why_in_one_line_and_exits_1(tmp_path, args, reason):
    argv = [sys.executable, "-m", "compile", *[a.format(tmp=tmp_path) for a in args]]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert reason in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_build_for_a_library_this_machine_lacks_says_so_in_one_line(tiny_llm_bundle):
    """A failure the step can name (StepFailed: here TensorRT-LLM missing) is one line with the install hint."""
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here")
    argv = [sys.executable, "-m", "compile", "build", "--bundle", str(tiny_llm_bundle), "--target", "trtllm"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    missing = "build failed: --target trtllm needs tensorrt_llm and tensorrt, which are not installed here"
    assert missing in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_an_engine_library_that_is_installed_but_does_not_load_is_one_line(tiny_llm_bundle, tmp_path):
    """Installed (its metadata is there, so the build's library check passes) but its import fails (a CUDA or
    driver mismatch, a missing .so): the runtime's EngineError, with its install hint, was a traceback."""
    broken = tmp_path / "site" / "onnxruntime_genai"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libonnxruntime-genai.so: cannot open shared object")\n')
    argv = [sys.executable, "-m", "compile", "build", "--bundle", str(tiny_llm_bundle), "--target", "ortgenai-cpu"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{broken.parent}{os.pathsep}{REPO}"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "build failed: the ortgenai engine needs onnxruntime-genai" in done.stderr, done.stderr[-2000:]
    assert "cannot open shared object" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("tier, shown", [([], "evaluate-retrieval"), (["--tier", "ranking"], "evaluate-ranking")])
def test_evaluate_help_says_it_is_an_alias_and_whose_options_follow(tier, shown, capsys):
    """`compile evaluate --help` printed evaluate-retrieval's help alone: --tier was never mentioned."""
    from compile.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["evaluate", *tier, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--tier ranking runs evaluate-ranking" in out
    assert f"below, {shown}'s options" in out and f"usage: python -m compile {shown}" in out
