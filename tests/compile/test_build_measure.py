"""The build's quality measurement (`compile.targets.measure`): generate mode's first pick, read from the
prompt's one forward pass, is exactly what generate mode emits first (label and candidate readouts, any
logit weight), so a build can measure first-pick agreement on every probe; the report says how many
probes each agreement is over. Tiny random Llama, real forward passes."""

from __future__ import annotations

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile.targets.measure import Probe, TorchRunner, measure_quality  # noqa: E402
from compile.targets.hf_cpu import variant  # noqa: E402
from palr.prompt import Readout  # noqa: E402

LABELS = [330 + i for i in range(8)]  # " A" .. " H"
SCORE_ROW = 1000  # the candidate readout's token (any row of the tiny head)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def probes(n: int, candidate_readout: bool, length: int = 48, seed: int = 0, fusion_weight: float | None = None
           ) -> list[Probe]:
    """Random prompts; with `fusion_weight`, each carries a retrieval term and a head bias to be fused at it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(100, 40000, (length,), generator=g).tolist()
        readout = Readout(tuple(range(8, 8 + 4 * len(LABELS), 4)), (SCORE_ROW,) * len(LABELS)) \
            if candidate_readout else None
        fusion = {} if fusion_weight is None else {
            "prior": torch.randn(len(LABELS), generator=g).tolist(), "fusion_weight": fusion_weight,
            "head_bias": (0.1 * torch.randn(len(LABELS), generator=g)).tolist()}
        out.append(Probe(ids, LABELS, target_position=i % len(LABELS), readout=readout, **fusion))
    return out


@pytest.mark.parametrize("fusion_weight", [None, 0.5], ids=["no-fusion", "fused"])
@pytest.mark.parametrize("candidate_readout", [False, True])
@pytest.mark.parametrize("logit_weight", [1.0, 0.1, 0.0])
def test_first_pick_from_one_forward_pass_is_what_generate_emits_first(tiny, candidate_readout, logit_weight,
                                                                       fusion_weight):
    runner = TorchRunner("fp32", tiny)
    for probe in probes(6, candidate_readout, fusion_weight=fusion_weight):
        generated = runner.generate(probe, 3, logit_weight)
        assert runner.read(probe).first_pick(probe, 3, logit_weight) == generated[0]


def test_the_bar_judges_the_ranking_the_server_answers_with_not_the_llms_own():
    """At the fitted fusion weight (1000 on the shipped rankers) the served order is the retrieval term's with the
    LLM breaking near-ties: a precision that moves the LLM's own top-1 on every probe but no served answer passed
    nothing before (its raw agreement was judged) and passes now; one that moves served answers still fails."""
    from compile.targets.measure import Answers, quality_ok, quality_summary

    def probe(prior, weight=1000.0):
        return Probe([1, 2, 3], [10, 11, 12], target_position=0, prior=prior, fusion_weight=weight)

    fused = [probe([0.0, -3.0, -6.0]), probe([-6.0, 0.0, -3.0])]
    ref = Answers([[-0.1, -2.0, -3.0], [-2.0, -0.1, -3.0]], [0, 1], [], [0, 1])
    moved = Answers([[-3.0, -0.1, -2.0], [-0.1, -3.0, -2.0]], [0, 1], [], [1, 0])  # the LLM's own top-1 moved
    summary, ref_summary = quality_summary(moved, ref, fused, k=2), quality_summary(ref, ref, fused, k=2)
    assert summary["score_top1_agreement"] == 0.0 and summary["llm_first_agreement"] == 0.0
    assert summary["served_top1_agreement"] == 1.0 and summary["served_ndcg@10"] == ref_summary["served_ndcg@10"]
    assert all(quality_ok(summary, ref_summary, 0.9, 0.01, mode) for mode in ("score", "generate"))
    llm_decides = [probe(p, weight=0.0) for p in ([0.0, -3.0, -6.0], [-6.0, 0.0, -3.0])]  # weight 0: the LLM alone
    summary = quality_summary(moved, ref, llm_decides, k=2)
    assert summary["served_top1_agreement"] == 0.0 and not quality_ok(summary, ref_summary, 0.9, 0.01, "score")
    # and the summary says on how many probes the LLM could move the served first pick at all: none at 1000 (the
    # term's top-two gap, 1000 x 3 nats, dwarfs the LLM's spread of 2.9), both when the LLM decides alone
    assert ref_summary["served_decisive_probes"] == 0 and summary["served_decisive_probes"] == 2


def test_first_pick_agreement_is_over_every_probe_and_whole_lists_over_the_generated_ones(tiny):
    fp32, bf16 = TorchRunner("fp32", tiny), TorchRunner("bf16", variant(tiny, "bf16"))
    quality = measure_quality([fp32, bf16], fp32, probes(10, True), k=3, generate_probes=2, logit_weight=0.1)
    for name in quality:  # (the reference's own agreement is 1 by construction: not asserted)
        assert quality[name]["generate_first_probes"] == 10 and quality[name]["generate_exact_probes"] == 2


def test_a_candidate_whose_readouts_overflow_is_rejected_not_the_build(tiny):
    """A precision that reads NaN (here: its head's label rows spoilt) is rejected with the reason; the reference
    reading NaN still fails the build, since nothing can be judged against it."""
    import copy

    from compile.targets.hf_cpu import choose
    from compile.targets.measure import quality_ok
    from compile.steps import StepFailed
    from palr.errors import EngineError

    spoilt = copy.deepcopy(tiny)
    with torch.no_grad():
        spoilt.lm_head.weight = torch.nn.Parameter(spoilt.lm_head.weight.detach().clone())
        spoilt.lm_head.weight[LABELS] = float("nan")
    fp32, broken = TorchRunner("fp32", tiny), TorchRunner("bf16", spoilt)
    quality = measure_quality([fp32, broken], fp32, probes(4, False), k=3, generate_probes=1, logit_weight=1.0)
    assert "not finite" in quality["bf16"]["error"]
    assert not quality_ok(quality["bf16"], quality["fp32"], 0.9, 0.01, "score")
    config = type("C", (), {"generate_tokens": 1, "min_agreement": 0.9, "max_ndcg_drop": 0.01, "min_gain": 0.05})
    latency = {"fp32": {"prefill_ms": 10.0, "decode_ms": 1.0}, "bf16": {"prefill_ms": 2.0, "decode_ms": 0.5}}
    best, verdicts = choose(latency, quality, config)
    assert best == "fp32" and verdicts["bf16"].startswith("rejected: ") and "not finite" in verdicts["bf16"]
    with pytest.raises(StepFailed, match="cannot rank the probes") as failed:  # a clear refusal, not a traceback
        measure_quality([broken], broken, probes(2, False), k=3, generate_probes=1)
    assert isinstance(failed.value.__cause__, EngineError)
