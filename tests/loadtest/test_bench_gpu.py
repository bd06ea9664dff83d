"""The GPU benchmark script, run here as a CPU smoke run on a tiny Llama shape (the real run needs a
CUDA GPU: tests/gpu/test_gpu_bench.py, `python -m loadtest.bench gpu`): it builds the model, drives
the hf engine in both modes at each concurrency, and writes the report with the limit ratios."""

from __future__ import annotations

import json

import pytest


from loadtest.bench_gpu import GpuBenchConfig, gpu_peaks, run  # noqa: E402

SMOKE = dict(device="cpu", dtype="fp32", layers=2, hidden=64, heads=4, intermediate=128, score_requests=3, requests=6,
             concurrency=[1, 3], generate_requests=2, generate_k=3, max_batch_size=4, max_tokens_per_step=1024)


def test_gpu_peak_table_knows_the_gpus_we_compare_with():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert gpu_peaks("NVIDIA H100 PCIe") == (2.0e12, 756e12)
    assert gpu_peaks("NVIDIA H200") == (4.8e12, 989e12)
    assert gpu_peaks("NVIDIA A100-SXM4-80GB") == (2.039e12, 312e12)
    assert gpu_peaks("Some Future GPU") is None


def test_smoke_run_writes_the_report_with_every_measurement(smollm2_tokenizer_dir, tmp_path):
    config = GpuBenchConfig(out=tmp_path, tokenizer=smollm2_tokenizer_dir, bandwidth=1e11, peak_flops=1e12, **SMOKE)
    report = run(config)
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["score_batch1"] == report["score_batch1"] and "p99_ms" in saved["score_batch1"]
    assert 250 <= saved["prompt_tokens_median"] <= 600  # PALR prompts, 10 history titles + 20 candidates
    assert saved["score_batch1"]["cached_tokens_median"] == saved["prefix_tokens"] > 0  # prefix KV reused
    levels = [(row["mode"], row["concurrency"]) for row in saved["levels"]]
    assert levels == [("score", 1), ("score", 3), ("generate", 3)]
    assert all(row["ok"] == 6 and not row["errors"] for row in saved["levels"])
    assert saved["generate_batch1"]["time_per_output_token_ms"] > 0
    limits = saved["limits"]
    weights = saved["model"]["weight_bytes"]
    assert limits["decode_step_floor_ms"] == pytest.approx(1e3 * weights / 1e11, rel=1e-3)
    assert limits["decode_ratio"] == pytest.approx(limits["decode_step_measured_ms"] / limits["decode_step_floor_ms"],
                                                   rel=0.01)
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert "Physical limits" in markdown and "decode step (batch 1)" in markdown
