"""The retrieval server in-process on 127.0.0.1:0 with real gRPC clients and the real tiny SASRec
bundle: streaming, equality with a direct ONNX Runtime call, every error code, cold start,
truncation, concurrency, health, reflection, metrics, message limits and mutual TLS."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from loadtest.servers import free_port, scrape_metrics
from tests.fixtures.serving import wait_until
from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.serving.channels import open_channel
from palr.serving.errors import QUEUE_FULL
from palr.serving.server import NOT_SERVING, SERVING
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.server import RetrievalServer
from retrieval_server.servicer import SERVICE_NAME

DEFAULT_CHUNK = 10


@dataclass
class BundleFacts:
    """What the tests compare the server against, read straight from the bundle files."""

    bundle: Bundle
    catalog: Catalog
    histories: dict[str, list[str]]  # users.json
    session: ort.InferenceSession
    max_len: int
    top_k: int

    def reference(self, history: list[str], exclude: list[str], k: int) -> list[tuple[str, float]]:
        """The contract, by hand: last max_len items left-padded, whole history + exclude masked."""
        recent = self.catalog.indices(history)[-self.max_len:]
        history_tensor = np.zeros((1, self.max_len), dtype=np.int64)  # [1, max_len]
        history_tensor[0, self.max_len - len(recent):] = recent
        exclude_tensor = np.array([self.catalog.indices(history + exclude) or [0]], dtype=np.int64)  # [1, n]
        scores, indices = self.session.run(["scores", "indices"], {"history": history_tensor, "exclude": exclude_tensor})
        return [(self.catalog.item(int(i)).id, float(s)) for s, i in zip(scores[0, :k], indices[0, :k]) if np.isfinite(s)]


@pytest.fixture(scope="module")
def facts(tiny_bundle) -> BundleFacts:
    bundle = Bundle.open(tiny_bundle)
    meta = bundle.artifact("sasrec_onnx")
    histories = {u: e["history"] for u, e in json.loads(bundle.path("users").read_text())["users"].items()}
    return BundleFacts(bundle=bundle, catalog=Catalog.load(bundle.path("catalog")), histories=histories,
                       session=ort.InferenceSession(str(bundle.path("sasrec_onnx")), providers=["CPUExecutionProvider"]),
                       max_len=int(meta["max_len"]), top_k=int(meta["top_k"]))


def start(server_loop, config: RetrievalServerConfig, warm: bool = True) -> RetrievalServer:
    async def make() -> RetrievalServer:
        server = RetrievalServer(config)
        await server.start()
        if warm:
            await server.load()
            await server.server.set_serving()
        return server
    return server_loop.run(make())


@pytest.fixture(scope="module")
def server(server_loop, tiny_bundle):
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, chunk_size=DEFAULT_CHUNK,
                                                      metrics_port=free_port(), max_message_bytes=64 * 1024))
    yield server
    server_loop.run(server.drain())


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.server.address) as channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)


def retrieve(stub, **fields) -> list[retrieval_pb2.RetrieveResponse]:
    return list(stub.Retrieve(retrieval_pb2.RetrieveRequest(**fields), timeout=30))


def ranking(messages) -> list[tuple[str, float]]:
    return [(c.item_id, c.score) for m in messages for c in m.candidates]


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]], atol: float = 1e-4):
    """Same items in the same order with the same scores; neighbours whose scores tie within
    `atol` may swap (different batch compositions round differently)."""
    assert len(got) == len(expected)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=atol)
    for (got_id, got_score), (want_id, want_score) in zip(got, expected):
        if got_id != want_id:
            tied = [i for i, s in expected if abs(s - got_score) <= atol]
            assert got_id in tied, f"{got_id} ({got_score}) where {want_id} ({want_score}) was expected"


def some_users(facts: BundleFacts, n: int) -> list[str]:
    return [u for u, h in facts.histories.items() if h][:n]


# -- streaming -------------------------------------------------------------------------------------

def test_stream_is_score_ordered_in_chunks_with_global_ranks_and_model_version(stub, facts):
    user = some_users(facts, 1)[0]
    k = facts.top_k
    messages = retrieve(stub, user_id=user, k=k, chunk_size=7)
    assert [len(m.candidates) for m in messages] == [7] * (k // 7) + ([k % 7] if k % 7 else [])
    candidates = [c for m in messages for c in m.candidates]
    assert [c.rank for c in candidates] == list(range(k))
    scores = [c.score for c in candidates]
    assert all(a >= b for a, b in zip(scores, scores[1:]))
    assert {m.model_version for m in messages} == {facts.bundle.version("sasrec_onnx")}
    assert not any(m.cold_start for m in messages)

    default_chunks = retrieve(stub, user_id=user, k=k)  # chunk_size 0 → the server's default
    assert [len(m.candidates) for m in default_chunks] == [DEFAULT_CHUNK] * (k // DEFAULT_CHUNK) + (
        [k % DEFAULT_CHUNK] if k % DEFAULT_CHUNK else [])
    assert ranking(default_chunks) == ranking(messages)


def test_stored_history_results_equal_a_direct_onnx_runtime_call(stub, facts):
    for user in some_users(facts, 5):
        messages = retrieve(stub, user_id=user, k=20)
        assert_same_ranking(ranking(messages), facts.reference(facts.histories[user], [], 20), atol=1e-5)
        assert messages[0].history_length == min(len(facts.histories[user]), facts.max_len)
        assert not set(facts.histories[user]) & {c for c, _ in ranking(messages)}


def test_explicit_history_wins_over_the_stored_one_and_exclude_is_left_out(stub, facts):
    user = some_users(facts, 1)[0]
    history = [item.id for item in facts.catalog.items[:5]]
    unfiltered = retrieve(stub, history=history, k=10)
    exclude = [item_id for item_id, _ in ranking(unfiltered)[:3]]
    messages = retrieve(stub, user_id=user, history=history, exclude=exclude, k=10)
    assert_same_ranking(ranking(messages), facts.reference(history, exclude, 10), atol=1e-5)
    assert not set(exclude) & {c for c, _ in ranking(messages)}
    assert ranking(messages) != ranking(retrieve(stub, user_id=user, k=10))
    assert messages[0].history_length == 5 and not messages[0].history_truncated


def test_long_history_reads_the_most_recent_max_len_items_but_excludes_all_of_them(stub, facts):
    history = [item.id for item in facts.catalog.items[:facts.max_len + 20]]
    messages = retrieve(stub, history=history, k=facts.top_k)
    assert all(m.history_truncated and m.history_length == facts.max_len for m in messages)
    returned = {c for c, _ in ranking(messages)}
    assert not returned & set(history)  # the 20 oldest too, though the model never read them
    assert_same_ranking(ranking(messages), facts.reference(history, [], facts.top_k), atol=1e-5)


def test_unknown_user_without_history_gets_popularity_flagged_cold_start(stub, facts):
    popular = [facts.catalog.item(i).id for i in facts.catalog.popularity_order()]
    messages = retrieve(stub, user_id="no-such-user", k=8, exclude=popular[:2])
    assert all(m.cold_start for m in messages)
    assert [c for c, _ in ranking(messages)] == popular[2:10]
    scores = [s for _, s in ranking(messages)]
    assert all(a >= b for a, b in zip(scores, scores[1:])) and scores[0] > 0
    assert messages[0].history_length == 0 and messages[0].model_version


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    ({"k": 0}, "k "),
    ({"k": -3}, "k "),
    ({"k": 10_000}, "k "),
    ({"k": 5, "history": ["no-such-item", "nor-this"]}, "history"),
    ({"k": 5, "exclude": ["no-such-item"]}, "exclude"),
    ({"k": 5, "chunk_size": -1}, "chunk_size"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(stub, facts, fields, named):
    fields = {"user_id": some_users(facts, 1)[0], **fields}
    with pytest.raises(grpc.RpcError) as error:
        retrieve(stub, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(named)
    for unknown in [i for i in fields.get("history", []) + fields.get("exclude", []) if i not in facts.catalog]:
        assert repr(unknown) in error.value.details()
    assert retrieve(stub, user_id="no-such-user", k=1)  # and the server goes on serving


def test_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(stub, facts):
    too_many = [item.id for item in facts.catalog.items] * 40  # well over the 64 KiB limit
    with pytest.raises(grpc.RpcError) as error:
        retrieve(stub, user_id="no-such-user", k=5, exclude=too_many)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(ranking(retrieve(stub, user_id="no-such-user", k=5))) == 5


def test_a_chunk_over_the_message_limit_goes_out_in_smaller_messages(server_loop, tiny_bundle, facts):
    """chunk_size has no upper bound: a chunk over --max-message-bytes failed the call with RESOURCE_EXHAUSTED
    after it had started, and the server logged a traceback and counted INTERNAL."""
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_message_bytes=400))
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            user, k = some_users(facts, 1)[0], facts.top_k
            messages = retrieve(stub, user_id=user, k=k, chunk_size=k)
            assert len(messages) > 1 and all(m.ByteSize() <= 400 for m in messages)
            assert [c.rank for m in messages for c in m.candidates] == list(range(k))
            assert ranking(messages) == ranking(retrieve(stub, user_id=user, k=k, chunk_size=1))
    finally:
        server_loop.run(server.drain())


def test_a_message_limit_below_one_candidates_message_is_refused_at_start(server_loop, tiny_bundle):
    """Below it, an answer whose candidate has a long id failed midway with RESOURCE_EXHAUSTED, after its first
    messages had gone out (the call committed: the caller could not retry it elsewhere)."""
    with pytest.raises(ValueError, match="--max-message-bytes 16 is below the biggest one-candidate message"):
        start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_message_bytes=16), warm=False)


# -- concurrency -----------------------------------------------------------------------------------

def concurrent_rankings(address: str, requests: list[dict]) -> list[list[tuple[str, float]]]:
    async def one(stub, fields):
        return ranking([m async for m in stub.Retrieve(retrieval_pb2.RetrieveRequest(**fields), timeout=60)])

    async def all_of_them():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            return await asyncio.gather(*(one(stub, fields) for fields in requests))
    return asyncio.run(all_of_them())


def test_fifty_concurrent_clients_each_get_their_own_correct_answer(server, facts):
    users = some_users(facts, 50)
    requests = [{"user_id": u, "k": 10 + i % 7, "request_id": f"concurrent-{i}"} for i, u in enumerate(users)]
    requests += [{"user_id": "no-such-user", "k": 5}] * (50 - len(users))
    got = concurrent_rankings(server.server.address, requests)
    for fields, ranked in zip(requests, got):
        history = facts.histories.get(fields["user_id"], [])
        if history:
            assert_same_ranking(ranked, facts.reference(history, [], fields["k"]))
        else:
            assert len(ranked) == fields["k"]


def test_concurrent_requests_share_ort_calls_and_each_gets_its_own_answer(server_loop, tiny_bundle, facts):
    """With a batch window, concurrent Retrieves go to ONNX Runtime together (fewer calls than requests),
    histories of different lengths left-padded and exclude lists of different lengths padded in one batch, and
    each caller still gets exactly its own ranking."""
    batched = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_batch_size=16,
                                                       batch_window_ms=500))
    count = lambda: REGISTRY.get_sample_value("retrieval_ort_batch_size_count")  # noqa: E731
    total = lambda: REGISTRY.get_sample_value("retrieval_ort_batch_size_sum")  # noqa: E731
    try:
        users = some_users(facts, 12)
        excludes = [facts.histories[users[(i + 1) % len(users)]][: i % 4] for i in range(len(users))]
        calls, requests = count(), total()
        got = concurrent_rankings(batched.server.address, [{"user_id": u, "k": 12, "exclude": x}
                                                           for u, x in zip(users, excludes)])
        calls, requests = count() - calls, total() - requests
        for user, exclude, ranked in zip(users, excludes, got):
            assert_same_ranking(ranked, facts.reference(facts.histories[user], exclude, 12))
        assert requests == len(users) and calls < requests, (calls, requests)
    finally:
        server_loop.run(batched.drain())


def test_a_batch_window_longer_than_a_callers_deadline_still_answers_it(server_loop, tiny_bundle, facts):
    """--batch-window-ms 20000 and a lone caller with a 3 s deadline: the window closes in time for its call (it
    waited the whole window and the caller got DEADLINE_EXCEEDED)."""
    windowed = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_batch_size=16,
                                                        batch_window_ms=20_000))
    try:
        user = some_users(facts, 1)[0]
        with grpc.insecure_channel(windowed.server.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            ranked = ranking(stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, k=5), timeout=3))
        assert_same_ranking(ranked, facts.reference(facts.histories[user], [], 5))
    finally:
        server_loop.run(windowed.drain())


def test_one_ort_call_per_request_gives_the_same_answers(server_loop, tiny_bundle, facts):
    direct = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_batch_size=1, workers=2))
    try:
        users = some_users(facts, 12)
        got = concurrent_rankings(direct.server.address, [{"user_id": u, "k": 15} for u in users])
        for user, ranked in zip(users, got):
            assert_same_ranking(ranked, facts.reference(facts.histories[user], [], 15))
    finally:
        server_loop.run(direct.drain())


# -- operations ------------------------------------------------------------------------------------

def test_health_is_not_serving_and_retrieve_unavailable_until_the_model_is_warm(server_loop, tiny_bundle):
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0), warm=False)
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
            assert [check(""), check(SERVICE_NAME)] == [NOT_SERVING, NOT_SERVING]
            with pytest.raises(grpc.RpcError) as error:
                retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id="no-such-user", k=3)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as error:  # malformed: refused as such, not retried elsewhere
                retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id="no-such-user", k=0)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            server_loop.run(server.load())
            server_loop.run(server.server.set_serving())
            assert [check(""), check(SERVICE_NAME)] == [SERVING, SERVING]
            assert retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id="no-such-user", k=3)
    finally:
        server_loop.run(server.drain())


def test_a_dead_micro_batcher_turns_health_not_serving_and_requests_unavailable(server_loop, tiny_bundle, facts):
    """A bug inside the micro-batcher's loop ends it and every later request would fail: health says so, so the
    callers that watch it move away (it stayed SERVING before), and requests get UNAVAILABLE, which the callers'
    channels retry on another replica (they got INTERNAL, which none retries)."""
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0))
    try:
        async def broken_next_batch():
            raise KeyError("a bug in the loop")

        with grpc.insecure_channel(server.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status  # noqa: E731
            assert check() == SERVING
            server.runner._next_batch = broken_next_batch  # the loop reads it again after the batch it is waiting for
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            assert retrieve(stub, user_id=some_users(facts, 1)[0], k=3)  # a user with a history: the model runs
            wait_until(lambda: check() == NOT_SERVING, what="health NOT_SERVING with a dead micro-batcher")
            with pytest.raises(grpc.RpcError) as refused:
                retrieve(stub, user_id=some_users(facts, 1)[0], k=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "micro-batcher stopped" in refused.value.details()
    finally:
        server_loop.run(server.drain())


@pytest.mark.parametrize("batch_size", [1, 8], ids=["direct", "micro-batched"])
def test_a_model_failing_call_after_call_turns_health_not_serving(server_loop, tiny_bundle, facts, batch_size):
    """ORT failing every call (an allocation at the pod's memory limit): each caller got INTERNAL while health stayed
    SERVING, so every caller kept sending this replica its share. A failure between successes is the request's."""
    from retrieval_server.server import MAX_FAILED_CALLS

    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_batch_size=batch_size))
    model_retrieve = server.model.retrieve
    failing = {"on": False}

    def retrieve_or_fail(queries):
        if failing["on"]:
            raise RuntimeError("onnxruntime: failed to allocate memory")
        return model_retrieve(queries)

    server.model.retrieve = retrieve_or_fail
    try:
        with grpc.insecure_channel(server.server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status  # noqa: E731
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            user = some_users(facts, 1)[0]

            def failed_calls(n, code=grpc.StatusCode.INTERNAL):
                failing["on"] = True
                for _ in range(n):
                    with pytest.raises(grpc.RpcError) as failed:
                        retrieve(stub, user_id=user, k=3)
                    assert failed.value.code() == code, failed.value.details()
                failing["on"] = False

            failed_calls(MAX_FAILED_CALLS - 1)
            assert retrieve(stub, user_id=user, k=3)  # a success: the count starts again
            failed_calls(MAX_FAILED_CALLS - 1)
            assert check() == SERVING
            # the model is what is broken: UNAVAILABLE, which callers retry on another replica (INTERNAL: none does)
            failed_calls(2, grpc.StatusCode.UNAVAILABLE)
            wait_until(lambda: check() == NOT_SERVING, what="health NOT_SERVING after calls failing in a row")
    finally:
        server_loop.run(server.drain())


def test_drain_delay_keeps_answering_while_health_says_not_serving_then_refuses(server_loop, tiny_bundle):
    """Behind a load balancer that polls health, new RPCs keep coming for a moment after SIGTERM: with
    --drain-delay they are answered while health already says NOT_SERVING; after it, refused."""
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, drain_delay=60, grace=1))
    with grpc.insecure_channel(server.server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        drained = server_loop.submit(server.drain())
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == NOT_SERVING,
                   what="health NOT_SERVING once the stop began")  # the delay is running (60 s: no race with it)
        assert retrieve(stub, user_id="no-such-user", k=3)  # still answered
        assert not drained.done()
        # a second stop request (an impatient operator's second SIGTERM) skips the rest of the delay
        server_loop.loop.call_soon_threadsafe(server.server.request_stop)  # what the signal handler calls
        drained.result(30)  # well before the 60 s delay
        with pytest.raises(grpc.RpcError) as error:
            retrieve(stub, user_id="no-such-user", k=3)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(database.get_services())
        method = DescriptorPool(database).FindServiceByName(SERVICE_NAME).methods_by_name["Retrieve"]
        assert method.server_streaming and method.output_type.full_name == "recsys.v1.RetrieveResponse"


def test_metrics_endpoint_counts_requests_by_code_and_ort_batches(server, stub, facts):
    def scrape() -> dict[str, float]:
        return scrape_metrics(server.server.metrics_port)

    before = scrape()
    retrieve(stub, user_id=some_users(facts, 1)[0], k=5)
    with pytest.raises(grpc.RpcError):
        retrieve(stub, user_id="x", k=0)
    # a refused call is counted after its status went out (context.abort sends it, then the handler unwinds)
    wait_until(lambda: scrape()["retrieval_requests_in_flight"] == 0, timeout=10, what="the refused call counted")
    after = scrape()
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    assert delta('retrieval_requests_total{code="OK"}') == 1
    assert delta('retrieval_requests_total{code="INVALID_ARGUMENT"}') == 1
    assert delta("retrieval_ort_batch_size_count") == 1
    # latency by code: the refusal (microseconds) is not mixed into the answered calls' histogram
    assert delta('retrieval_request_seconds_count{code="OK"}') == 1
    assert delta('retrieval_request_seconds_count{code="INVALID_ARGUMENT"}') == 1
    assert after["retrieval_requests_in_flight"] == 0


def test_streams_the_client_cancels_mid_write_are_never_counted_internal(server, stub, facts):
    """A client cancelling while the handler waits in context.write (the ranking server closes a Retrieve stream
    early) could fail that write with gRPC's ExecuteBatchError before the handler was cancelled: counted INTERNAL,
    logged with a traceback, as if the server had a bug."""
    def scrape() -> dict[str, float]:
        return scrape_metrics(server.server.metrics_port)

    before = scrape()
    user = some_users(facts, 1)[0]
    for i in range(30):
        call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, k=facts.top_k, chunk_size=1,
                                                           request_id=f"cancel-{i}"), timeout=30)
        next(call)  # the first candidate arrived: the handler is writing the others
        call.cancel()
    wait_until(lambda: scrape()["retrieval_requests_in_flight"] == 0, timeout=30, what="the cancelled calls counted")
    after = scrape()
    delta = lambda code: after.get(f'retrieval_requests_total{{code="{code}"}}', 0.0) - before.get(  # noqa: E731
        f'retrieval_requests_total{{code="{code}"}}', 0.0)
    assert delta("INTERNAL") == 0
    assert delta("CANCELLED") + delta("OK") == 30  # OK: the whole answer was written before the cancel came


def test_a_failing_ort_call_is_counted_as_an_ort_call_and_answered_internal(server_loop, tiny_bundle, facts):
    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, metrics_port=free_port()))
    try:
        def failing(queries):
            raise RuntimeError("ORT failed")

        server.model.retrieve = failing
        before = scrape_metrics(server.server.metrics_port)
        with grpc.insecure_channel(server.server.address) as channel, pytest.raises(grpc.RpcError) as failed:
            retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id=some_users(facts, 1)[0], k=3)
        after = scrape_metrics(server.server.metrics_port)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert after["retrieval_ort_batch_size_count"] - before.get("retrieval_ort_batch_size_count", 0.0) == 1
        assert after["retrieval_ort_seconds_count"] - before.get("retrieval_ort_seconds_count", 0.0) == 1
        assert after[f'retrieval_build_info{{model="{server.servicer.model_version}"}}'] == 1  # what it retrieves with
    finally:
        server_loop.run(server.drain())


def test_mutual_tls_retrieve_needs_a_client_certificate(server_loop, tiny_bundle, pki):
    secured = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, tls_cert=pki.server_cert,
                                                       tls_key=pki.server_key, tls_client_ca=pki.ca))
    try:
        with open_channel(secured.server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key,
                          aio=False) as channel:
            assert retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id="no-such-user", k=3)
        with open_channel(secured.server.address, tls_ca=pki.ca, aio=False) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                list(retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                    retrieval_pb2.RetrieveRequest(user_id="no-such-user", k=3), timeout=3))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server_loop.run(secured.drain())


def test_random_requests_get_answers_or_invalid_argument_never_a_crash(stub, facts):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    known = st.sampled_from([item.id for item in facts.catalog.items])
    item_ids = st.lists(st.one_of(known, known, st.text(max_size=6)), max_size=facts.max_len + 5)
    requests = st.builds(retrieval_pb2.RetrieveRequest, user_id=st.one_of(st.sampled_from(list(facts.histories)[:20]),
                                                                           st.text(max_size=8)),
                         history=item_ids, k=st.integers(-5, facts.top_k + 5), exclude=item_ids,
                         chunk_size=st.integers(-2, 30), request_id=st.text(max_size=10))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(request=requests)
    def check(request):
        try:
            messages = list(stub.Retrieve(request, timeout=30))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            return
        ranks = [c.rank for m in messages for c in m.candidates]
        assert ranks == list(range(len(ranks))) and len(ranks) <= request.k
        assert not {c.item_id for m in messages for c in m.candidates} & set(request.exclude)

    check()
    assert retrieve(stub, user_id="no-such-user", k=1)


def test_requests_whose_deadline_passes_in_the_queue_are_counted_as_deadline_exceeded(server_loop, tiny_bundle, facts):
    """Three requests with a 0.2 s deadline wait behind an ORT call held on purpose: the callers get
    DEADLINE_EXCEEDED, and the server counts them so, not as cancelled by the client."""
    import threading

    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, metrics_port=free_port()))
    entered, release = threading.Event(), threading.Event()
    try:
        run_batch = server.runner.run_batch
        server.runner.run_batch = lambda items: (entered.set(), release.wait(30), run_batch(items))[2]
        before = scrape_metrics(server.server.metrics_port)
        delta = lambda name: scrape_metrics(server.server.metrics_port).get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
        user = some_users(facts, 1)[0]
        with grpc.insecure_channel(server.server.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            held = threading.Thread(target=lambda: list(stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, k=3),
                                                                      timeout=30)))
            held.start()
            assert entered.wait(30), "the held call never reached the model"
            codes = []
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as error:
                    list(stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, k=3), timeout=0.2))
                codes.append(error.value.code())
            release.set()
            held.join()
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        # the server counts a call once its handler has ended, after the caller has given up
        wait_until(lambda: delta('retrieval_requests_total{code="DEADLINE_EXCEEDED"}') == 3,
                   what="three calls counted DEADLINE_EXCEEDED")
        assert delta('retrieval_requests_total{code="CANCELLED"}') == 0
    finally:
        release.set()
        server_loop.run(server.drain())


def test_over_max_queue_is_resource_exhausted_at_once_and_the_server_keeps_serving(server_loop, tiny_bundle, facts):
    """--max-queue 2: while two requests wait for an ORT call held on purpose, a third is refused with
    RESOURCE_EXHAUSTED at once (the held call has not returned when the refusal comes) instead of waiting behind
    them; the waiting ones are answered, and so is the next. `retrieval_model_waiting` shows the queue."""
    import threading
    import time

    server = start(server_loop, RetrievalServerConfig(bundle=tiny_bundle, port=0, max_queue=2))
    release = threading.Event()
    try:
        run_batch = server.runner.run_batch
        server.runner.run_batch = lambda items: (release.wait(30), run_batch(items))[1]
        user = some_users(facts, 1)[0]
        with grpc.insecure_channel(server.server.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            request = retrieval_pb2.RetrieveRequest(user_id=user, k=3)
            ask = lambda: list(stub.Retrieve(request, timeout=30))  # noqa: E731
            answers = []
            waiting = [threading.Thread(target=lambda: answers.append(ask())) for _ in range(2)]
            for thread in waiting:
                thread.start()
            waiting_now = lambda: REGISTRY.get_sample_value("retrieval_model_waiting")  # noqa: E731
            wait_until(lambda: waiting_now() == 2, what="both requests waiting for the model, in the gauge")
            with pytest.raises(grpc.RpcError) as error:  # the model is held until after this: waiting behind it
                list(stub.Retrieve(request, timeout=5))  # would end in DEADLINE_EXCEEDED, not a refusal
            release.set()
            for thread in waiting:
                thread.join()
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue 2" in error.value.details()
            assert QUEUE_FULL in error.value.trailing_metadata()  # callers may send it to another replica
            assert len(answers) == 2 and all(answers) and ask()
            assert waiting_now() == 0
    finally:
        release.set()
        server_loop.run(server.drain())


@pytest.mark.parametrize("window", [-1.0, float("nan"), float("inf")])
def test_a_batch_window_that_is_not_a_finite_wait_is_refused(window):
    """An infinite window would hold every request outside a full batch until its deadline."""
    with pytest.raises(ValueError, match="batch_window_ms must be a finite number"):
        RetrievalServerConfig(batch_window_ms=window)


def test_a_model_record_without_its_export_shape_is_a_bundle_error_not_a_traceback(tiny_bundle, tmp_path):
    from palr.bundle import BundleError
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["artifacts"]["sasrec_onnx"]["top_k"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no 'top_k' in the manifest"):
        RetrievalServer(RetrievalServerConfig(bundle=bundle))


def test_a_model_of_another_catalog_is_refused_at_start(tiny_bundle, tmp_path):
    """Its item count differs from catalog.json's: every batch holding an item past the model's table failed in ORT
    (the other requests batched with it too), and a larger model indexed past the catalog's ids."""
    from palr.bundle import BundleError
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    items = manifest["artifacts"]["sasrec_onnx"]["num_items"]
    manifest["artifacts"]["sasrec_onnx"]["num_items"] = items - 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"scores {items - 1} items, catalog.json has {items}"):
        RetrievalServer(RetrievalServerConfig(bundle=bundle))


def test_a_model_this_onnx_runtime_cannot_load_is_a_bundle_error_naming_the_file_and_version(tiny_bundle, tmp_path):
    """An export with an opset newer than the installed ONNX Runtime: ORT's own exception classes derive from
    Exception alone, so the entry point printed a traceback instead of `cannot serve: ...`."""
    import onnx
    import onnxruntime as ort

    from palr.bundle import Bundle, BundleError
    from palr.sasrec_onnx import ARTIFACT, SasrecOnnx

    bundle = Bundle.open(tiny_bundle)
    model = onnx.load(str(bundle.path(ARTIFACT)))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99  # from a future exporter
    newer = tmp_path / "sasrec.onnx"
    onnx.save(model, str(newer))
    meta = SasrecOnnx.manifest_record(bundle)
    with pytest.raises(BundleError, match=rf"sasrec.onnx: ONNX Runtime {ort.__version__} cannot load it"):
        SasrecOnnx(newer, max_len=int(meta["max_len"]), top_k=int(meta["top_k"]))
