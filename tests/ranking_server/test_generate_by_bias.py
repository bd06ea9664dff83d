"""Generate mode at logit weight 0 (what the shipped rankers' validation fit chose): the model's next-token
logits count zero, so the answer is the bias's order (retrieval + trend + the candidate readouts of the
prompt's pass) and no decode pass runs. It must equal what decoding with the logits weighted 0 writes,
in the reference and in every engine."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from loadtest.baselines import STRATEGIES, strategy_engine  # noqa: E402
from palr.decoding import LabelConstraint, TitleConstraint  # noqa: E402
from palr.llm import emit_by_bias, generate_constrained, load_causal_lm, pick_token  # noqa: E402
from palr.prompt import Readout  # noqa: E402
from ranking_server.engines.base import EngineRequest  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from tests.fixtures.engine_workload import label_ids  # noqa: E402

N = 8


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    return model, label_ids(tokenizer, N)


def decode_weighted_zero(model, input_ids, constraint, bias) -> list[int]:
    """The long way: feed every emitted token through the model and pick from its logits weighted 0."""
    ids = list(input_ids)
    while not constraint.done:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [V]
        token = pick_token(logits, constraint, bias, logit_weight=0.0)
        constraint.advance(token)
        ids.append(token)
    return constraint.emitted()


def constraints(labels, lines, k):
    return {"labels": lambda: LabelConstraint(labels, k), "titles": lambda: TitleConstraint(labels, lines, k)}


@pytest.mark.parametrize("answer", ["labels", "titles"])
def test_the_bias_order_is_what_decoding_with_logits_weighted_zero_writes(tiny, answer):
    model, labels = tiny
    rng = random.Random(1)
    prompt = [rng.randrange(100, 40000) for _ in range(30)]
    lines = [[rng.randrange(100, 40000) for _ in range(rng.randint(1, 3))] for _ in labels]
    bias = [rng.uniform(-1, 1) for _ in labels]
    make = constraints(labels, lines, k=5)[answer]
    slow = decode_weighted_zero(model, prompt, make(), bias)
    fast = make()
    written = emit_by_bias(fast, bias)
    assert fast.emitted() == slow == sorted(range(N), key=lambda c: -bias[c])[:5]
    assert written == (5 if answer == "labels" else 5 + sum(len(lines[c]) for c in slow))
    assert generate_constrained(model, prompt, make(), bias, logit_weight=0.0) == slow


def request(rid: str, labels, rng: random.Random) -> EngineRequest:
    """A generate request with a candidate readout (each candidate's last token) and a bias, weight 0."""
    prefix = [rng.randrange(100, 40000) for _ in range(20)]
    candidates, ends = [], []
    for label in labels:
        candidates += [label, rng.randrange(100, 40000)]
        ends.append(len(prefix) + len(candidates) - 1)
    return EngineRequest(rid, prefix, candidates + [rng.randrange(100, 40000)], labels, mode="generate", k=4,
                         bias=[rng.uniform(-0.5, 0.5) for _ in labels],
                         readout=Readout(tuple(ends), tuple(labels)), logit_weight=0.0)


def all_at_once(engine, requests):
    """Every request sent at once, then the engine closed: (results, the steps it ran, its stats)."""
    async def send():
        return await asyncio.gather(*(engine.rank(r) for r in requests))

    try:
        return asyncio.run(send()), list(engine.step_log), engine.stats()
    finally:
        engine.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engines_answer_without_a_decode_pass(tiny, strategy):
    model, labels = tiny
    rng = random.Random(2)
    requests = [request(f"g{i}", labels, rng) for i in range(6)]
    results, steps, stats = all_at_once(strategy_engine(strategy, model, EngineConfig(max_batch_size=4,
                                                                                       max_tokens_per_step=64)),
                                        requests)
    for r, result in zip(requests, results):
        want = generate_constrained(model, r.input_ids, LabelConstraint(labels, r.k), r.bias, readout=r.readout,
                                    logit_weight=0.0)
        assert result.order == want and result.generated_tokens == r.k and len(set(want)) == r.k
    # the answer is complete at the last readout: the prompt's closing token after it never runs
    assert all(not r.decodes and len(r.run_ids) == len(r.input_ids) - 1 for r in requests)
    if strategy != "sequential":  # the reference counts its shared prefix as cached even when it computed it
        assert stats.prompt_tokens + stats.cached_tokens == sum(len(r.run_ids) for r in requests)
    # one-at-a-time runs the reference (no step ever decodes there); the batching engines must not decode either
    assert steps and all(step.decoding == 0 for step in steps), "a decode pass ran though the logits count zero"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_label_readout_at_weight_zero_runs_no_prompt(tiny, strategy):
    """Without a candidate readout the bias is known before any pass (the labels' logits count zero), so no
    engine runs the prompt: no step, no prompt token, and five at once pass a queue bound of one."""
    model, labels = tiny
    rng = random.Random(3)
    requests = [dataclasses.replace(request(f"l{i}", labels, rng), readout=None) for i in range(5)]
    results, steps, stats = all_at_once(strategy_engine(strategy, model, EngineConfig(
        max_batch_size=4, max_tokens_per_step=64, max_queue=1)), requests)
    for r, result in zip(requests, results):
        assert not r.reads_prompt
        assert result.order == sorted(range(N), key=lambda c: -r.bias[c])[:r.k]
        assert result.order == generate_constrained(model, r.input_ids, LabelConstraint(labels, r.k), r.bias,
                                                    logit_weight=0.0)
    assert steps == [] and stats.prompt_tokens == 0 and stats.completed == len(requests)
    # written from the bias, not decoded: counted apart, out of the model's tokens per second
    assert stats.written_tokens == sum(r.k for r in requests) and stats.generated_tokens == 0
    assert stats.tokens_per_s == 0.0
    # what still needs the prompt: score mode, a decoding weight, a candidate readout
    r = requests[0]
    assert dataclasses.replace(r, mode="score").reads_prompt
    assert dataclasses.replace(r, logit_weight=0.1).reads_prompt
    assert request("x", labels, rng).reads_prompt


class Broken(LabelConstraint):
    """A constraint whose second pick fails (a bug in a custom answer format)."""

    def advance(self, token):
        if self.emitted():
            raise RuntimeError("this format cannot go on")
        super().advance(token)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_constraint_failing_without_a_pass_fails_its_request_as_an_engine_error(tiny, strategy):
    """Answered at rank() it is still the request's own EngineError (the server degrades it), counted as failed."""
    from ranking_server.engines.base import EngineError

    model, labels = tiny
    r = dataclasses.replace(request("broken", labels, random.Random(4)), readout=None,
                            constraint=lambda: Broken(labels, 4))
    engine = strategy_engine(strategy, model, EngineConfig(max_batch_size=2, max_tokens_per_step=64))
    try:
        with pytest.raises(EngineError, match="constrained decoding failed"):
            asyncio.run(engine.rank(r))
        stats = engine.stats()
    finally:
        engine.close()
    assert stats.failed == 1 and stats.completed == 0
