"""The GPU benchmark on the GPU with a 2-layer Llama-2-7B-width model (the full run is
`python -m loadtest.bench gpu`): it runs end to end and finds this GPU's peak numbers."""

from __future__ import annotations

import pytest

from loadtest.bench_gpu import GpuBenchConfig, gpu_peaks, run

pytestmark = pytest.mark.gpu


def test_benchmark_runs_on_this_gpu(cuda, smollm2_tokenizer_dir, tmp_path):
    import torch

    report = run(GpuBenchConfig(out=tmp_path, tokenizer=smollm2_tokenizer_dir, layers=2, score_requests=5,
                                requests=16, generate_requests=3))
    assert report["device"]["name"] == torch.cuda.get_device_name(0)
    assert report["generate_batch1"]["time_per_output_token_ms"] > 0
    if gpu_peaks(report["device"]["name"]):
        assert report["limits"]["decode_ratio"] > 0.5  # measured decode cannot beat the bandwidth floor by 2x
    assert (tmp_path / "gpu_bench.md").is_file()
