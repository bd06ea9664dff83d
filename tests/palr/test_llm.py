"""The one-at-a-time reference (palr/llm.py, palr/decoding.py) against plain recomputation on a tiny
real Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import math
import random

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.decoding import LabelConstraint, TitleConstraint  # noqa: E402
from palr.llm import (  # noqa: E402
    compute_prefix, generate_constrained, generate_labels, load_causal_lm, score_candidates, score_labels)
from palr.prompt import Readout  # noqa: E402

LETTERS = [f" {chr(ord('A') + i)}" for i in range(20)]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def labels(tiny):
    _, tokenizer = tiny
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    assert all(len(i) == 1 for i in ids), "letter labels must be single tokens"
    return [i[0] for i in ids]


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(length)]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits from one plain forward pass over the whole sequence, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].double()


def test_load_causal_lm_is_eval_fp32_sdpa_without_grad(tiny):
    model, tokenizer = tiny
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.encode(" A", add_special_tokens=False) == [330]


def test_score_labels_equals_full_forward_log_softmax(tiny, labels):
    model, _ = tiny
    rng = random.Random(1)
    for length in (1, 7, 60):
        ids = random_prompt(rng, length)
        logits = full_logits(model, ids)
        chosen = [float(logits[t]) for t in labels]
        norm = math.log(sum(math.exp(x) for x in chosen))
        expected = [x - norm for x in chosen]
        got = score_labels(model, ids, labels)
        assert got == pytest.approx(expected, abs=1e-4)
        assert sum(math.exp(x) for x in got) == pytest.approx(1.0, abs=1e-5)


def test_a_candidate_readout_runs_only_up_to_its_last_position_and_reads_what_the_whole_prompt_gives(tiny, labels):
    """Score mode stops at `Readout.end` (the closing chat turn after the candidates is not run): the scores
    equal the log-softmax of the readout logits from a plain forward pass over the whole prompt."""
    model, _ = tiny
    rng = random.Random(5)
    ids = random_prompt(rng, 80)
    readout = Readout(tuple(range(20, 60, 5)), tuple(labels[:8]))  # 8 candidates; 20 tokens after the last
    assert readout.end == 56
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, D]
    head = model.get_output_embeddings().weight
    logits = torch.stack([hidden[p] @ head[t] for p, t in zip(readout.positions, readout.tokens)]).double()
    expected = torch.log_softmax(logits, -1).tolist()
    assert score_candidates(model, ids, readout) == pytest.approx(expected, abs=1e-4)
    assert score_candidates(model, ids[:readout.end], readout) == score_candidates(model, ids, readout)


def test_prefix_reuse_gives_the_same_scores(tiny, labels):
    model, _ = tiny
    rng = random.Random(2)
    prefix_ids = random_prompt(rng, 30)
    prefix = compute_prefix(model, prefix_ids)
    for length in (1, 25):
        ids = prefix_ids + random_prompt(rng, length)
        assert score_labels(model, ids, labels, prefix=prefix) == pytest.approx(
            score_labels(model, ids, labels), abs=1e-5)
    # the shared prefix KV is not modified by the requests that used it
    again = compute_prefix(model, prefix_ids)
    for (k, v), (k2, v2) in zip(prefix.layers, again.layers):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="prefix"):
        score_labels(model, random_prompt(rng, 40), labels, prefix=prefix)


def test_score_labels_rejects_bad_labels(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        score_labels(model, [5, 6, 7], [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_labels(model, [5, 6, 7], [330, 10**7])


def brute_force_generate(model, ids, labels, k, bias=None) -> list[int]:
    """Greedy under 'labels not yet emitted', each step a full forward pass without any cache."""
    emitted: list[int] = []
    seq = list(ids)
    for _ in range(k):
        logits = full_logits(model, seq)
        options = [i for i in range(len(labels)) if i not in emitted]
        best = max(options, key=lambda i: (float(logits[labels[i]]) + (bias[i] if bias else 0.0), -i))
        emitted.append(best)
        seq.append(labels[best])
    return emitted


@pytest.mark.parametrize("seed", range(6))
def test_constrained_greedy_equals_brute_force_without_cache(tiny, labels, seed):
    model, _ = tiny
    rng = random.Random(seed)
    n = rng.choice([3, 10, 20])
    k = rng.randint(1, n)
    ids = random_prompt(rng, rng.randint(1, 80))
    bias = [rng.uniform(-0.5, 0.5) for _ in range(n)] if seed % 2 else None
    got = generate_labels(model, ids, labels[:n], k, bias=bias)
    assert got == brute_force_generate(model, ids, labels[:n], k, bias)
    assert len(got) == k and len(set(got)) == k and all(0 <= c < n for c in got)


def decoder_passes(model):
    """Counts the decoder's forward passes (a hook on the decoder module)."""
    calls = []
    handle = model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("title_lines", [False, True], ids=["labels", "titles"])
@pytest.mark.parametrize("logit_weight, spread", [(0.1, 3.0), (1.0, 0.3), (1.0, 0.0)],
                         ids=["bias-decides", "logits-count", "no-bias"])
def test_drafted_decoding_writes_what_one_token_a_pass_writes(tiny, labels, title_lines, logit_weight, spread):
    """Generate mode checks a draft of the bias's own picks in one pass: the answers equal plain decoding's
    (one token a pass) whatever decides the picks, and take fewer passes when the bias decides them."""
    model, _ = tiny
    rng = random.Random(11)
    passes = {}
    for seed in range(3):
        ids = random_prompt(rng, 40)
        bias = [rng.uniform(-spread, spread) for _ in range(10)] if spread else None
        lines = [random_prompt(rng, rng.randint(1, 4)) for _ in range(10)]

        def constraint():
            return TitleConstraint(labels[:10], lines, 6) if title_lines else LabelConstraint(labels[:10], 6)
        answers = {}
        for draft in (1, 16):
            calls, handle = decoder_passes(model)
            try:
                answers[draft] = generate_constrained(model, ids, constraint(), bias, logit_weight=logit_weight,
                                                      draft_tokens=draft)
            finally:
                handle.remove()
            passes[draft] = passes.get(draft, 0) + len(calls)
        assert answers[16] == answers[1]
    assert passes[16] <= passes[1]
    if logit_weight < 1:
        assert passes[16] < passes[1] / 2, passes


def test_generate_with_prefix_reuse_matches_without(tiny, labels):
    model, _ = tiny
    rng = random.Random(7)
    prefix_ids = random_prompt(rng, 20)
    prefix = compute_prefix(model, prefix_ids)
    ids = prefix_ids + random_prompt(rng, 15)
    assert generate_labels(model, ids, labels, 20, prefix=prefix) == generate_labels(model, ids, labels, 20)


def test_bias_decides_the_order(tiny, labels):
    model, _ = tiny
    bias = [0.0] * 10
    bias[7], bias[2], bias[4] = 300.0, 200.0, 100.0
    assert generate_labels(model, [11, 12, 13], labels[:10], 3, bias=bias) == [7, 2, 4]


def test_generate_all_candidates_is_a_permutation(tiny, labels):
    model, _ = tiny
    constraint = LabelConstraint(labels, 20)
    order = generate_constrained(model, [40, 41, 42, 43], constraint)
    assert sorted(order) == list(range(20))
    assert constraint.done and constraint.allowed_tokens() == []


def test_label_constraint_rules():
    c = LabelConstraint([330, 331, 332], 2)
    assert c.allowed_tokens() == [330, 331, 332] and c.max_new_tokens == 2
    c.advance(331)
    assert c.allowed_tokens() == [330, 332]
    assert c.token_bias([1.0, 2.0, 3.0]) == [1.0, 3.0]
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(331)
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(999)
    c.advance(330)
    assert c.done and c.emitted() == [1, 0] and c.allowed_tokens() == []
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(332)
    with pytest.raises(ValueError, match="k=4"):
        LabelConstraint([1, 2, 3], 4)
    with pytest.raises(ValueError, match="k=0"):
        LabelConstraint([1, 2, 3], 0)
    with pytest.raises(ValueError, match="duplicates"):
        LabelConstraint([1, 2, 1], 1)
    with pytest.raises(ValueError, match="empty"):
        LabelConstraint([], 1)
    with pytest.raises(ValueError, match="bias has 2"):
        LabelConstraint([1, 2, 3], 1).token_bias([0.0, 1.0])
