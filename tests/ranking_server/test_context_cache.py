"""Per-user context KV reuse in the in-flight engine (issue 12): a user's repeat call finds its context
(profile + history) cached and runs only its candidates; the answers equal a cold computation's (score and
generate, candidate readout included); a different context never reuses another's KV; the cache stays
within its byte bound, evicting the least recently used; it works inside in-flight batching, where a user's
calls admitted together compute the context once."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from palr.decoding import LabelConstraint  # noqa: E402
from palr.errors import EngineError  # noqa: E402
from palr.llm import generate_constrained, load_causal_lm, score_candidates  # noqa: E402
from palr.prompt import Readout  # noqa: E402
from ranking_server.engines.base import EngineAborted, EngineRequest  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from ranking_server.engines.hf import HFEngine, kv_bytes  # noqa: E402
from ranking_server.engines.loop import DeviceTurns  # noqa: E402
from tests.fixtures.engine_workload import label_ids, run_then_close  # noqa: E402
from tests.fixtures.serving import eventually  # noqa: E402

PREFIX = list(range(500, 530))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    return model, label_ids(tokenizer, 8)


def user_request(rid: str, context: list[int], labels: list[int], rng: random.Random, mode: str = "score",
                 readout: bool = False) -> EngineRequest:
    """A prompt PREFIX + context + 8 candidate lines of 3 tokens (label, two item tokens)."""
    candidates = []
    ends = []
    for label in labels:
        candidates += [label, rng.randrange(100, 40000), rng.randrange(100, 40000)]
        ends.append(len(PREFIX) + len(context) + len(candidates) - 1)
    suffix = context + candidates + [rng.randrange(100, 40000)]
    chosen = Readout(tuple(ends), tuple(labels)) if readout else None  # a positional readout (any token rows)
    return EngineRequest(rid, PREFIX, suffix, labels, mode=mode, k=3, readout=chosen, context_len=len(context))


def reference(model, request: EngineRequest):
    if request.mode == "score":
        return score_candidates(model, request.input_ids, request.score_readout())
    return generate_constrained(model, request.input_ids, LabelConstraint(list(request.label_token_ids), request.k),
                                request.bias, readout=request.readout)


def run(engine, requests):
    async def all_at_once():
        return await asyncio.gather(*(engine.rank(r) for r in requests))
    return asyncio.run(all_at_once())


def check(model, request, result):
    want = reference(model, request)
    if request.mode == "score":
        assert result.scores == pytest.approx(want, abs=1e-5)
        assert result.order == sorted(range(len(want)), key=lambda c: -want[c])
    else:
        assert result.order == want


@pytest.mark.parametrize("readout", [False, True], ids=["label-readout", "candidate-readout"])
def test_a_repeat_call_computes_only_its_candidates_and_answers_as_a_cold_one(tiny, readout):
    model, labels = tiny
    rng = random.Random(0)
    alice = [rng.randrange(100, 40000) for _ in range(60)]
    engine = HFEngine(model, EngineConfig(max_batch_size=4, max_tokens_per_step=64))
    try:
        first = [user_request("a1", alice, labels, rng, "score", readout)]
        repeat = [user_request("a2", alice, labels, rng, "score", readout),
                  user_request("a3", alice, labels, rng, "generate", readout)]
        cold = run(engine, first)
        warm = run(engine, repeat)
        stats = engine.stats()
    finally:
        engine.close()
    for request, result in zip(first + repeat, cold + warm):
        check(model, request, result)
    assert cold[0].cached_tokens == 0, "nothing cached before the first call"
    assert [r.cached_tokens for r in warm] == [len(PREFIX) + len(alice)] * 2, "the repeat calls ran only candidates"
    assert stats.context_hits == 2 and stats.context_misses == 1
    assert stats.context_bytes > 0 and stats.cached_tokens == 2 * (len(PREFIX) + len(alice))
    # score mode runs up to its last readout position: the prompt's last token (after the candidates) is not
    # run under a candidate readout; generate mode runs the whole prompt
    requests = first + repeat
    assert stats.prompt_tokens == sum(len(r.run_ids) for r in requests) - stats.cached_tokens
    tails = [len(r.input_ids) - len(r.run_ids) for r in requests]
    assert tails == ([1, 1, 0] if readout else [0, 0, 0])


def test_contexts_are_never_shared_between_users_and_stay_within_the_byte_bound(tiny):
    model, labels = tiny
    rng = random.Random(1)
    users = [[rng.randrange(100, 40000) for _ in range(50)] for _ in range(3)]
    probe = HFEngine(model, EngineConfig(max_batch_size=1, max_tokens_per_step=256))
    try:
        run(probe, [user_request("p", users[0], labels, rng)])
        one_context = probe.stats().context_bytes
    finally:
        probe.close()
    bound_mb = 1.5 * one_context / 2 ** 20  # room for one context, not two
    engine = HFEngine(model, EngineConfig(max_batch_size=2, max_tokens_per_step=256, context_cache_mb=bound_mb))
    try:
        requests = [user_request(f"u{i}", context, labels, rng) for i, context in enumerate(users)]
        results = [run(engine, [r])[0] for r in requests]  # one after another: each a different user
        after_three = engine.stats()
        again = user_request("u2-again", users[2], labels, rng)
        hit = run(engine, [again])[0]
        stats = engine.stats()
    finally:
        engine.close()
    for request, result in zip(requests + [again], results + [hit]):
        check(model, request, result)
    assert [r.cached_tokens for r in results] == [0] + [len(PREFIX)] * 2, "only the shared prefix is reused"
    assert after_three.context_misses == 3 and after_three.context_hits == 0
    assert after_three.context_evictions == 2 and after_three.context_bytes == one_context <= bound_mb * 2 ** 20
    assert hit.cached_tokens == len(PREFIX) + len(users[2]) and stats.context_hits == 1, "the newest one stayed"


def test_context_reuse_inside_in_flight_batching(tiny):
    """Two users' calls interleaved in one running batch, prompts chunked: every answer is the reference's,
    and the repeat calls of each user hit."""
    model, labels = tiny
    rng = random.Random(2)
    contexts = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(2)]
    engine = HFEngine(model, EngineConfig(max_batch_size=3, max_tokens_per_step=48))
    try:
        warm = run(engine, [user_request(f"w{u}", c, labels, rng) for u, c in enumerate(contexts)])
        requests = [user_request(f"r{i}", contexts[i % 2], labels, rng, "generate" if i % 3 == 0 else "score",
                                 readout=i % 2 == 1) for i in range(6)]
        results = run(engine, requests)
        stats = engine.stats()
    finally:
        engine.close()
    for request, result in zip(requests, results):
        check(model, request, result)
    assert all(r.cached_tokens == len(PREFIX) + 40 for r in results)
    assert stats.context_hits == 6 and stats.context_misses == 2 and len(warm) == 2


def test_kv_bytes_counts_keys_and_values():
    layers = [(torch.zeros(3, 10, 4), torch.zeros(3, 10, 4))] * 2
    assert kv_bytes(layers) == 2 * 2 * 3 * 10 * 4 * 4


def test_the_one_at_a_time_baseline_reuses_contexts_as_the_engine_does(tiny):
    """The benchmark's one-at-a-time baseline keeps user contexts too (so in-flight vs one-at-a-time measures
    batching, not caching): a repeat call starts from the cached context and answers as a cold call."""
    from loadtest.baselines import SequentialEngine

    model, labels = tiny
    rng = random.Random(4)
    alice, bob = ([rng.randrange(100, 40000) for _ in range(40)] for _ in range(2))
    requests = [user_request("a1", alice, labels, rng), user_request("b1", bob, labels, rng),
                user_request("a2", alice, labels, rng), user_request("a3", alice, labels, rng, "generate", True)]
    engine = SequentialEngine(model, EngineConfig())
    try:
        results = [run(engine, [r])[0] for r in requests]
        stats = engine.stats()
    finally:
        engine.close()
    for request, result in zip(requests, results):
        check(model, request, result)
    hit = len(PREFIX) + len(alice)  # a miss computed its context itself: only the shared prefix was cached
    assert [r.cached_tokens for r in results] == [len(PREFIX), len(PREFIX), hit, hit]
    assert stats.context_hits == 2 and stats.context_misses == 2 and stats.context_bytes > 0
    assert stats.prompt_tokens == len(PREFIX) + sum(len(r.run_ids) for r in requests) - sum(r.cached_tokens
                                                                                            for r in results)


def run_scenario(engine, scenario, model, requests):
    """Run `scenario()` (it returns the answers to `requests`), close the engine, check every answer against the
    reference; (answers, the engine's stats)."""
    results, stats = run_then_close(engine, scenario)
    for request, result in zip(requests, results):
        check(model, request, result)
    return results, stats


def admitted_together(engine, model, requests):
    """`requests` queued while the test holds the engine's device turn, so they are admitted in one step;
    (answers, stats) as `run_scenario` gives them."""
    turns = DeviceTurns()
    engine.share_device(turns)

    async def scenario():
        with turns.turn():  # the engine cannot step: every request queues
            tasks = [asyncio.ensure_future(engine.rank(r)) for r in requests]
            await eventually(lambda: engine.stats().queued == len(requests))
        return await asyncio.gather(*tasks)

    return run_scenario(engine, scenario, model, requests)


def test_calls_for_one_user_admitted_together_compute_the_context_once(tiny):
    """A user's three calls (and another user's) are admitted in one step (the engine's device turn is held while
    they queue): the first computes the context, the two others wait for its pass and copy it (a page reloading
    while its first call is in flight), answering as cold calls."""
    model, labels = tiny
    rng = random.Random(5)
    alice, bob = ([rng.randrange(100, 40000) for _ in range(60)] for _ in range(2))
    requests = [user_request("a1", alice, labels, rng), user_request("a2", alice, labels, rng),
                user_request("b1", bob, labels, rng), user_request("a3", alice, labels, rng, "generate", True)]
    engine = HFEngine(model, EngineConfig(max_batch_size=4, max_tokens_per_step=512))
    results, stats = admitted_together(engine, model, requests)
    context = len(PREFIX) + len(alice)
    assert [r.cached_tokens for r in results] == [0, context, 0, context], "a2 and a3 copied a1's context"
    assert stats.context_misses == 2 and stats.context_hits == 2, "one lookup a request"
    assert stats.prompt_tokens == sum(len(r.run_ids) for r in requests) - stats.cached_tokens


class FirstPassGated(HFEngine):
    """The first prompt pass waits on `gate` once it has run."""

    def __init__(self, model, config):
        self.first_ran, self.gate, self.passes = threading.Event(), threading.Event(), 0
        super().__init__(model, config)

    def _prefill(self, group):
        super()._prefill(group)
        self.passes += 1
        if self.passes == 1:
            self.first_ran.set()
            self.gate.wait(10)


def test_a_call_waiting_for_a_context_computes_it_when_its_computer_leaves_first(tiny):
    """a2 waits for a1's context; a1 is aborted after its first chunk, before the context is in: a2 computes the
    context itself (from the shared prefix a1 stored) and answers as a cold call."""
    model, labels = tiny
    rng = random.Random(6)
    alice = [rng.randrange(100, 40000) for _ in range(60)]
    first, second = user_request("a1", alice, labels, rng), user_request("a2", alice, labels, rng)
    engine = FirstPassGated(model, EngineConfig(max_batch_size=2, max_tokens_per_step=len(PREFIX) + 10))
    turns = DeviceTurns()
    engine.share_device(turns)

    async def scenario():
        with turns.turn():  # both are admitted in one step
            tasks = [asyncio.ensure_future(engine.rank(r)) for r in (first, second)]
            await eventually(lambda: engine.stats().queued == 2)
        await asyncio.to_thread(engine.first_ran.wait, 10)  # a1's first chunk ran (the shared prefix and more)
        assert engine.abort("a1")
        engine.gate.set()
        with pytest.raises(EngineAborted):
            await tasks[0]
        return await tasks[1]

    result, stats = run_then_close(engine, scenario)
    check(model, second, result)
    assert result.cached_tokens == len(PREFIX), "the prefix a1 stored, not a context"
    assert stats.context_misses == 2 and stats.context_hits == 0 and stats.aborted == 1


def test_a_call_left_waiting_by_its_computer_does_not_wait_for_a_later_call_that_computes_it(tiny):
    """a2 waits for a1's context; a1 is aborted after its first chunk, and a3 for the same user arrives before the
    next step: a3 finds no row computing the context and computes it; a2, ahead of a3, computes it too instead of
    waiting behind a3's whole prompt (it kept waiting for any computing row, also one behind it)."""
    model, labels = tiny
    rng = random.Random(8)
    alice = [rng.randrange(100, 40000) for _ in range(60)]
    first, second, third = (user_request(f"a{i}", alice, labels, rng) for i in (1, 2, 3))
    engine = FirstPassGated(model, EngineConfig(max_batch_size=3, max_tokens_per_step=len(PREFIX) + 10))
    turns = DeviceTurns()
    engine.share_device(turns)
    finished: list[str] = []
    held, release = threading.Event(), threading.Event()

    def hold_the_next_turn():
        with turns.turn():
            held.set()
            release.wait(10)

    async def answer(request):
        result = await engine.rank(request)
        finished.append(request.request_id)
        return result

    async def scenario():
        with turns.turn():  # a1 and a2 are admitted in one step: a2 waits for a1's context
            tasks = [asyncio.ensure_future(answer(r)) for r in (first, second)]
            await eventually(lambda: engine.stats().queued == 2)
        await asyncio.to_thread(engine.first_ran.wait, 10)  # a1's first chunk ran; the engine holds its step
        assert engine.abort("a1")
        holder = threading.Thread(target=hold_the_next_turn)
        holder.start()
        await eventually(lambda: turns.waiting() == 1)  # the holder asked before the engine's next step
        engine.gate.set()
        await asyncio.to_thread(held.wait, 10)  # the step ended and a1 left; the next step waits for the turn
        tasks.append(asyncio.ensure_future(answer(third)))
        await eventually(lambda: engine.stats().queued == 1)
        release.set()
        await asyncio.to_thread(holder.join, 10)
        with pytest.raises(EngineAborted):
            await tasks[0]
        return await asyncio.gather(*tasks[1:])

    try:
        results = asyncio.run(scenario())
    finally:
        engine.close()
    for request, result in zip((second, third), results):
        check(model, request, result)
    assert finished == ["a2", "a3"]
    assert results[0].cached_tokens == len(PREFIX), "a2 waited for a3 (a context hit) though a3 came after it"


def test_a_call_ahead_in_turn_never_waits_for_a_context_computed_behind_it(tiny):
    """A decoding generate call for alice is computing her context (its first chunk ran) when a score call for her
    arrives: the score call goes first (`score_first_ms`), so it computes the context itself instead of waiting for
    the generate call's pass. (Calls admitted in one step are admitted in turn order, so the later one waits.)"""
    model, labels = tiny
    rng = random.Random(7)
    alice = [rng.randrange(100, 40000) for _ in range(60)]
    generate = user_request("g", alice, labels, rng, "generate")
    score = user_request("s", alice, labels, rng)
    engine = FirstPassGated(model, EngineConfig(max_batch_size=2, max_tokens_per_step=len(PREFIX) + 10))
    finished: list[str] = []

    async def scenario():
        tasks = []
        for request in (generate, score):
            task = asyncio.ensure_future(engine.rank(request))
            task.add_done_callback(lambda t, rid=request.request_id: finished.append(rid))
            tasks.append(task)
            if request is generate:  # its first chunk (the shared prefix and 10 context tokens) has run
                await asyncio.to_thread(engine.first_ran.wait, 10)
        await eventually(lambda: engine.stats().queued == 1)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    results, stats = run_scenario(engine, scenario, model, [generate, score])
    assert finished[0] == "s", "the score call went first"
    assert results[1].cached_tokens == len(PREFIX), "it computed the context itself (the shared prefix was kept)"
    assert stats.context_misses == 2 and stats.context_hits == 0


def test_a_context_bigger_than_the_whole_cache_is_neither_waited_for_nor_copied(tiny):
    """--context-cache-mb below one user's context: the LRU would drop it at once, so the user's second call does
    not wait for the first's pass (it ran a pass later, computing the context all the same) and no row copies
    the context out for a store that keeps nothing. Both calls and another user's run in one pass."""
    model, labels = tiny
    rng = random.Random(9)
    alice, bob = ([rng.randrange(100, 40000) for _ in range(60)] for _ in range(2))
    requests = [user_request("a1", alice, labels, rng), user_request("a2", alice, labels, rng),
                user_request("b1", bob, labels, rng)]
    engine = FirstPassGated(model, EngineConfig(max_batch_size=4, max_tokens_per_step=512, context_cache_mb=1e-4))
    engine.gate.set()  # only its count of prompt passes is used here
    assert (len(PREFIX) + len(alice)) * engine.kv.bytes_per_token > engine.contexts.capacity
    results, stats = admitted_together(engine, model, requests)
    assert engine.passes == 1, "one prompt pass: a2 did not wait for a1's context"
    assert [r.cached_tokens for r in results] == [0, 0, 0] and stats.context_bytes == 0
    assert stats.context_misses == 3 and stats.context_hits == 0


def test_a_request_that_fails_on_non_finite_values_leaves_nothing_behind_for_the_next(tiny_llama_dir):
    """A request whose keys and values went non-finite (an overflowed precision) fails alone; the slot it leaves
    held them past the next, shorter request's length, where attention reads masked keys (a masked NaN is still
    NaN through SDPA): that request failed too, and its user's context, cached from the spoilt pass, failed every
    later call of the user."""
    model, tokenizer = load_causal_lm(tiny_llama_dir)  # a copy of its own: one embedding row is spoilt
    labels = label_ids(tokenizer, 8)
    poison = 777
    with torch.no_grad():
        model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.model.embed_tokens.weight[poison] = float("nan")
    rng = random.Random(4)
    alice, bob = ([rng.randrange(1000, 40000) for _ in range(40)] for _ in range(2))
    spoilt = user_request("x", alice, labels, rng)
    spoilt = EngineRequest("x", PREFIX, spoilt.suffix_ids + [poison] + list(range(1000, 1060)), labels, mode="score",
                           k=3, context_len=len(alice))
    engine = HFEngine(model, EngineConfig(max_batch_size=1, max_tokens_per_step=64))  # one slot: reused by the next
    try:
        with pytest.raises(EngineError, match="not finite"):
            run(engine, [spoilt])
        first, again = user_request("b1", bob, labels, rng), user_request("b2", bob, labels, rng)
        answers = [run(engine, [first])[0], run(engine, [again])[0]]
        healthy, stats = engine.check_health(), engine.stats()
    finally:
        engine.close()
    for request, result in zip([first, again], answers):
        check(model, request, result)
    assert answers[1].cached_tokens == len(PREFIX) + len(bob), "the second call reused its context"
    assert healthy and stats.failed == 1 and stats.completed == 2
