"""`AnswerCache` over the real in-flight engine on a tiny transformer: an exact repeat gets the answer the
model gave (and would give again) without running it; anything that changes the answer (the prompt, the
candidates' readout, the mode, generate's k / bias / logit weight) is run; the bound evicts the least
recently used; failures and constraints that cannot be keyed are never kept."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.decoding import LabelConstraint, answer_constraint  # noqa: E402
from palr.llm import load_causal_lm  # noqa: E402
from palr.prompt import Readout  # noqa: E402
from ranking_server.engines.answers import AnswerCache, answer_key, with_answer_cache  # noqa: E402
from ranking_server.engines.base import EngineError, EngineRequest, InvalidRequest  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from ranking_server.engines.hf import HFEngine  # noqa: E402
from tests.fixtures.engine_workload import label_ids, run_then_close  # noqa: E402
from tests.fixtures.serving import eventually  # noqa: E402

PREFIX = list(range(500, 520))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    return model, label_ids(tokenizer, 6)


@pytest.fixture
def cached(tiny):
    model, _ = tiny
    engine = AnswerCache(HFEngine(model, EngineConfig(max_batch_size=2, max_tokens_per_step=128)), size=3)
    yield engine
    engine.close()


def request(rid: str, labels: list[int], seed: int = 0, mode: str = "score", readout: bool = True,
            **fields) -> EngineRequest:
    """PREFIX + a 30-token context + one 3-token line per candidate (label, two item tokens) + a closing token."""
    rng = random.Random(seed)
    suffix = [rng.randrange(100, 40000) for _ in range(30)]
    ends = []
    for label in labels:
        suffix += [label, rng.randrange(100, 40000), rng.randrange(100, 40000)]
        ends.append(len(PREFIX) + len(suffix) - 1)
    suffix.append(rng.randrange(100, 40000))
    chosen = Readout(tuple(ends), tuple(labels)) if readout else None
    return EngineRequest(rid, PREFIX, suffix, labels, mode=mode, k=3, readout=chosen, context_len=30, **fields)


def rank(engine, *requests):
    return [asyncio.run(engine.rank(r)) for r in requests]


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_an_exact_repeat_gets_the_models_answer_without_running_it(tiny, cached, mode):
    _, labels = tiny
    first, again = rank(cached, request("u1", labels, mode=mode), request("u1-again", labels, mode=mode))
    ran = cached.engine.stats()
    assert not first.answer_reused and again.answer_reused
    assert again.request_id == "u1-again"
    assert (again.order, again.scores) == (first.order, first.scores)
    assert again.cached_tokens == again.prompt_tokens == first.prompt_tokens and again.generated_tokens == 0
    assert ran.completed == 1, "the model ran once"
    stats = cached.stats()
    assert (stats.answer_hits, stats.answer_misses, stats.completed) == (1, 1, 1)
    cold = HFEngine(tiny[0], EngineConfig(max_batch_size=2, max_tokens_per_step=128))
    try:  # what the model answers the repeat when asked afresh
        fresh = rank(cold, request("u1-fresh", labels, mode=mode))[0]
    finally:
        cold.close()
    assert again.order == fresh.order
    if mode == "score":
        assert again.scores == pytest.approx(fresh.scores, abs=1e-5)


def test_whatever_changes_the_answer_is_run_and_what_does_not_is_not(tiny, cached):
    _, labels = tiny
    base = request("a", labels)
    variants = [
        request("b", labels, seed=1),                         # another user's prompt
        request("c", labels[:5]),                             # another candidate list
        request("d", labels, readout=False),                  # labels read after the prompt, not per line
        request("e", labels, mode="generate"),                # the other mode
    ]
    rank(cached, base, *variants)
    assert cached.stats().answer_misses == 5 and cached.stats().answer_hits == 0
    # score mode returns the readouts only: generate's k and logit weight change nothing it answers
    assert answer_key(dataclasses.replace(base, request_id="a2", k=5, logit_weight=0.5)) == answer_key(base)
    for change in (dict(bias=[0.1] * len(labels)), dict(context_len=20)):  # the request differs: so does the key
        assert answer_key(dataclasses.replace(base, **change)) != answer_key(base), change
    generate = request("g", labels, mode="generate")
    for change in (dict(k=4), dict(bias=[0.2] * len(labels)), dict(logit_weight=0.3)):
        assert answer_key(dataclasses.replace(generate, **change)) != answer_key(generate), change


def test_the_bound_evicts_the_least_recently_used_answer(tiny, cached):
    _, labels = tiny
    users = [request(f"u{i}", labels, seed=i) for i in range(4)]
    rank(cached, users[0], users[1], users[2], users[0], users[3])  # u1 is the least recent when u3 comes
    assert cached.stats().answer_evictions == 1
    assert [r.answer_reused for r in rank(cached, users[0], users[2], users[1])] == [True, True, False]


def test_failures_and_custom_constraints_are_never_kept(tiny, cached):
    _, labels = tiny
    bad = dataclasses.replace(request("bad", labels), prefix_ids=[10 ** 9])  # outside the vocabulary
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            rank(cached, bad)
    assert cached.stats().answer_misses == 2 and cached.stats().answer_hits == 0
    custom = request("custom", labels, mode="generate", constraint=lambda: LabelConstraint(labels, 3))
    assert answer_key(custom) is None
    assert [r.answer_reused for r in rank(cached, custom, dataclasses.replace(custom, request_id="c2"))] == [False,
                                                                                                          False]


def test_a_constraint_factory_over_plain_values_is_part_of_the_key(tiny):
    _, labels = tiny
    lines = [[label, 7, 8] for label in labels]
    with_lines = lambda lines: request("t", labels, mode="generate", constraint=functools.partial(  # noqa: E731
        answer_constraint, "titles", labels, lines, 3))
    assert answer_key(with_lines(lines)) == answer_key(with_lines([list(line) for line in lines]))
    assert answer_key(with_lines(lines)) != answer_key(with_lines(lines[:-1] + [[labels[-1], 7, 9]]))
    assert answer_key(with_lines(lines)) != answer_key(request("t", labels, mode="generate"))
    assert answer_key(request("t", labels, mode="generate", constraint=functools.partial(
        answer_constraint, "titles", labels, object(), 3))) is None  # not a plain value


def test_size_zero_is_the_engine_itself(tiny):
    engine = HFEngine(tiny[0], EngineConfig(max_batch_size=1))
    try:
        assert with_answer_cache(engine, 0) is engine
        assert isinstance(with_answer_cache(engine, 1), AnswerCache)
    finally:
        engine.close()


def test_neither_the_caller_nor_the_cache_can_change_the_others_answer(tiny, cached):
    _, labels = tiny
    first = rank(cached, request("m", labels))[0]
    want = (list(first.order), list(first.scores))
    first.order.reverse()
    first.scores.append(0.0)
    again = rank(cached, request("m2", labels))[0]
    assert again.answer_reused and (again.order, again.scores) == want
    again.order.clear()
    assert rank(cached, request("m3", labels))[0].order == want[0]


def test_a_failed_engine_answers_nothing_from_the_cache(tiny, cached):
    _, labels = tiny
    rank(cached, request("f", labels))
    cached.engine.close()  # what a dead engine loop looks like from outside: health false
    assert not cached.check_health()
    with pytest.raises(EngineError):
        rank(cached, request("f2", labels))
    assert (cached.stats().answer_hits, cached.stats().answer_misses) == (0, 1)  # the failed call was no hit


def test_a_bound_method_factory_is_not_keyed():
    class Maker:
        def constraint(self):
            return LabelConstraint([1, 2, 3], 2)

    bound = functools.partial(Maker().constraint)
    assert answer_key(EngineRequest("b", [], [5, 6, 7], [1, 2, 3], "generate", 2, constraint=bound)) is None


def test_identical_requests_at_once_run_the_model_once(tiny, cached):
    _, labels = tiny

    async def together():
        return await asyncio.gather(*(cached.rank(request(f"page-{i}", labels)) for i in range(3)))

    results = asyncio.run(together())
    assert cached.engine.stats().completed == 1, "one forward pass for three identical requests"
    assert [r.answer_reused for r in results] == [False, True, True]
    assert all((r.order, r.scores) == (results[0].order, results[0].scores) for r in results)
    assert (cached.stats().answer_hits, cached.stats().answer_misses) == (2, 1)
    # the two that joined waited for the run's slot and passes: their queue time is the run's, not a kept
    # answer's 0 (the server's queue/ranking histograms count them; under overload their wait is real)
    assert [r.answer_joined for r in results] == [False, True, True]
    # (from its arrival, which came after the run's submission, to the run's admission: at most the run's own)
    assert all(0.0 <= r.timings.queue_ms <= min(results[0].timings.queue_ms, r.timings.total_ms) for r in results[1:])
    later = asyncio.run(cached.rank(request("page-later", labels)))  # a kept answer: waited for nothing
    assert later.answer_reused and not later.answer_joined and later.timings.queue_ms == 0.0


def held_device_engine(tiny):
    """An AnswerCache over an hf engine whose device turn the test can hold (nothing is admitted meanwhile)."""
    from ranking_server.engines.loop import DeviceTurns

    turns = DeviceTurns()
    engine = AnswerCache(HFEngine(tiny[0], EngineConfig(max_batch_size=1)), size=3)
    engine.engine.share_device(turns)
    return engine, turns


def test_a_cancelled_request_leaves_its_run_to_the_identical_requests_waiting_on_it(tiny):
    """The first request waits in the engine's queue (the test holds the device), the identical second and third
    wait on it; the first's caller gives up. Its run used to be aborted and the second queued again (behind whatever
    had come meanwhile, or refused when the queue was full); now the run goes on for the two, answered by it."""
    _, labels = tiny
    slow, turns = held_device_engine(tiny)
    queued = lambda: slow.engine.stats().queued  # noqa: E731

    async def scenario():
        with turns.turn():  # the device is the test's: the engine admits nothing
            first = asyncio.ensure_future(slow.rank(request("leaves", labels)))
            await eventually(lambda: queued() == 1)
            second = asyncio.ensure_future(slow.rank(request("stays", labels)))
            third = asyncio.ensure_future(slow.rank(request("also", labels)))
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert queued() == 1, "the identical requests wait on the first, not in the engine's queue"
            first.cancel()
            await eventually(first.done)
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert queued() == 1 and slow.engine.stats().aborted == 0, "the run stays queued for the two"
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.gather(second, third)

    (second, third), stats = run_then_close(slow, scenario)
    assert (second.request_id, third.request_id) == ("stays", "also") and second.answer_reused and third.answer_reused
    assert second.order == third.order and len(second.order) == len(labels)
    assert (stats.completed, stats.aborted, stats.answer_hits) == (1, 0, 2)


def test_a_run_nobody_waits_for_any_more_is_aborted(tiny):
    """The first request's caller and then the one waiting on it both give up: the run, kept for the second, is
    aborted when the second leaves (it would hold a batch slot for nobody)."""
    _, labels = tiny
    slow, turns = held_device_engine(tiny)

    async def scenario():
        with turns.turn():
            first = asyncio.ensure_future(slow.rank(request("leaves", labels)))
            await eventually(lambda: slow.engine.stats().queued == 1)
            second = asyncio.ensure_future(slow.rank(request("leaves-too", labels)))
            await asyncio.sleep(0.05)
            first.cancel()
            await eventually(first.done)
            assert slow.engine.stats().aborted == 0
            second.cancel()
            await eventually(lambda: second.done() and slow.engine.stats().queued == 0)
        after = await slow.rank(request("later", labels))  # nothing kept, nothing running: it runs
        return after

    after, stats = run_then_close(slow, scenario)
    assert not after.answer_reused and (stats.completed, stats.aborted) == (1, 1)
