"""Precision per CPU for `compile build --target hf-cpu`: which candidates a CPU measures (no bf16
without native bf16), the "bf16 body, fp32 head" variants (label log-probs close to fp32's, the head
and, in bf16-body-fp32-last, the last layer really fp32, served by the in-flight engine with a KV
cache per layer in that layer's dtype), and their build records round-tripping through build.json
(old records without the new fields still load). Tiny random Llama; no timings asserted."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile.targets.hf_cpu import BUILD_RECORDS, CANDIDATES, REQUIRES_ISA, plan_candidates, variant  # noqa: E402
from palr.machine import Machine  # noqa: E402
from palr.llm import score_labels  # noqa: E402
from palr.precision import body_dtype, layer_dtypes, torchao_version  # noqa: E402
from ranking_server.engines.base import EngineRequest  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from ranking_server.engines.hf import HFEngine  # noqa: E402
from palr.hf_build import load_hf_build, read_build, save_hf_build  # noqa: E402

BF16 = ("bf16", "bf16-body", "bf16-body-fp32-last")
NO_BF16 = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni")  # an AVX-512 CPU without bf16


def machine(isa) -> Machine:
    return Machine(device="cpu", device_name="test CPU", compute_capability=None, gpu_count=0,
                   cpu_name="test CPU", cpu_isa=tuple(isa))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(tiny_llama_dir)


def prompts(n=4, length=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=g).tolist() for _ in range(n)]


LABELS = [330 + i for i in range(20)]  # " A" .. " T"


def test_a_cpu_without_bf16_flags_never_lists_bf16_candidates():
    here = machine(NO_BF16)
    measured, skipped = plan_candidates(list(CANDIDATES), here.cpu_isa, torchao="0.18.0")
    assert measured[0] == "fp32" and not set(measured) & set(BF16)
    assert set(skipped) == set(BF16)
    assert all(why == "not measured: CPU lacks amx_bf16/avx512_bf16" for why in skipped.values())
    for flag in ("avx512_bf16", "amx_bf16"):  # either flag is native bf16
        measured, skipped = plan_candidates(list(CANDIDATES), (*NO_BF16, flag), torchao="0.18.0")
        assert set(BF16) <= set(measured) and not skipped
    assert all(REQUIRES_ISA[d] == ["amx_bf16|avx512_bf16"] for d in BF16)


def test_candidates_without_torchao_or_unknown():
    measured, skipped = plan_candidates(["int8-wo", "int8"], ("avx2",), torchao=None)
    assert measured == ["fp32", "int8"] and skipped["int8-wo"].startswith("not measured: torchao")
    with pytest.raises(ValueError, match="not fp64"):
        plan_candidates(["fp64"], ("avx2",))


def test_bf16_body_fp32_head_keeps_the_head_in_fp32_and_log_probs_close_to_fp32(tiny):
    model, _ = tiny
    body = variant(model, "bf16-body")
    decoder = body.get_decoder()
    assert {p.dtype for p in decoder.layers.parameters()} == {torch.bfloat16}
    assert decoder.norm.weight.dtype == torch.float32 and body.get_output_embeddings().weight.dtype == torch.float32
    assert body.dtype == torch.bfloat16  # the engines' KV cache follows the body
    assert model.get_decoder().layers[0].mlp.up_proj.weight.dtype == torch.float32  # the reference is untouched
    with torch.inference_mode():
        hidden = decoder(input_ids=torch.tensor([prompts(1)[0]])).last_hidden_state
    assert hidden.dtype == torch.float32  # cast before the final norm
    worst = 0.0
    for ids in prompts():
        ref, got = score_labels(model, ids, LABELS), score_labels(body, ids, LABELS)
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, got)))
    assert worst < 0.05, worst


def test_bf16_body_build_round_trips_loads_and_serves_like_in_memory(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "hf-cpu"
    record = save_hf_build(out, model, tokenizer, **BUILD_RECORDS["bf16-body"], num_threads=None,
                           attn_implementation="sdpa")
    assert record == read_build(out) and record["body_dtype"] == "bf16" and record["dtype"] == "fp32"
    assert model.dtype == torch.float32  # saving an fp32-checkpoint build leaves the model fp32
    loaded, _, again = load_hf_build(out)
    assert again == record
    assert loaded.get_decoder().layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert loaded.get_output_embeddings().weight.dtype == torch.float32
    in_memory = variant(model, "bf16-body")
    ids = prompts(1)[0]
    assert score_labels(loaded, ids, LABELS) == pytest.approx(score_labels(in_memory, ids, LABELS), abs=1e-6)
    engine = HFEngine(loaded, EngineConfig(max_batch_size=2, max_tokens_per_step=64))
    try:
        result = asyncio.run(engine.rank(EngineRequest("r", ids[:20], ids[20:], LABELS)))
        assert result.scores == pytest.approx(score_labels(loaded, ids, LABELS), abs=0.05)
    finally:
        engine.close()


def test_bf16_body_with_the_last_layer_in_fp32(tiny):
    model, _ = tiny
    mixed = variant(model, "bf16-body-fp32-last")
    decoder, n = mixed.get_decoder(), model.config.num_hidden_layers
    assert layer_dtypes(mixed) == [torch.bfloat16] * (n - 1) + [torch.float32]
    assert {p.dtype for p in decoder.layers[-1].parameters()} == {torch.float32}
    assert decoder.norm.weight.dtype == torch.float32 and mixed.get_output_embeddings().weight.dtype == torch.float32
    assert layer_dtypes(model) == [torch.float32] * n  # the reference is untouched
    seen = []
    hook = decoder.layers[-1].self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    with torch.inference_mode():
        hidden = decoder(input_ids=torch.tensor([prompts(1)[0]])).last_hidden_state
    hook.remove()
    assert seen == [torch.float32] and hidden.dtype == torch.float32  # the last layer computes in fp32
    worst = 0.0
    for ids in prompts():
        ref = score_labels(model, ids, LABELS)
        worst = max(worst, *(abs(a - b) for a, b in zip(ref, score_labels(mixed, ids, LABELS))))
    assert worst < 0.05, worst
    with pytest.raises(ValueError, match="fp32_last_layers must be in 0..1"):
        body_dtype(variant(model, "fp32"), torch.bfloat16, fp32_last_layers=n)


def test_bf16_body_fp32_last_build_serves_in_flight_with_a_kv_cache_per_layer_dtype(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "hf-cpu"
    record = save_hf_build(out, model, tokenizer, **BUILD_RECORDS["bf16-body-fp32-last"], num_threads=None,
                           attn_implementation="sdpa")
    assert record == read_build(out) and record["fp32_last_layers"] == 1 and record["body_dtype"] == "bf16"
    loaded, _, _ = load_hf_build(out)
    assert layer_dtypes(loaded) == layer_dtypes(variant(model, "bf16-body-fp32-last"))
    engine = HFEngine(loaded, EngineConfig(max_batch_size=4, max_tokens_per_step=64))
    try:
        assert [k.dtype for k in engine.kv.keys] == layer_dtypes(loaded)
        requests = [EngineRequest(f"r{i}", ids[:20], ids[20:], LABELS, context_len=20)
                    for i, ids in enumerate(prompts(3))]

        async def together():
            return await asyncio.gather(*(engine.rank(r) for r in requests))

        first = asyncio.run(together())  # batched in flight, contexts stored
        for request, result in zip(requests, first):
            alone = score_labels(loaded, request.prefix_ids + request.suffix_ids, LABELS)
            assert result.scores == pytest.approx(alone, abs=0.05)
        hit = asyncio.run(engine.rank(dataclasses.replace(requests[1], request_id="again")))  # its context reused
        assert engine.contexts.hits >= 1 and hit.scores == pytest.approx(first[1].scores, abs=1e-2)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="applies to a model with a body dtype"):
        save_hf_build(tmp_path / "bad", model, tokenizer, dtype="fp32", quantization=None, num_threads=None,
                      attn_implementation="sdpa", fp32_last_layers=1)


def test_a_build_record_without_body_dtype_still_loads(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "old"
    save_hf_build(out, model, tokenizer, dtype="fp32", quantization=None, num_threads=None, attn_implementation="sdpa")
    old = {k: v for k, v in read_build(out).items() if k not in ("body_dtype", "fp32_last_layers")}  # older builds
    (out / "build.json").write_text(json.dumps(old))
    loaded, _, record = load_hf_build(out)
    assert "body_dtype" not in record and {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.skipif(torchao_version() is None, reason="torchao not installed")
def test_int8_weight_only_build_loads_and_ranks_close_to_fp32(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "wo"
    save_hf_build(out, model, tokenizer, **BUILD_RECORDS["int8-wo"], num_threads=None, attn_implementation="sdpa")
    loaded, _, record = load_hf_build(out)
    assert record["quantization"] == "int8-weight-only"
    assert type(loaded.get_decoder().layers[0].mlp.up_proj.weight).__name__ != "Parameter"
    ids = prompts(1)[0]
    assert score_labels(loaded, ids, LABELS) == pytest.approx(score_labels(model, ids, LABELS), abs=0.05)
