"""hf-cuda's quality bar, run here on the CPU (the build runs the same code on its GPU): a half-precision
model is kept only if it ranks the bundle's validation probes like the fp32 one, else the build keeps fp32.
Before, hf-cuda (and trtllm) kept bf16 unmeasured, though plain bf16 reordered this ranker's candidates."""

from __future__ import annotations

import dataclasses

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile.targets import BuildContext  # noqa: E402
from compile.targets.hf_cuda import keep_if_it_ranks_like  # noqa: E402
from palr.bundle import Bundle  # noqa: E402
from palr.machine import Machine  # noqa: E402
from tests.fixtures.builds import build_config  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_llm_bundle):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Bundle.open(tiny_llm_bundle).path("llm_merged")
    load = lambda dtype: AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()  # noqa: E731
    return load(torch.bfloat16), load(torch.float32), AutoTokenizer.from_pretrained(source)


@pytest.mark.parametrize("bar, kept", [(dict(min_agreement=0.0, max_ndcg_drop=1.0), "bf16"),
                                       (dict(min_agreement=1.01), "fp32")])
def test_half_precision_is_kept_only_when_it_ranks_like_fp32(tiny_llm_bundle, tmp_path, models, bar, kept):
    bf16, fp32, tokenizer = models
    bundle = Bundle.open(tiny_llm_bundle)
    config = dataclasses.replace(build_config(tiny_llm_bundle, "hf-cuda"), probe_users=8, generate_probes=2, **bar)
    ctx = BuildContext(config, Machine.detect("cpu"), bundle, bundle.path("llm_merged"), tmp_path)
    dtype, quality = keep_if_it_ranks_like("bf16", bf16, fp32, ctx, tokenizer)
    assert dtype == kept
    assert set(quality) >= {"fp32", "bf16", "verdict"}  # (fp32's own agreement is 1 by construction: no check)
    assert quality["verdict"].startswith("kept: bf16" if kept == "bf16" else "rejected: bf16")


def test_half_precision_that_ranks_otherwise_is_rejected_at_the_default_bar(tiny_llm_bundle, tmp_path, models):
    """The bar as shipped, on a half-precision copy whose final norm is negated (every logit's sign flipped, so
    the candidates' order reversed): fp32 is kept, and the verdict says why."""
    import copy

    bf16, fp32, tokenizer = models
    spoilt = copy.deepcopy(bf16)
    with torch.no_grad():
        spoilt.model.norm.weight.neg_()
    bundle = Bundle.open(tiny_llm_bundle)
    config = dataclasses.replace(build_config(tiny_llm_bundle, "hf-cuda"), probe_users=8, generate_probes=2)
    ctx = BuildContext(config, Machine.detect("cpu"), bundle, bundle.path("llm_merged"), tmp_path)
    dtype, quality = keep_if_it_ranks_like("bf16", spoilt, fp32, ctx, tokenizer)
    assert dtype == "fp32" and quality["verdict"].startswith("rejected: bf16"), quality["verdict"]
