"""`compile build --target trtllm` and the trtllm engine on a real GPU with TensorRT-LLM: the saved
engine (paged KV, paged context FMHA), score mode against the reference, generate mode under the
logits processor (constraint and bias obeyed), abort on cancel, overload. Skipped without a CUDA
GPU or without TensorRT-LLM; the pure parts are tested on CPU in tests/ranking_server/test_engines_trtllm_requests.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from compile import build
from palr.bundle import Bundle
from ranking_server.engines.base import EngineAborted, EngineOverloaded, EngineRequest
from tests.fixtures.builds import build_config, copy_bundle

pytestmark = [pytest.mark.gpu, pytest.mark.trtllm]
SMALL = dict(max_batch_size=8, max_num_tokens=2048, max_input_len=1024, max_seq_len=1280)


@pytest.fixture(scope="module")
def trtllm_bundle(trtllm, tiny_llm_bundle, tmp_path_factory):
    bundle = copy_bundle(tiny_llm_bundle, tmp_path_factory.mktemp("trtllm-build") / "bundle")
    build.run(build_config(bundle, "trtllm", **SMALL))
    return bundle


@pytest.fixture(scope="module")
def engine(trtllm_bundle):
    from ranking_server.engines.trtllm import TrtllmConfig, TrtllmEngine

    engine = TrtllmEngine(Bundle.open(trtllm_bundle).path("engine:trtllm"), TrtllmConfig(max_batch_size=8, max_queue=8))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def valid(trtllm_bundle):
    bundle = Bundle.open(trtllm_bundle)
    rows = [json.loads(line) for line in (bundle.path("sft_data") / "valid.jsonl").read_text().splitlines()]
    return bundle, rows[:6]


def request_of(row, i, **changes) -> EngineRequest:
    p = row["prefix_len"]
    return EngineRequest(f"v{i}", row["input_ids"][:p], row["input_ids"][p:], row["label_token_ids"], **changes)


def test_saved_engine_has_paged_kv_and_paged_context_fmha(trtllm, trtllm_bundle):
    import torch

    entry = Bundle.open(trtllm_bundle).artifact("engine:trtllm")
    major, minor = torch.cuda.get_device_capability(0)
    assert entry["compute_capability"] == f"{major}.{minor}"
    assert entry["engine_libraries"]["tensorrt_llm"] == trtllm.__version__
    assert entry["use_paged_context_fmha"] is True and "PAGED" in entry["kv_cache_type"]
    assert {"config.json", "rank0.engine"} <= set(entry["files"])


def test_score_mode_matches_the_reference(engine, valid):
    from palr.llm import load_causal_lm, score_labels

    bundle, rows = valid
    model, _ = load_causal_lm(bundle.path("llm_merged"))

    async def all_at_once():
        return await asyncio.gather(*(engine.rank(request_of(r, i)) for i, r in enumerate(rows)))

    results = asyncio.run(all_at_once())
    for row, result in zip(rows, results):
        expected = score_labels(model, row["input_ids"], row["label_token_ids"])
        assert result.scores == pytest.approx(expected, abs=5e-2)  # bf16 engine vs fp32 reference


def test_generate_mode_obeys_the_constraint_and_the_bias(engine, valid):
    _, rows = valid
    row = rows[0]
    n = len(row["label_token_ids"])
    bias = [0.0] * n
    bias[n - 1] = 100.0  # the last candidate must come first

    async def both():
        return await asyncio.gather(engine.rank(request_of(row, 0, mode="generate", k=5)),
                                    engine.rank(request_of(row, 1, mode="generate", k=5, bias=bias)))

    plain, biased = asyncio.run(both())
    for result in (plain, biased):
        assert len(result.order) == 5 == len(set(result.order)) and all(0 <= c < n for c in result.order)
        assert result.generated_tokens == 5
    assert biased.order[0] == n - 1


def test_cancel_aborts_the_request_and_the_engine_keeps_serving(engine, valid):
    _, rows = valid

    async def cancel_one():
        task = asyncio.ensure_future(engine.rank(request_of(rows[0], "c", mode="generate", k=5)))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, EngineAborted)):
            await task
        return await engine.rank(request_of(rows[1], "after"))

    before = engine.stats().aborted
    assert asyncio.run(cancel_one()).scores
    assert engine.stats().aborted == before + 1 and engine.check_health()


def test_requests_beyond_batch_and_queue_are_rejected_at_once(trtllm_bundle, valid):
    from ranking_server.engines.trtllm import TrtllmConfig, TrtllmEngine

    _, rows = valid
    small = TrtllmEngine(Bundle.open(trtllm_bundle).path("engine:trtllm"), TrtllmConfig(max_batch_size=1, max_queue=0))

    async def two():
        first = asyncio.ensure_future(small.rank(request_of(rows[0], "a", mode="generate", k=5)))
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloaded):
            await small.rank(request_of(rows[1], "b"))
        return await first

    try:
        assert len(asyncio.run(two()).order) == 5
    finally:
        small.close()
