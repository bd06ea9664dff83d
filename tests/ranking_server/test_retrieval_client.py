"""The ranking server's retrieval client retries a Retrieve that failed UNAVAILABLE before any answer arrived
(a replica restarting or draining), and nothing else. The retrieval side is a gRPC server on port 0 that fails
on cue: the real retrieval server cannot be made to fail one call and answer the next."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from prometheus_client import REGISTRY

from palr.serving.errors import QUEUE_FULL, RequestError
from ranking_server.config import RankingServerConfig
from ranking_server.retrieval_client import RetrievalClient
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc


class FailingFirst(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Fails the first `failures` calls with `code` and `trailer` (after streaming `sent_first` messages), then
    answers."""

    def __init__(self, failures: int, code: grpc.StatusCode, sent_first: int = 0, trailer: tuple = ()):
        self.failures, self.code, self.sent_first, self.trailer = failures, code, sent_first, trailer
        self.calls = 0

    async def Retrieve(self, request, context):
        self.calls += 1
        message = retrieval_pb2.RetrieveResponse(
            candidates=[retrieval_pb2.Candidate(item_id=f"i{n}", score=1.0 / (n + 1)) for n in range(request.k)],
            model_version="test")
        if self.calls <= self.failures:
            for _ in range(self.sent_first):
                await context.write(message)
            await context.abort(self.code, f"failing call {self.calls} on cue", trailing_metadata=self.trailer)
        await context.write(message)


async def retrieve(servicer: FailingFirst, attempts: int) -> list[retrieval_pb2.RetrieveResponse]:
    server = grpc.aio.server()
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RetrievalClient(RankingServerConfig(retrieval=f"127.0.0.1:{port}", retrieval_attempts=attempts))
    try:
        request = retrieval_pb2.RetrieveRequest(user_id="u", k=3, request_id="r")
        return [m async for m in client.stream(request, timeout=10)]
    finally:
        await client.close()
        await server.stop(0)


def test_a_retrieve_failing_unavailable_before_answering_is_retried():
    servicer = FailingFirst(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    messages = asyncio.run(retrieve(servicer, attempts=3))
    assert [len(m.candidates) for m in messages] == [3] and servicer.calls == 3


def test_retries_stop_at_the_attempts_allowed():
    servicer = FailingFirst(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(RequestError) as error:
        asyncio.run(retrieve(servicer, attempts=2))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 2
    servicer = FailingFirst(failures=1, code=grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(RequestError):
        asyncio.run(retrieve(servicer, attempts=1))  # 1: no retry
    assert servicer.calls == 1


@pytest.mark.parametrize("code, sent_first, passed_on", [
    (grpc.StatusCode.INVALID_ARGUMENT, 0, grpc.StatusCode.INTERNAL),  # the tiers disagree: not the caller's fault
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 0, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (grpc.StatusCode.UNAVAILABLE, 1, grpc.StatusCode.UNAVAILABLE)],
    ids=["invalid-argument", "resource-exhausted", "unavailable-after-an-answer"])
def test_other_failures_and_streams_already_answering_are_not_retried(code, sent_first, passed_on):
    servicer = FailingFirst(failures=1, code=code, sent_first=sent_first)
    with pytest.raises(RequestError) as error:
        asyncio.run(retrieve(servicer, attempts=3))
    assert servicer.calls == 1 and error.value.code == passed_on
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "settings or bundles disagree" in str(error.value)


def test_a_retried_method_must_name_service_and_method():
    from palr.serving.channels import service_config

    assert service_config(retry_methods=["pkg.Svc/Get"], max_attempts=1) == {}  # 1 attempt: no retry policy
    with pytest.raises(ValueError, match="package.Service/Method"):
        service_config(retry_methods=["pkg.Svc"], max_attempts=3)


async def retrieve_from_two(refusing: FailingFirst, lb: str = "round_robin", **config
                            ) -> tuple[list[int], FailingFirst]:
    """Six Retrieves over a channel to `refusing` and to a replica that answers, under `lb`, once both
    connections are ready: the number of candidates each got (0: refused), and the answering replica."""
    answering = FailingFirst(0, grpc.StatusCode.OK)
    servers, ports = [], []
    for servicer in (refusing, answering):
        server = grpc.aio.server()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    client = RetrievalClient(RankingServerConfig(retrieval=target, retrieval_lb=lb, **config))
    failures, refusing.failures = refusing.failures, 0
    try:
        while not (answering.calls and refusing.calls if lb == "round_robin" else answering.calls + refusing.calls):
            [m async for m in client.stream(retrieval_pb2.RetrieveRequest(user_id="u", k=3), 10)]
        refusing.calls = answering.calls = 0
        refusing.failures = failures
        answered = []
        for n in range(6):
            request = retrieval_pb2.RetrieveRequest(user_id="u", k=3, request_id=f"r{n}")
            try:
                answered.append(sum(len(m.candidates) for m in [m async for m in client.stream(request, 10)]))
            except RequestError as e:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                answered.append(0)
        return answered, answering
    finally:
        await client.close()
        for server in servers:
            await server.stop(0)


def test_a_full_queue_is_sent_again_to_the_next_replica_under_round_robin():
    """One replica refuses its next 3 calls for a full queue (the retrieval server's QUEUE_FULL trailer); under
    round_robin every Retrieve is answered: each refused one by its second send, to the other replica."""
    refusing = FailingFirst(3, grpc.StatusCode.RESOURCE_EXHAUSTED, trailer=(QUEUE_FULL,))
    retries = REGISTRY.get_sample_value("ranking_retrieval_queue_full_retries_total") or 0.0
    answered, answering = asyncio.run(retrieve_from_two(refusing))
    assert answered == [3] * 6 and refusing.calls >= 2  # round_robin gave the full replica its share of first sends
    refused = min(refusing.calls, 3)
    assert answering.calls == 6 - (refusing.calls - refused)  # the 6, less those the refusing replica answered
    assert REGISTRY.get_sample_value("ranking_retrieval_queue_full_retries_total") - retries == refused


@pytest.mark.parametrize("trailer, lb, retries", [((), "round_robin", 1), ((QUEUE_FULL,), "pick_first", 1),
                                                  ((QUEUE_FULL,), "round_robin", 0)],
                         ids=["not-a-full-queue", "pick-first", "retries-0"])
def test_other_refusals_pick_first_and_retries_0_pass_the_refusal_on(trailer, lb, retries):
    """RESOURCE_EXHAUSTED without the trailer (e.g. a message over the size limit) would be refused anywhere;
    under pick_first the next send would reach the same replica: the caller gets the refusal each time."""
    refusing = FailingFirst(6, grpc.StatusCode.RESOURCE_EXHAUSTED, trailer=trailer)
    answered, answering = asyncio.run(retrieve_from_two(refusing, lb, retrieval_queue_full_retries=retries))
    if lb == "pick_first":  # the first address (the refusing replica) gets every call, each sent once
        assert answered == [0] * 6 and refusing.calls == 6 and answering.calls == 0
    else:
        assert answered.count(0) == refusing.calls >= 2 and answering.calls == 6 - refusing.calls


@pytest.mark.parametrize("retries", [-1, 5])
def test_queue_full_retries_outside_0_to_4_are_refused(retries):
    with pytest.raises(ValueError, match="queue.full.retries"):
        RankingServerConfig(retrieval="127.0.0.1:1", retrieval_queue_full_retries=retries)
