"""The build's quality measurement (`compile.targets.measure`): generate mode's first pick, read from the
prompt's one forward pass, is exactly what generate mode emits first (label and candidate readouts, any
logit weight), so a build can measure first-pick agreement on every probe; the report says how many
probes each agreement is over. Tiny random Llama, real forward passes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

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


def probes(n: int, candidate_readout: bool, length: int = 48, seed: int = 0) -> list[Probe]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(100, 40000, (length,), generator=g).tolist()
        readout = Readout(tuple(range(8, 8 + 4 * len(LABELS), 4)), (SCORE_ROW,) * len(LABELS)) \
            if candidate_readout else None
        out.append(Probe(ids, LABELS, target_position=i % len(LABELS), readout=readout))
    return out


@pytest.mark.parametrize("candidate_readout", [False, True])
@pytest.mark.parametrize("logit_weight", [1.0, 0.1, 0.0])
def test_first_pick_from_one_forward_pass_is_what_generate_emits_first(tiny, candidate_readout, logit_weight):
    runner = TorchRunner("fp32", tiny)
    for probe in probes(6, candidate_readout):
        generated = runner.generate(probe, 3, logit_weight)
        assert runner.read(probe).first_pick(probe, 3, logit_weight) == generated[0]


def test_first_pick_agreement_is_over_every_probe_and_whole_lists_over_the_generated_ones(tiny):
    fp32, bf16 = TorchRunner("fp32", tiny), TorchRunner("bf16", variant(tiny, "bf16"))
    quality = measure_quality([fp32, bf16], fp32, probes(10, True), k=3, generate_probes=2, logit_weight=0.1)
    assert quality["fp32"]["generate_first_agreement"] == quality["fp32"]["generate_exact_agreement"] == 1.0
    for name in quality:
        assert quality[name]["generate_first_probes"] == 10 and quality[name]["generate_exact_probes"] == 2
