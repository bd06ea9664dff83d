"""The ranking server in-process on 127.0.0.1:0, in front of a real retrieval server, on the tiny
merged LLM bundle (CPU), with real gRPC clients: both modes rank exactly as the evaluation's
reference does, cold start, request ids, and every failure a caller can meet (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, degraded on a near deadline, DEADLINE_EXCEEDED, UNAVAILABLE, client cancel),
health, metrics, mutual TLS to the retrieval tier, and a fuzz test.

Slow paths are made with real configuration, not sleeps: one batch slot and one token per engine
step turn a ~400-token prompt into ~400 engine steps."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given, settings
from hypothesis import strategies as st

from loadtest.servers import free_port, scrape_metrics
from tests.fixtures.serving import wait_until
from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.serving.server import NOT_SERVING, SERVING
from palr.serving.errors import QUEUE_FULL
from palr.serving.validation import MAX_ITEM_IDS
from ranking_server.config import RankingServerConfig
from ranking_server.metrics import ANSWER_SOURCES, ENGINE
from ranking_server.prompts import slot_tokens
from ranking_server.server import SLOT_BLOCK, RankingServer
from ranking_server.servicer import SERVICE_NAME
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.server import RetrievalServer

SCORE, GENERATE, UNSPECIFIED = (ranking_pb2.RANKING_MODE_SCORE, ranking_pb2.RANKING_MODE_GENERATE,
                                ranking_pb2.RANKING_MODE_UNSPECIFIED)
FUSION_WEIGHT = 0.5
# the slow server's model runs every request (no kept answers): its tests need the model's time
SLOW = dict(max_batch_size=1, max_tokens_per_step=1, max_queue=1, max_k=26, degrade_reserve_ms=500,
            answer_cache_size=0)


# -- servers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tiny_llm_bundle, tmp_path_factory) -> Path:
    """The tiny LLM bundle with its ranker's fusion weight set to 0.5 (re-recorded in the manifest):
    the weight fit for a random tiny model is usually 0, which would leave fusion untested."""
    root = tmp_path_factory.mktemp("ranking") / "bundle"
    shutil.copytree(tiny_llm_bundle, root, symlinks=True)
    bundle = Bundle.open(root)
    ranker_path = bundle.path("ranker")
    ranker = json.loads(ranker_path.read_text())
    ranker_path.write_text(json.dumps({**ranker, "fusion_weight": FUSION_WEIGHT}, indent=2))
    meta = {k: v for k, v in bundle.artifact("ranker").items() if k not in ("path", "sha256", "files", "created_at")}
    bundle.add_artifact("ranker", bundle.artifact("ranker")["path"], **{**meta, "fusion_weight": FUSION_WEIGHT})
    bundle.save()
    return root


def start_retrieval(server_loop, bundle: Path, **options) -> RetrievalServer:
    async def make() -> RetrievalServer:
        server = RetrievalServer(RetrievalServerConfig(bundle=bundle, **{"port": 0, **options}))
        await server.start()
        await server.load()
        await server.server.set_serving()
        return server
    return server_loop.run(make())


def start_ranking(server_loop, bundle: Path, retrieval: str, warm: bool = True, **options) -> RankingServer:
    async def make() -> RankingServer:
        server = RankingServer(RankingServerConfig(bundle=bundle, retrieval=retrieval, port=0, **options))
        await server.start()
        if warm:
            await server.load()
            await server.server.set_serving()
        return server
    return server_loop.run(make(), timeout=120)


@pytest.fixture(scope="module")
def retrieval(server_loop, bundle):
    server = start_retrieval(server_loop, bundle)
    yield server
    server_loop.run(server.drain())


@pytest.fixture(scope="module")
def ranking(server_loop, bundle, retrieval):
    """Default options, metrics on."""
    server = start_ranking(server_loop, bundle, retrieval.server.address, metrics_port=free_port())
    yield server
    server_loop.run(server.drain())


@pytest.fixture(scope="module")
def slow(server_loop, bundle, retrieval):
    """One batch slot, one token per engine step, one queue place, 500 ms kept to answer degraded, no answer
    cache."""
    server = start_ranking(server_loop, bundle, retrieval.server.address, metrics_port=free_port(), **SLOW)
    yield server
    server_loop.run(server.drain())


def stub_of(server) -> ranking_pb2_grpc.RankingServiceStub:
    return ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(server.server.address))


@pytest.fixture(scope="module")
def stub(ranking):
    return stub_of(ranking)


@pytest.fixture(scope="module")
def slow_stub(slow):
    return stub_of(slow)


def recommend(stub, timeout: float = 60, metadata=None, **fields) -> ranking_pb2.RecommendResponse:
    return stub.Recommend(ranking_pb2.RecommendRequest(**fields), timeout=timeout, metadata=metadata)


# -- what the answers are compared with --------------------------------------------------------------

@dataclass
class Reference:
    """The evaluation's path (compile evaluate --tier ranking), one request at a time: palr.prompt,
    the reference LLM functions of palr.llm, palr.ranking's fusion and ordering."""

    bundle: Bundle
    catalog: Catalog
    histories: dict[str, list[str]]
    profiles: dict[str, str]
    ranker: dict
    model: object
    prompt: object
    retrieval_stub: retrieval_pb2_grpc.RetrievalServiceStub
    trends: object  # palr.trends.TrendTable
    collab: object  # palr.collab.CollabTable: the retrieval term's EASE scores

    def retrieved(self, num_candidates: int, **fields) -> list[retrieval_pb2.Candidate]:
        request = retrieval_pb2.RetrieveRequest(k=num_candidates, **fields)
        return [c for m in self.retrieval_stub.Retrieve(request, timeout=30) for c in m.candidates]

    def ranking(self, mode: int, k: int, num_candidates: int, user_id: str = "", history=(),
                as_of: float = 0.0, llm: bool = True) -> list[tuple[str, float]]:
        """The top k (item id, score); `llm` False: by the linear term alone, a degraded answer's order."""
        from palr.decoding import TitleConstraint
        from palr.llm import generate_constrained, score_candidates
        from palr.profiles import StatsProfiler
        from palr.ranking import (candidate_ranks, complete_order, fuse, generation_bias, head_bias, order_by_scores,
                                  retrieval_prior)
        from palr.trends import TrendSettings

        candidates = self.retrieved(num_candidates, user_id=user_id, history=list(history))
        ids, scores = [c.item_id for c in candidates], [c.score for c in candidates]
        items = [self.catalog.by_id(i) for i in ids]
        if history:  # the moment: the newest interaction the bundle knows
            seen, profile = list(history), StatsProfiler(self.catalog)([self.catalog.by_id(i) for i in history])
            moment = self.trends.latest
        else:  # the moment: the stored user's last interaction
            seen, profile, moment = self.histories[user_id], self.profiles[user_id], self.trends.as_of[user_id]
        trends = self.trends.buckets(as_of or moment, self.catalog.indices(ids), TrendSettings(**self.ranker["trend"]))
        collab = self.collab.scores(self.catalog.indices(seen), self.catalog.indices(ids))
        ranks = candidate_ranks(self.ranker["prompt"]["rank_tokens"], scores, collab)
        bias = head_bias(self.ranker["trend_bias"], trends, self.ranker["rank_bias"], ranks)
        scores = retrieval_prior(scores, trends, self.ranker.get("retrieval_trend_weights"), collab,
                                 self.ranker["retrieval_collab_weight"])
        if not llm:
            return [(ids[p], scores[p]) for p in order_by_scores(scores)[:k]]
        parts = self.prompt.retrieval(profile, [self.catalog.by_id(i) for i in seen], items, trends, ranks)
        weight = float(self.ranker["fusion_weight"])
        if mode == GENERATE:  # generate_k lines decoded, the rest by the decoding's bias (as evaluated)
            decoding_bias = generation_bias(scores, weight, bias)
            constraint = TitleConstraint(parts.label_token_ids, parts.candidate_line_ids,
                                         min(k, self.ranker["generate_k"], len(ids)))
            emitted = generate_constrained(self.model, parts.input_ids, constraint, bias=decoding_bias,
                                           readout=parts.readout,
                                           logit_weight=self.ranker.get("generate_logit_weight", 1.0))
            order = complete_order(emitted, len(ids), decoding_bias)
            return [(ids[p], 1.0 / (r + 1)) for r, p in enumerate(order[:k])]
        fused = fuse(score_candidates(self.model, parts.input_ids, parts.readout), scores, weight, bias)
        return [(ids[p], fused[p]) for p in order_by_scores(fused)[:k]]


@pytest.fixture(scope="module")
def reference(bundle, retrieval) -> Reference:
    from palr.llm import load_causal_lm
    from palr.profiles import Profiles
    from palr.hybrid import ranker_prompt
    from palr.collab import CollabTable
    from palr.trends import TrendTable

    opened = Bundle.open(bundle)
    ranker = json.loads(opened.path("ranker").read_text())
    assert ranker["generate_format"] == "titles"
    model, tokenizer = load_causal_lm(opened.path("llm_merged"))
    users = json.loads(opened.path("users").read_text())["users"]
    return Reference(bundle=opened, catalog=Catalog.load(opened.path("catalog")),
                     histories={u: e["history"] for u, e in users.items()},
                     profiles=Profiles.load(opened.path("profiles")).profiles, ranker=ranker, model=model,
                     prompt=ranker_prompt(tokenizer, ranker, Catalog.load(opened.path("catalog"))),
                     retrieval_stub=retrieval_pb2_grpc.RetrievalServiceStub(
                         grpc.insecure_channel(retrieval.server.address)),
                     trends=TrendTable.load(opened.path("trends")), collab=CollabTable.load(opened.path("collab")))


def some_users(reference: Reference, n: int) -> list[str]:
    return [u for u, h in reference.histories.items() if h][:n]


def assert_consistent(response: ranking_pb2.RecommendResponse, k: int, candidates: list[str], wall_s: float):
    """k distinct items from the retrieved candidates, retrieval ranks right, timings adding up."""
    ids = [item.item_id for item in response.items]
    assert len(ids) == len(set(ids)) == k
    assert [item.rank for item in response.items] == list(range(k))
    assert all(candidates[item.retrieval_rank] == item.item_id for item in response.items)
    t = response.timings
    assert min(t.retrieval_ms, t.queue_ms, t.ranking_ms) >= 0 and t.retrieval_ms > 0
    assert t.retrieval_ms + t.queue_ms + t.ranking_ms <= t.total_ms + 0.5
    assert t.total_ms <= wall_s * 1e3


# -- happy paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [SCORE, GENERATE])
@pytest.mark.parametrize("who", ["stored user", "explicit history", "stored user sending its history"])
def test_both_modes_rank_k_distinct_candidates_exactly_as_the_evaluation_does(stub, reference, mode, who):
    """A stored user sending its own stored history is ranked as the stored user (its profile, its last
    interaction's moment for the trend counts, as evaluated); it got the bundle's newest moment before."""
    user = some_users(reference, 1)[0]
    fields = {"user_id": user} if who == "stored user" else {"history": reference.histories[user][-7:]}
    if who == "stored user sending its history":
        fields = {"user_id": user, "history": reference.histories[user]}
    num_candidates, k = 12, 5
    started = time.perf_counter()
    rid = f"happy-{mode}-{who.replace(' ', '-')}"
    response = recommend(stub, k=k, mode=mode, num_candidates=num_candidates, request_id=rid, **fields)
    wall_s = time.perf_counter() - started
    candidates = [c.item_id for c in reference.retrieved(num_candidates, user_id=fields.get("user_id", ""),
                                                           history=fields.get("history", []))]
    assert_consistent(response, k, candidates, wall_s)
    expected = reference.ranking(mode, k, num_candidates, fields.get("user_id", ""),
                                 () if who == "stored user sending its history" else fields.get("history", ()))
    assert [item.item_id for item in response.items] == [i for i, _ in expected]
    assert [item.score for item in response.items] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert not response.degraded and not response.degraded_reason and not response.cold_start
    assert response.mode == mode and response.request_id == rid
    merged = reference.bundle.version('llm_merged')  # no deployment build here: llm/merged is what ranks
    assert response.model_version == (f"sasrec:{reference.bundle.version('sasrec_onnx')} llm:{merged} "
                                      f"ranker:{reference.bundle.version('ranker')} engine:merged:{merged}")
    assert response.timings.ranking_ms > 0


def test_generate_mode_writes_the_rankers_generate_k_lines_and_orders_a_longer_lists_rest_by_the_bias(stub,
                                                                                                       reference):
    """ranker.json's generate_k is what the evaluation decodes: a longer list is those lines, then the rest in the
    order the decoding's bias gives (it decoded k lines, a cost and a tail the evaluation never measured)."""
    user, lines = some_users(reference, 2)[1], reference.ranker["generate_k"]
    k = num_candidates = lines + 3
    response = recommend(stub, user_id=user, k=k, num_candidates=num_candidates, mode=GENERATE)
    expected = reference.ranking(GENERATE, k, num_candidates, user_id=user)
    assert [item.item_id for item in response.items] == [i for i, _ in expected]
    assert len(response.items) == k and not response.degraded


def test_concurrent_users_each_get_their_own_ranking_from_shared_engine_steps(server_loop, bundle, retrieval,
                                                                              reference):
    """24 requests at once (12 users, each in score and generate mode with different candidate counts, so the
    second of a user's calls can reuse the first's context KV): each answer is its own user's, as the reference
    ranks it alone; the engine held several of them at once (64 tokens a step: each ~400-token prompt spans
    several steps, so they overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_ranking(server_loop, bundle, retrieval.server.address, max_tokens_per_step=64, max_k=26)
    try:
        stub, warm_up = stub_of(server), server.engine.stats().completed
        calls = [(user, mode, k, num_candidates) for user in some_users(reference, 12)
                 for mode, k, num_candidates in ((SCORE, 5, 12), (GENERATE, 4, 10))]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c: recommend(stub, user_id=c[0], mode=c[1], k=c[2], num_candidates=c[3],
                                                        request_id=f"together-{c[0]}-{c[1]}"), calls))
        for (user, mode, k, num_candidates), response in zip(calls, answers):
            expected = reference.ranking(mode, k, num_candidates, user, ())
            assert not response.degraded and response.request_id == f"together-{user}-{mode}"
            assert [item.item_id for item in response.items] == [i for i, _ in expected], (user, mode)
            assert [item.score for item in response.items] == pytest.approx([s for _, s in expected], abs=1e-4)
        stats = server.engine.stats()
        assert stats.completed - warm_up == len(calls) and stats.max_active > 1, stats
    finally:
        server_loop.run(server.drain())


def test_candidates_from_another_sasrec_are_ranked_counted_and_warned_about(ranking, stub, reference, caplog):
    """The ranker's fusion weights were fit on its bundle's SASRec: a retrieval tier serving another one (a rolling
    update, or another bundle) went unnoticed. Now each such answer is counted, and each new version warned once."""
    from prometheus_client import REGISTRY

    def mismatches() -> float:
        return REGISTRY.get_sample_value("ranking_retrieval_model_mismatch_total") or 0.0

    user = some_users(reference, 1)[0]
    before = mismatches()
    recommend(stub, k=3, user_id=user, request_id="same-sasrec")
    assert mismatches() == before, "the bundle's own SASRec is no mismatch"
    fit_on, ranking.servicer.retrieval_model = ranking.servicer.retrieval_model, "fit-on-another-sasrec"
    try:
        with caplog.at_level(logging.WARNING, logger="ranking_server.servicer"):
            answers = [recommend(stub, k=3, user_id=user, request_id=f"other-sasrec-{i}") for i in range(2)]
    finally:
        ranking.servicer.retrieval_model = fit_on
    assert mismatches() == before + 2 and all(a.items and not a.degraded for a in answers)
    warned = [r.getMessage() for r in caplog.records if "retrieval tier serves SASRec" in r.getMessage()]
    assert len(warned) == 1 and "fit-on-another-sasrec" in warned[0]


def test_candidates_trends_are_counted_as_of_the_moment_the_caller_names(stub, reference):
    """as_of_unix_s moves the moment the candidates' trend tokens are counted at (palr/trends.py): the
    answer is the evaluation path's at that moment, and a moment with other trends ranks differently."""
    user = some_users(reference, 1)[0]
    times = reference.trends.times
    early, late = float(times[len(times) // 10]), float(times[-1])
    answers = {}
    for as_of in (early, late):
        response = recommend(stub, user_id=user, k=8, mode=SCORE, num_candidates=12, as_of_unix_s=int(as_of))
        expected = reference.ranking(SCORE, 8, 12, user, as_of=int(as_of))
        assert [item.item_id for item in response.items] == [i for i, _ in expected]
        assert [item.score for item in response.items] == pytest.approx([s for _, s in expected], abs=1e-4)
        answers[as_of] = [(item.item_id, round(item.score, 4)) for item in response.items]
    assert answers[early] != answers[late]


def test_unspecified_mode_is_score_mode_and_zero_candidates_is_the_default(stub, reference, ranking):
    user = some_users(reference, 2)[1]
    unspecified = recommend(stub, user_id=user, k=3, mode=UNSPECIFIED)
    scored = recommend(stub, user_id=user, k=3, mode=SCORE, num_candidates=ranking.planner.default_candidates)
    assert unspecified.mode == SCORE
    assert [i.item_id for i in unspecified.items] == [i.item_id for i in scored.items]


@pytest.mark.parametrize("mode", [SCORE, GENERATE])
def test_cold_start_user_gets_the_popularity_candidates_as_they_are_without_the_llm(stub, ranking, reference, mode):
    completed = ranking.engine.stats().completed
    started = time.perf_counter()
    response = recommend(stub, user_id="no-such-user", k=4, mode=mode)
    popular = reference.retrieved(ranking.planner.default_candidates, user_id="no-such-user")
    assert_consistent(response, 4, [c.item_id for c in popular], time.perf_counter() - started)
    assert [(i.item_id, i.score) for i in response.items] == [(c.item_id, pytest.approx(c.score)) for c in popular[:4]]
    assert response.cold_start and not response.degraded and response.mode == mode
    assert response.timings.queue_ms == response.timings.ranking_ms == 0
    assert ranking.engine.stats().completed == completed  # the LLM was not asked


def test_exclude_is_left_out_and_k_is_capped_by_what_retrieval_returns(stub, reference):
    user = some_users(reference, 1)[0]
    first = recommend(stub, user_id=user, k=5, num_candidates=5)
    excluded = [first.items[0].item_id, first.items[1].item_id]
    again = recommend(stub, user_id=user, k=5, num_candidates=5, exclude=excluded)
    assert not set(excluded) & {i.item_id for i in again.items} and len(again.items) == 5
    history = set(reference.histories[user])
    left = [item.id for item in reference.catalog.items if item.id not in history][:3]
    rest = [item.id for item in reference.catalog.items if item.id not in history and item.id not in left]
    few = recommend(stub, user_id=user, k=5, num_candidates=5, exclude=rest)  # retrieval can return 3 items only
    assert sorted(i.item_id for i in few.items) == sorted(left) and not few.degraded and not few.cold_start


@pytest.mark.parametrize("mode", [SCORE, GENERATE])
def test_a_single_candidate_is_answered_as_it_is_without_the_llm(stub, ranking, reference, mode):
    """One candidate has one order: the engine is not asked (no queue, no model time), and the answer is the
    retrieved item with its retrieval score, not flagged degraded."""
    user = some_users(reference, 1)[0]
    completed, answer_misses = ranking.engine.stats().completed, ranking.engine.stats().answer_misses
    response = recommend(stub, user_id=user, k=1, num_candidates=1, mode=mode)
    retrieved = reference.retrieved(1, user_id=user)
    assert [(i.item_id, i.score, i.retrieval_rank) for i in response.items] == [
        (retrieved[0].item_id, pytest.approx(retrieved[0].score), 0)]
    assert not response.degraded and not response.cold_start and response.mode == mode
    assert response.timings.queue_ms == response.timings.ranking_ms == 0
    stats = ranking.engine.stats()
    assert (stats.completed, stats.answer_misses) == (completed, answer_misses)  # the LLM was not asked


def test_a_stored_history_longer_than_a_request_field_may_hold_is_served_and_its_old_items_stay_excluded(
        stub, reference, ranking, monkeypatch):
    """A stored history over MAX_ITEM_IDS (re-watches add up): the newest MAX_ITEM_IDS go to retrieval as the
    history, the older items not among them as exclusions; it used to be refused with INVALID_ARGUMENT."""
    user = some_users(reference, 1)[0]
    history = reference.histories[user]
    newest = (history * (MAX_ITEM_IDS // len(history) + 1))[-MAX_ITEM_IDS:]
    first = recommend(stub, history=newest, k=5, num_candidates=5)
    older = [first.items[0].item_id, first.items[1].item_id]  # what retrieval puts first for the newest items
    monkeypatch.setitem(ranking.planner.stored_histories, user, older + newest)
    answer = recommend(stub, user_id=user, k=5, num_candidates=5)
    assert len(answer.items) == 5 and not answer.degraded
    assert not set(older) & {i.item_id for i in answer.items}


def test_request_id_comes_from_the_field_or_metadata_and_reaches_both_servers_logs(stub, reference, caplog):
    user = some_users(reference, 1)[0]
    with caplog.at_level(logging.INFO):
        by_field = recommend(stub, user_id=user, k=2, request_id="trace-field-1")
        by_metadata = recommend(stub, user_id=user, k=2, metadata=(("x-request-id", "trace-meta-2"),))
        generated = recommend(stub, user_id=user, k=2)
    assert (by_field.request_id, by_metadata.request_id) == ("trace-field-1", "trace-meta-2")
    assert len(generated.request_id) == 16
    for rid in ("trace-field-1", "trace-meta-2", generated.request_id):
        loggers = {r.name for r in caplog.records if f"rid={rid} " in r.getMessage()}
        assert {"ranking_server.servicer", "retrieval_server.servicer"} <= loggers


# -- bad requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    ({"k": 0}, "k "),
    ({"k": -2}, "k "),
    ({"k": 6, "num_candidates": 5}, "k "),
    ({"k": 21}, "k "),  # over the default num_candidates (20)
    ({"k": 3, "num_candidates": 21}, "num_candidates"),  # over --max-k (the ranker's K, 20)
    ({"k": 3, "num_candidates": -1}, "num_candidates"),
    ({"k": 3, "mode": 7}, "mode"),
    ({"k": 3, "mode": -1}, "mode"),
    ({"k": 3, "history": ["no-such-item", "50"]}, "history"),
    ({"k": 3, "exclude": ["nor-this"]}, "exclude"),
    ({"k": 3, "request_id": "has a space"}, "request_id"),
    ({"k": 3, "request_id": "x" * 129}, "request_id"),
    ({"k": 3, "request_id": "ünïcode"}, "request_id"),
    ({"k": 3, "as_of_unix_s": -5}, "as_of_unix_s"),
    ({"k": 3, "as_of_unix_s": 1_765_000_000_000}, "as_of_unix_s"),  # milliseconds
])
def test_bad_requests_are_invalid_argument_naming_the_field(stub, reference, fields, named):
    with pytest.raises(grpc.RpcError) as error:
        recommend(stub, user_id=some_users(reference, 1)[0], **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(named)
    for unknown in fields.get("history", []) + fields.get("exclude", []):
        assert (repr(unknown) in error.value.details()) == (unknown not in reference.catalog)
    assert recommend(stub, user_id="no-such-user", k=1).items  # and the server goes on serving


def test_a_moment_outside_the_bundles_interactions_is_out_of_range(stub, reference):
    """Today's date on a 1998 dataset: every candidate's trend would read "no recent views" (the lowest bucket), a
    prompt the ranker never saw, answered OK before. From just after the first event (counts take the events before
    the moment) to the last one plus the window, moments are in."""
    from palr.trends import TrendSettings

    user = some_users(reference, 1)[0]
    first, last = reference.trends.moments(TrendSettings(**reference.ranker["trend"]))
    assert first == int(first)  # MovieLens times are whole seconds
    for outside in (int(first) - 1, int(first), int(last) + 1, int(time.time())):
        with pytest.raises(grpc.RpcError) as error:
            recommend(stub, user_id=user, k=3, as_of_unix_s=outside)
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE, outside
        assert error.value.details().startswith(f"as_of_unix_s {outside} (") and "send 0" in error.value.details()
    for inside in (int(first) + 1, int(last)):
        assert len(recommend(stub, user_id=user, k=3, as_of_unix_s=inside).items) == 3


@pytest.mark.parametrize("fields, hint, wrong", [
    ({"k": 6, "num_candidates": 5}, "; raise num_candidates (at most 20)", None),
    ({"k": 21}, None, "raise num_candidates"),  # over what any num_candidates allows: no such advice
    ({"k": 3, "as_of_unix_s": 1_765_000_000_000}, "(milliseconds?)", None),
    ({"k": 3, "as_of_unix_s": -5}, None, "milliseconds"),
    ({"k": 3, "history": ["no-such-item"]}, "not in this server's catalog", None),
])
def test_a_refusal_says_what_to_do_where_the_caller_can(stub, reference, fields, hint, wrong):
    with pytest.raises(grpc.RpcError) as error:
        recommend(stub, user_id=some_users(reference, 1)[0], **fields)
    assert (hint is None or hint in error.value.details()) and (wrong is None or wrong not in error.value.details())


# -- load, deadlines, cancellation -----------------------------------------------------------------

def test_queue_full_is_resource_exhausted_at_once_and_visible_in_metrics(slow, slow_stub, reference):
    ENGINE.attach(slow.engine)  # one serving engine per process; these tests run several
    user = some_users(reference, 1)[0]
    before = scrape_metrics(slow.server.metrics_port)

    def call(i: int) -> tuple[grpc.StatusCode, float, str]:
        started = time.perf_counter()
        try:
            recommend(slow_stub, user_id=user, k=3, num_candidates=26, request_id=f"burst-{i}")
            return grpc.StatusCode.OK, time.perf_counter() - started, ""
        except grpc.RpcError as e:
            # a full queue is marked so, for callers that may go to another replica (palr.serving.errors)
            assert (QUEUE_FULL in e.trailing_metadata()) == (e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert ("x-request-id", f"burst-{i}") in e.trailing_metadata()  # beside the mark, not instead of it
            return e.code(), time.perf_counter() - started, e.details()

    with ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(call, i) for i in range(8)]
        wait_until(lambda: (lambda m: m["ranking_engine_active"] == 1 and m["ranking_engine_queued"] == 1)(
            scrape_metrics(slow.server.metrics_port)), what="one request running and one queued")
        outcomes = [c.result() for c in calls]
    ok = [s for code, s, _ in outcomes if code == grpc.StatusCode.OK]
    rejected = [(s, details) for code, s, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) >= 2 and len(rejected) >= 1 and len(ok) + len(rejected) == 8
    assert max(s for s, _ in rejected) < min(ok)  # refused at once, while the admitted ones were still ranking
    assert all("queue is full" in details for _, details in rejected)
    after = scrape_metrics(slow.server.metrics_port)
    assert after['ranking_rejected_total{reason="queue_full"}'] - before['ranking_rejected_total{reason="queue_full"}'] \
        == len(rejected)
    assert after['ranking_requests_total{code="RESOURCE_EXHAUSTED"}'] - before.get(
        'ranking_requests_total{code="RESOURCE_EXHAUSTED"}', 0) == len(rejected)
    assert after["ranking_engine_active"] == after["ranking_engine_queued"] == 0


def stage_counts(server) -> dict[str, float]:
    """Requests observed per stage of `ranking_stage_seconds`, from the server's /metrics."""
    samples = scrape_metrics(server.server.metrics_port)
    return {stage: samples.get(f'ranking_stage_seconds_count{{stage="{stage}"}}', 0.0)
            for stage in ("retrieval", "queue", "ranking", "total")}


def test_deadline_too_short_for_the_llm_aborts_it_and_answers_by_the_linear_term_flagged_degraded(
        slow, slow_stub, reference):
    user = some_users(reference, 1)[0]
    request = dict(user_id=user, k=8, num_candidates=26, mode=GENERATE)
    assert not recommend(slow_stub, **request).degraded  # undisturbed, it is answered by the LLM
    before = slow.engine.stats()
    observed = stage_counts(slow)
    # the LLM is held at its first prompt pass until the answer is in (a deadline sized from a timed call failed
    # either way under load: the LLM finished in it, or retrieval left it no time)
    engine, reached, gate = slow.engine, threading.Event(), threading.Event()  # the hf engine (no answer cache)

    def held(group, run=engine._prefill):
        reached.set()
        gate.wait(30)
        return run(group)

    engine._prefill = held
    deadline_s = SLOW["degrade_reserve_ms"] / 1e3 + 1.5
    try:
        response = recommend(slow_stub, timeout=deadline_s, **request)  # an answer, within the deadline (else it raises)
        assert reached.is_set()
    finally:
        gate.set()
        del engine._prefill
    assert response.degraded and response.degraded_reason == "deadline" and not response.cold_start
    # the aborted wait is not split, so it counts in neither queue nor ranking (it showed as a zero queue before)
    assert stage_counts(slow) == {**observed, "retrieval": observed["retrieval"] + 1, "total": observed["total"] + 1}
    assert response.timings.queue_ms == 0 and response.timings.ranking_ms > 0
    # the linear term's order (retrieval + trend + EASE, no LLM), not the bare retrieval order: what the ranking tier
    # knows without its model
    linear = reference.ranking(GENERATE, 8, 26, user_id=user, llm=False)
    assert [i.item_id for i in response.items] == [item for item, _ in linear]
    assert [i.score for i in response.items] == pytest.approx([score for _, score in linear], abs=1e-5)
    candidates = [c.item_id for c in reference.retrieved(26, user_id=user)]
    assert [candidates[i.retrieval_rank] for i in response.items] == [item for item, _ in linear]
    wait_until(lambda: slow.engine.stats().aborted == before.aborted + 1, what="the engine request's abort")
    assert slow.engine.stats().active == 0 and slow.engine.stats().completed == before.completed


def test_a_deadline_shorter_than_the_reserve_gets_the_linear_terms_order_without_asking_the_llm(
        slow, slow_stub, reference):
    user = some_users(reference, 1)[0]
    before = slow.engine.stats()
    response = recommend(slow_stub, timeout=SLOW["degrade_reserve_ms"] / 1e3 * 0.6, user_id=user, k=3)
    assert response.degraded and response.degraded_reason == "deadline"
    linear = reference.ranking(SCORE, 3, 20, user_id=user, llm=False)
    assert [i.item_id for i in response.items] == [item for item, _ in linear]
    stats = slow.engine.stats()
    assert (stats.completed, stats.aborted) == (before.completed, before.aborted)


def test_a_retrieval_tier_that_does_not_answer_in_time_is_deadline_exceeded_counted_as_such(server_loop, bundle,
                                                                                            reference):
    """The retrieval tier's model held (a real retrieval server whose ORT call waits on purpose): with no deadline of
    the caller's, the server's default deadline passes in retrieval, and the caller gets DEADLINE_EXCEEDED naming
    the retrieval server, not a hang or an INTERNAL."""
    import threading

    held = start_retrieval(server_loop, bundle)
    release = threading.Event()
    run_batch = held.runner.run_batch
    held.runner.run_batch = lambda items: (release.wait(30), run_batch(items))[1]
    server = start_ranking(server_loop, bundle, held.server.address, metrics_port=free_port(),
                           default_deadline_ms=600, degrade_reserve_ms=100)
    try:
        rejected = 'ranking_rejected_total{reason="deadline"}'
        before = scrape_metrics(server.server.metrics_port).get(rejected, 0.0)
        with pytest.raises(grpc.RpcError) as error:
            stub_of(server).Recommend(ranking_pb2.RecommendRequest(user_id=some_users(reference, 1)[0], k=3))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"retrieval server {held.server.address} did not answer within" in error.value.details()
        assert scrape_metrics(server.server.metrics_port).get(rejected, 0.0) == before + 1
    finally:
        release.set()
        server_loop.run(server.drain())
        server_loop.run(held.drain())


def test_a_retrieval_tier_refusing_for_a_full_queue_is_counted_as_retrieval_overload(server_loop, bundle, reference):
    """A real retrieval server with --max-queue 1 whose model is held, one Retrieve waiting on it: the Recommend
    behind it is RESOURCE_EXHAUSTED marked queue-full (another replica may take it), counted as
    `retrieval_queue_full`, not as a `retrieval_error` (what tiers that disagree are counted as)."""
    import threading

    held = start_retrieval(server_loop, bundle, max_queue=1)
    release = threading.Event()
    run_batch = held.runner.run_batch
    held.runner.run_batch = lambda items: (release.wait(30), run_batch(items))[1]
    server = start_ranking(server_loop, bundle, held.server.address, metrics_port=free_port(),
                           retrieval_queue_full_retries=0)
    channel = grpc.insecure_channel(held.server.address)
    waiting = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(retrieval_pb2.RetrieveRequest(user_id="1", k=3),
                                                                       timeout=30)
    try:
        wait_until(lambda: held.servicer._waiting == 1, what="one Retrieve waiting for the held model")
        names = ('ranking_rejected_total{reason="retrieval_queue_full"}',
                 'ranking_rejected_total{reason="retrieval_error"}')
        before = [scrape_metrics(server.server.metrics_port).get(n, 0.0) for n in names]
        with pytest.raises(grpc.RpcError) as error:
            stub_of(server).Recommend(ranking_pb2.RecommendRequest(user_id=some_users(reference, 1)[0], k=3),
                                      timeout=20)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL in error.value.trailing_metadata()
        after = [scrape_metrics(server.server.metrics_port).get(n, 0.0) for n in names]
        assert after == [before[0] + 1, before[1]]
    finally:
        release.set()
        waiting.cancel()
        channel.close()
        server_loop.run(server.drain())
        server_loop.run(held.drain())


class ForeignCatalog(retrieval_pb2_grpc.RetrievalServiceServicer):
    """A retrieval tier serving another bundle: its first chunk names item ids this catalog lacks, then it would go
    on streaming for half a minute; records whether the ranking server cancelled the stream. (A real retrieval
    server of another catalog would need a second dataset; this is the one stand-in for it.)"""

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def Retrieve(self, request, context):
        await context.write(retrieval_pb2.RetrieveResponse(
            candidates=[retrieval_pb2.Candidate(item_id=f"foreign-{n}", score=1.0) for n in range(3)]))
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_candidates_unknown_to_this_catalog_are_internal_and_the_retrieve_is_cancelled_at_once(server_loop, bundle):
    async def foreign_server():
        servicer, grpc_server = ForeignCatalog(), grpc.aio.server()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        return servicer, grpc_server, port

    servicer, foreign, port = server_loop.run(foreign_server())
    server = start_ranking(server_loop, bundle, f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.RpcError) as error:
            stub_of(server).Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=20)
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "unknown to this bundle's catalog (['foreign-0'" in error.value.details()
        assert "serve different bundles" in error.value.details()
        # the stream was cancelled when the request failed, not left to run out its 30 s
        server_loop.run(asyncio.wait_for(servicer.cancelled.wait(), 10))
    finally:
        server_loop.run(server.drain())
        server_loop.run(foreign.stop(0))


class Scripted(retrieval_pb2_grpc.RetrievalServiceServicer):
    """A retrieval tier of another bundle or settings: answers every Retrieve with the same candidates, whatever was
    asked, never a cold start (a tier whose users.json knows users this one does not). As ForeignCatalog: a real
    retrieval server of this bundle never misbehaves so."""

    def __init__(self, item_ids: list[str]):
        self.item_ids = item_ids

    async def Retrieve(self, request, context):
        await context.write(retrieval_pb2.RetrieveResponse(candidates=[
            retrieval_pb2.Candidate(item_id=i, score=-float(n)) for n, i in enumerate(self.item_ids)]))


def scripted_retrieval(server_loop, item_ids: list[str]):
    async def serve():
        grpc_server = grpc.aio.server()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(Scripted(item_ids), grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        return grpc_server, f"127.0.0.1:{port}"

    return server_loop.run(serve())


def test_candidates_from_the_history_exclusions_duplicates_or_past_num_candidates_are_dropped_and_counted(
        server_loop, bundle, reference):
    """The caller's excluded item was answered, a duplicate ranked twice, and a list longer than the labels ended
    INTERNAL from a PromptError: the ranking tier took the retrieval stream as it came."""
    user = some_users(reference, 1)[0]
    history = reference.histories[user]
    others = [item.id for item in reference.catalog.items if item.id not in history]
    excluded, fresh = others[0], others[1:7]
    sent = [history[-1], excluded, fresh[0], fresh[0], *fresh[1:]]  # 6 fresh items for num_candidates 4
    scripted, address = scripted_retrieval(server_loop, sent)
    server = start_ranking(server_loop, bundle, address, metrics_port=free_port())
    try:
        before = scrape_metrics(server.server.metrics_port)
        response = stub_of(server).Recommend(ranking_pb2.RecommendRequest(
            user_id=user, k=4, num_candidates=4, exclude=[excluded]), timeout=60)
        after = scrape_metrics(server.server.metrics_port)
        assert sorted(i.item_id for i in response.items) == sorted(fresh[:4]) and not response.degraded
        delta = lambda reason: (after[f'ranking_retrieval_candidates_dropped_total{{reason="{reason}"}}']  # noqa: E731
                                - before[f'ranking_retrieval_candidates_dropped_total{{reason="{reason}"}}'])
        assert (delta("history_or_excluded"), delta("duplicate"), delta("over_num_candidates")) == (2, 1, 2)
    finally:
        server_loop.run(server.drain())
        server_loop.run(scripted.stop(0))


def test_a_user_with_no_history_here_is_a_cold_start_whatever_the_retrieval_tier_found(server_loop, bundle,
                                                                                         reference):
    """A user this bundle does not know, sent without a history, to a retrieval tier that knows them (another
    bundle): the LLM ranked its candidates from an empty "Watched:" list, a prompt training never made."""
    ids = [item.id for item in reference.catalog.items[:5]]
    scripted, address = scripted_retrieval(server_loop, ids)
    server = start_ranking(server_loop, bundle, address)
    try:
        response = stub_of(server).Recommend(ranking_pb2.RecommendRequest(user_id="no-such-user", k=5), timeout=60)
        assert response.cold_start and not response.degraded
        assert [i.item_id for i in response.items] == ids  # as retrieved: no LLM over an empty context
    finally:
        server_loop.run(server.drain())
        server_loop.run(scripted.stop(0))


def test_an_answer_sent_after_its_deadline_is_counted_deadline_exceeded_and_not_as_answered(
        server_loop, bundle, retrieval, reference):
    """The handler finished past the deadline (here the test-only injected delay): the client got DEADLINE_EXCEEDED,
    and the answer was also counted in ranking_answer_seconds and the stage latencies, as if it had been sent."""
    server = start_ranking(server_loop, bundle, retrieval.server.address, metrics_port=free_port())
    server.servicer._injected_delay_s = 1.0
    names = ('ranking_requests_total{code="DEADLINE_EXCEEDED"}', 'ranking_answer_seconds_count{answer="model"}',
             'ranking_stage_seconds_count{stage="total"}')
    try:
        before = [scrape_metrics(server.server.metrics_port).get(n, 0.0) for n in names]
        with pytest.raises(grpc.RpcError) as late:
            recommend(stub_of(server), timeout=0.5, user_id=some_users(reference, 1)[0], k=3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: scrape_metrics(server.server.metrics_port)[names[0]] == before[0] + 1, timeout=10,
                   what="the late answer counted")
        assert [scrape_metrics(server.server.metrics_port).get(n, 0.0) for n in names[1:]] == before[1:]
    finally:
        server_loop.run(server.drain())


def test_client_cancel_aborts_the_engine_request_and_frees_its_batch_slot(slow, slow_stub, reference):
    before = slow.engine.stats()
    call = slow_stub.Recommend.future(ranking_pb2.RecommendRequest(
        user_id=some_users(reference, 1)[0], k=20, num_candidates=26, mode=GENERATE), timeout=120)
    wait_until(lambda: slow.engine.stats().active == 1, what="the request to hold the batch slot")
    assert call.cancel()
    wait_until(lambda: slow.engine.stats().aborted == before.aborted + 1, what="the engine request's abort")
    assert slow.engine.stats().active == 0 and slow.engine.stats().completed == before.completed
    assert call.cancelled()
    after = recommend(slow_stub, user_id=some_users(reference, 1)[0], k=2, num_candidates=3)  # the slot is free again
    assert len(after.items) == 2 and not after.degraded


def test_a_request_the_engine_refuses_is_answered_degraded_not_blamed_on_the_caller(server_loop, bundle, retrieval):
    """The engine request is this server's own making (every caller field was checked before): an engine that
    refuses it (here a real hf engine whose KV slot is too short for any prompt) degrades the answer with the
    reason, as a failing engine does; it was INVALID_ARGUMENT, blaming the caller."""
    from palr.llm import load_causal_lm
    from ranking_server.engines.config import EngineConfig
    from ranking_server.engines.hf import HFEngine

    server = start_ranking(server_loop, bundle, retrieval.server.address)
    model, _ = load_causal_lm(Bundle.open(bundle).path("llm_merged"))
    short = HFEngine(model, EngineConfig(max_seq_len=16))
    served, server.servicer.engine = server.servicer.engine, short
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            user = next(u for u, h in server.planner.stored_histories.items() if h)
            response = recommend(ranking_pb2_grpc.RankingServiceStub(channel), user_id=user, k=3)
        assert response.degraded and response.degraded_reason == "engine_error" and len(response.items) == 3
    finally:
        server.servicer.engine = served
        short.close()
        server_loop.run(server.drain())


# -- operations ------------------------------------------------------------------------------------

def test_health_is_not_serving_until_the_model_is_loaded_and_warmed_up(server_loop, bundle, retrieval):
    server = start_ranking(server_loop, bundle, retrieval.server.address, warm=False)
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
            assert [check(""), check(SERVICE_NAME)] == [NOT_SERVING, NOT_SERVING]
            with pytest.raises(grpc.RpcError) as error:
                recommend(ranking_pb2_grpc.RankingServiceStub(channel), user_id="no-such-user", k=1)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:  # malformed: refused as such, not retried elsewhere
                recommend(ranking_pb2_grpc.RankingServiceStub(channel), user_id="no-such-user", k=0)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            server_loop.run(server.load(), timeout=120)
            assert server.engine.stats().completed == 2  # warmed up: one score, one generate request
            server_loop.run(server.server.set_serving())
            assert [check(""), check(SERVICE_NAME)] == [SERVING, SERVING]
            assert recommend(ranking_pb2_grpc.RankingServiceStub(channel), user_id="no-such-user", k=1).items
    finally:
        server_loop.run(server.drain())


def test_health_stays_not_serving_until_the_retrieval_tier_answers_through_the_servers_channel(server_loop, bundle,
                                                                                               caplog):
    """A rollout with a wrong --retrieval address (or certificate) turned SERVING and replaced working pods with
    ones that answered every call UNAVAILABLE: the load waits for the retrieval tier instead."""
    port = free_port()
    caplog.set_level("INFO", logger="ranking_server.server")
    ranking = server_loop.run(_constructed(lambda: RankingServer(RankingServerConfig(
        bundle=bundle, retrieval=f"127.0.0.1:{port}", port=0))))
    server_loop.run(ranking.start())
    loading = server_loop.submit(ranking.load())
    retrieval = None
    try:
        wait_until(lambda: "health stays NOT_SERVING until the retrieval tier at" in caplog.text, timeout=120,
                   what="the load waiting for the retrieval tier")
        assert not loading.done() and ranking.engine is not None  # the model is ready: only the retrieval tier lacks
        retrieval = start_retrieval(server_loop, bundle, port=port)
        loading.result(timeout=60)
        assert f"the retrieval tier at 127.0.0.1:{port} answers now" in caplog.text
        server_loop.run(ranking.server.set_serving())
        response = stub_of(ranking).Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=60)
        assert len(response.items) == 3 and not response.degraded
    finally:
        loading.cancel()
        server_loop.run(ranking.drain())
        if retrieval is not None:
            server_loop.run(retrieval.drain())


async def _constructed(make):
    return make()


def test_a_message_limit_below_the_largest_answer_stops_the_server_at_start_up(server_loop, bundle, retrieval,
                                                                              tmp_path):
    """The answer went over --max-message-bytes after all the work: gRPC refused to send it (RESOURCE_EXHAUSTED at
    the caller, a traceback in the log) while the server counted OK. The Retrieve it sends is not held to the
    caller-facing limit: a stored history goes in it in full (here one longer than that limit)."""
    from ranking_server.server import largest_answer_bytes
    from tests.fixtures.builds import copy_bundle

    copy = Bundle.open(copy_bundle(bundle, tmp_path / "bundle"))
    catalog = Catalog.load(copy.path("catalog"))
    largest = largest_answer_bytes(catalog, 20)
    with pytest.raises(ValueError, match=f"--max-message-bytes {largest - 1} is below the largest answer this "
                                         f"bundle can give \\({largest} bytes: 20 items"):
        start_ranking(server_loop, copy.root, retrieval.server.address, warm=False, max_message_bytes=largest - 1,
                      max_k=20)
    users = json.loads(copy.path("users").read_text())
    long_history = [item.id for item in catalog.items][:1500]  # ~9 KB of ids in the Retrieve, over `largest`
    users["users"]["long"] = {"history": long_history}
    copy.path("users").write_text(json.dumps(users))
    copy.add_artifact("users", "users.json", users=len(users["users"]))
    copy.save()
    assert retrieval_pb2.RetrieveRequest(user_id="long", history=long_history).ByteSize() > largest
    server = start_ranking(server_loop, copy.root, retrieval.server.address, max_message_bytes=largest, max_k=20)
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert len(recommend(stub, user_id="long", k=20, num_candidates=20).items) == 20
    finally:
        server_loop.run(server.drain())


def test_a_prompt_that_cannot_fit_max_seq_len_stops_the_server_at_start_up(server_loop, bundle, retrieval, ranking):
    """The warm-up runs the longest prompt the bundle can build: one token short of it in the KV slot and the
    server refuses to load, naming the flag (before, it loaded and failed the users with long titles with
    INVALID_ARGUMENT); at its length it loads, and that is the default. No real user's request needs more."""
    prompts = ranking.servicer.prompts
    n = ranking.planner.max_candidates
    longest = slot_tokens(prompts.longest_requests(n))
    served = ranking.engine.engine  # the hf engine behind the server's AnswerCache
    assert served.max_seq_len == -(-longest // SLOT_BLOCK) * SLOT_BLOCK  # the default (--max-seq-len 0)
    catalog = prompts.catalog
    for user in list(prompts.stored_profiles)[:20]:  # real users, their stored histories, the most popular items
        plan = ranking.planner.plan(ranking_pb2.RecommendRequest(user_id=user, k=n, num_candidates=n,
                                                                 mode=ranking_pb2.RANKING_MODE_GENERATE), user)
        candidates = [catalog.item(i) for i in catalog.popularity_order()[:n]]
        assert slot_tokens([prompts.engine_request(user, plan, candidates, [0.0] * n).request]) <= longest

    short = start_ranking(server_loop, bundle, retrieval.server.address, warm=False, max_seq_len=longest - 1)
    try:
        with pytest.raises(ValueError, match="does not fit the engine.*--max-seq-len"):
            server_loop.run(short.load(), timeout=120)
    finally:
        server_loop.run(short.drain())
    server = start_ranking(server_loop, bundle, retrieval.server.address, max_seq_len=longest)
    try:
        assert server.engine.stats().completed == 2
    finally:
        server_loop.run(server.drain())


def test_health_turns_not_serving_when_the_engine_fails_and_requests_degrade(server_loop, bundle, retrieval,
                                                                           reference):
    server = start_ranking(server_loop, bundle, retrieval.server.address, engine_check_s=0.05)
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status  # noqa: E731
            assert check() == SERVING
            user = some_users(reference, 1)[0]

            def broken(*args):  # fault injection: the engine loop itself fails (not one request)
                raise RuntimeError("scheduler bug")

            engine = server.engine.engine  # the hf engine behind the AnswerCache
            # the next step, and the rest of a step still running (the warm-up's: it admits arrivals between
            # passes, so under load the request could join it and be answered before the next step began)
            engine._step = engine._prefill = broken
            response = recommend(ranking_pb2_grpc.RankingServiceStub(channel), user_id=user, k=3)
            assert response.degraded and [i.item_id for i in response.items] == [
                item for item, _ in reference.ranking(SCORE, 3, 20, user_id=user, llm=False)]
            wait_until(lambda: check() == NOT_SERVING, timeout=10, what="health NOT_SERVING")
    finally:
        server_loop.run(server.drain())


def test_retrieval_over_mutual_tls_then_unavailable_naming_its_address_once_it_is_down(
        server_loop, bundle, reference, pki):
    secured = start_retrieval(server_loop, bundle, tls_cert=pki.server_cert, tls_key=pki.server_key,
                              tls_client_ca=pki.ca)
    server = start_ranking(server_loop, bundle, secured.server.address, retrieval_tls_ca=pki.ca,
                           retrieval_tls_cert=pki.client_cert, retrieval_tls_key=pki.client_key)
    try:
        stub = stub_of(server)
        assert len(recommend(stub, user_id=some_users(reference, 1)[0], k=3).items) == 3
        server_loop.run(secured.drain())
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as error:
            recommend(stub, user_id=some_users(reference, 1)[0], k=3)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"retrieval server {secured.server.address} unavailable" in error.value.details()
        assert time.perf_counter() - started < 10
    finally:
        server_loop.run(server.drain())


def test_metrics_show_stages_codes_cold_starts_and_engine_counters(ranking, stub, reference):
    ENGINE.attach(ranking.engine)  # one serving engine per process; these tests run several
    before = scrape_metrics(ranking.server.metrics_port)
    asked = dict(user_id=some_users(reference, 1)[0], k=3, num_candidates=7)  # 7: no other test asks for it
    first = recommend(stub, **asked)
    repeat = recommend(stub, **asked)  # an exact repeat: the engine's kept answer, no model time
    recommend(stub, **asked, mode=GENERATE)
    recommend(stub, user_id="no-such-user", k=3)
    with pytest.raises(grpc.RpcError):
        recommend(stub, user_id="no-such-user", k=0)
    with pytest.raises(grpc.RpcError):  # today's date on a 1998 dataset
        recommend(stub, user_id=asked["user_id"], k=3, as_of_unix_s=int(time.time()))
    # a refused call is counted after its status went out (context.abort sends it, then the handler unwinds)
    wait_until(lambda: scrape_metrics(ranking.server.metrics_port)["ranking_requests_in_flight"] == 0, timeout=10,
               what="the refused call counted")
    after = scrape_metrics(ranking.server.metrics_port)
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    assert delta('ranking_requests_total{code="OK"}') == 4
    assert delta('ranking_requests_total{code="INVALID_ARGUMENT"}') == 1
    assert delta('ranking_rejected_total{reason="invalid_argument"}') == 1
    assert delta('ranking_requests_total{code="OUT_OF_RANGE"}') == 1
    assert delta('ranking_rejected_total{reason="out_of_range"}') == 1  # not counted as a malformed request
    assert delta("ranking_cold_starts_total") == 1
    for stage in ("retrieval", "total"):
        assert delta(f'ranking_stage_seconds_count{{stage="{stage}"}}') == 4
    for stage in ("queue", "ranking"):  # the model's answers only: not the cold start, nor the repeat's kept answer
        assert delta(f'ranking_stage_seconds_count{{stage="{stage}"}}') == 2
    answers = {source: delta(f'ranking_answer_seconds_count{{answer="{source}"}}') for source in ANSWER_SOURCES}
    assert answers == {"model": 2, "repeat": 1, "cold_start": 1, "degraded": 0, "nothing_to_rank": 0}
    assert delta('ranking_engine_requests_total{outcome="completed"}') == 2  # the repeat did not run the model
    assert (delta('ranking_engine_answer_cache_total{event="hit"}'),
            delta('ranking_engine_answer_cache_total{event="miss"}')) == (1, 2)
    assert [(i.item_id, i.score) for i in repeat.items] == [(i.item_id, i.score) for i in first.items]
    # the generate call's k answer tokens: decoded, or written from the bias at generate logit weight 0 (no pass)
    answer_tokens = [delta(f'ranking_engine_tokens_total{{kind="{kind}"}}') for kind in ("generated", "written")]
    assert sum(answer_tokens) >= 3
    assert delta('ranking_engine_tokens_total{kind="cached"}') > 0  # the shared prefix's KV was reused
    assert after["ranking_engine_tokens_per_second"] > 0 and after["ranking_engine_healthy"] == 1
    # what the process ranks with, as its answers name it (the SASRec part comes with each answer's candidates)
    assert after[f'ranking_build_info{{models="{first.model_version.split(" ", 1)[1]}"}}'] == 1
    # each step ran at least one request: over the steps, the mean batch of the interval (the dashboard's)
    assert delta("ranking_engine_batch_slots_total") >= delta("ranking_engine_steps_total") > 0
    assert 'ranking_degraded_total{reason="deadline"}' in after  # every reason is exported from the start
    assert after["ranking_requests_in_flight"] == after["ranking_engine_active"] == 0


# -- fuzz --------------------------------------------------------------------------------------------

EXPECTED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def item_ids(reference) -> list[str]:
    return [item.id for item in reference.catalog.items[:200]]


def test_fuzz_random_requests_get_ok_or_invalid_argument_and_the_server_stays_healthy(ranking, stub, reference,
                                                                                        item_ids):
    @settings(max_examples=40, deadline=None)
    @given(data=st.data())
    def one_request(data):
        known, garbage = st.sampled_from(item_ids), st.text(max_size=8)
        request = ranking_pb2.RecommendRequest(  # each field mostly plausible, sometimes anything
            user_id=data.draw(st.one_of(st.sampled_from(some_users(reference, 20) + ["no-such-user", ""]),
                                        st.text(max_size=12))),
            history=data.draw(st.one_of(st.lists(known, max_size=12), st.lists(st.one_of(known, garbage), max_size=4))),
            k=data.draw(st.one_of(st.integers(1, 8), st.integers(-3, 30))),
            mode=data.draw(st.one_of(st.sampled_from([UNSPECIFIED, SCORE, GENERATE]), st.integers(-2, 4))),
            num_candidates=data.draw(st.one_of(st.sampled_from([0, 8, 20]), st.integers(-3, 30))),
            exclude=data.draw(st.one_of(st.lists(known, max_size=6), st.lists(st.one_of(known, garbage), max_size=3))),
            request_id=data.draw(st.one_of(st.just(""), st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
                                           st.text(max_size=20))))
        try:
            response = stub.Recommend(request, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        event(code.name)  # `pytest --hypothesis-show-statistics` shows the mix of outcomes
        assert code in EXPECTED_CODES, f"{code} for {request}"
        if code == grpc.StatusCode.OK:
            assert len({i.item_id for i in response.items}) == len(response.items) <= request.k
            assert not set(request.exclude) & {i.item_id for i in response.items}

    one_request()
    # after every example: still SERVING, and it answers
    with grpc.insecure_channel(ranking.server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == SERVING and ranking.engine.check_health()
    assert len(recommend(stub, user_id=some_users(reference, 1)[0], k=4).items) == 4


def test_a_ranker_fit_on_other_inputs_than_the_bundle_holds_is_warned_about(server_loop, tiny_llm_bundle, tmp_path,
                                                                            caplog):
    """A step rerun alone (here profiles, rebuilt with a change) left the ranker's fits on the old inputs: served
    without a word. The ranker records the versions it was fit on; the server names the ones that moved."""
    from palr.ranking import stale_ranker_inputs

    root = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, root, symlinks=True)
    bundle = Bundle.open(root)
    ranker = json.loads(bundle.path("ranker").read_text())
    assert set(ranker["fit_on"]) == {"sasrec_onnx", "collab", "trends", "profiles"}
    assert stale_ranker_inputs(bundle, ranker) == []
    fit_on = bundle.version("profiles")
    path = bundle.path("profiles")
    profiles = json.loads(path.read_text())
    path.write_text(json.dumps(profiles | {"profiles": {u: p + " (edited)" for u, p in profiles["profiles"].items()}}))
    entry = bundle.artifact("profiles")
    bundle.add_artifact("profiles", entry["path"], **{k: v for k, v in entry.items()
                                                     if k not in ("path", "sha256", "files", "created_at")})
    bundle.save()
    stale = stale_ranker_inputs(Bundle.open(root), ranker)
    assert stale == [f"profiles fit on {fit_on}, the bundle holds {Bundle.open(root).version('profiles')}"]
    with caplog.at_level(logging.WARNING, logger="ranking_server.server"):
        server = start_ranking(server_loop, root, "127.0.0.1:1", warm=False)
    server_loop.run(server.drain())
    assert f"the ranker was fit on other inputs than the bundle holds ({stale[0]})" in caplog.text


def test_load_warns_of_profiles_that_serving_cannot_match_to_training(tiny_llm_bundle, tmp_path, caplog):
    """A ranker trained on LLM profiles gets statistics profiles for histories sent with a request; a stored
    user without a stored profile gets an empty one (the evaluation refuses it): both are said at load."""
    from transformers import AutoTokenizer

    from ranking_server.prompts import PromptBuilder

    root = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, root, symlinks=True)
    bundle = Bundle.open(root)
    path = bundle.path("profiles")
    profiles = json.loads(path.read_text())
    users = sorted(profiles["profiles"])
    del profiles["profiles"][users[0]]
    path.write_text(json.dumps({**profiles, "method": "llm"}))
    tokenizer = AutoTokenizer.from_pretrained(bundle.path("llm_merged"))
    ranker = json.loads(bundle.path("ranker").read_text()) | {"profile_method": "llm"}
    with caplog.at_level(logging.WARNING, logger="ranking_server.prompts"):
        builder = PromptBuilder.for_bundle(bundle, tokenizer, ranker, Catalog.load(bundle.path("catalog")))
        assert builder.warn_unprofiled(users) == 1 and builder.warn_unprofiled(users[1:]) == 0
    assert "trained on llm profiles: stored users get theirs" in caplog.text
    assert f"1 stored users have no profile in profiles.json (e.g. {users[0]})" in caplog.text
    # the fix names this bundle and its profiles' method (the defaults would rebuild ./bundle, with stats profiles)
    assert f"python -m compile profiles --bundle {root} --method llm --force" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ranking_server.prompts"):  # profiles of another kind than trained
        PromptBuilder.for_bundle(bundle, tokenizer, ranker | {"profile_method": "stats"},
                                 Catalog.load(bundle.path("catalog")))
    assert "trained on stats profiles and the bundle's are llm" in caplog.text


@pytest.mark.parametrize("field_name, value", [("default_deadline_ms", float("inf")), ("default_deadline_ms", 0.0),
                                               ("degrade_reserve_ms", float("nan")), ("engine_check_s", float("nan")),
                                               ("engine_check_s", float("inf"))])
def test_deadline_and_health_check_timings_must_be_finite(field_name, value):
    """inf is an already-expired timeout to gRPC (every request without a deadline would fail), nan makes
    asyncio.wait_for time out at once and asyncio.sleep never wake (no engine health check)."""
    with pytest.raises(ValueError, match=f"{field_name} must be a finite number"):
        RankingServerConfig(**{field_name: value})


@pytest.mark.parametrize("target", ["retrieval", "dns:///retrieval-headless.recsys.svc.cluster.local", "host:",
                                    "host:99999", "::1", "dns:///::1", "ipv4:127.0.0.1:1,127.0.0.1"])
def test_a_retrieval_target_without_its_port_is_refused(target):
    """"dns:///NAME" without a port passed the old check (a colon in it) and gRPC dialled port 443."""
    with pytest.raises(ValueError, match="--retrieval must name the retrieval server and its port"):
        RankingServerConfig(retrieval=target)
    for good in ("dns:///retrieval-headless.recsys.svc.cluster.local:50051", "[::1]:50051", "127.0.0.1:1",
                 "unix:/run/retrieval.sock", "xds:///retrieval", "ipv4:127.0.0.1:1,127.0.0.1:2",
                 "ipv6:[::1]:50051"):
        assert RankingServerConfig(retrieval=good).retrieval == good


def test_a_default_deadline_meant_as_none_is_refused():
    """1e13 ms ('no deadline'): gRPC's deadline arithmetic overflowed and every call without a deadline failed at
    once with DEADLINE_EXCEEDED."""
    with pytest.raises(ValueError, match="--default-deadline-ms 1e\\+13 is over a day"):
        RankingServerConfig(default_deadline_ms=1e13)
    RankingServerConfig(default_deadline_ms=86_400_000.0)


def test_a_degrade_reserve_as_long_as_the_default_deadline_is_refused():
    """Every request without a deadline would be answered degraded, the LLM never asked."""
    with pytest.raises(ValueError, match="--degrade-reserve-ms 30000.0 must be below --default-deadline-ms 30000.0"):
        RankingServerConfig(degrade_reserve_ms=30_000.0)
    RankingServerConfig(degrade_reserve_ms=29_999.0)


def test_a_max_queue_the_in_process_engines_cannot_run_with_is_refused_before_the_model_loads():
    """--max-queue 0 was refused only once the weights had loaded (HFEngine); TensorRT-LLM's 0 means its slots only."""
    with pytest.raises(ValueError, match="--max-queue must be >= 1 for the hf engine"):
        RankingServerConfig(max_queue=0)
    with pytest.raises(ValueError, match="for the ortgenai engine"):
        RankingServerConfig(max_queue=0, engine="ortgenai")
    assert RankingServerConfig(max_queue=0, engine="trtllm", device="cuda").max_queue == 0


def test_only_a_retrieval_refusal_marked_queue_full_counts_as_retrieval_overload():
    """RESOURCE_EXHAUSTED from the retrieval tier is a full queue when marked so, else a message over its size limit:
    a configuration to mend, counted with the other retrieval errors."""
    from palr.serving.errors import RequestError
    from ranking_server.servicer import retrieval_rejection

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retrieval_rejection(RequestError(exhausted, "queue full", (QUEUE_FULL,))) == "retrieval_queue_full"
    assert retrieval_rejection(RequestError(exhausted, "message larger than max")) == "retrieval_error"
    assert retrieval_rejection(RequestError(grpc.StatusCode.UNAVAILABLE, "down")) == "retrieval_unavailable"
    assert retrieval_rejection(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "late")) == "deadline"
    assert retrieval_rejection(RequestError(grpc.StatusCode.INTERNAL, "tiers disagree")) == "retrieval_error"
