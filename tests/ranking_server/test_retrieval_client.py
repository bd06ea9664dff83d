"""The ranking server's retrieval client retries a Retrieve that failed UNAVAILABLE before any answer arrived
(a replica restarting or draining), and nothing else. The retrieval side is a gRPC server on port 0 that fails
on cue: the real retrieval server cannot be made to fail one call and answer the next."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from palr.serving.errors import RequestError
from ranking_server.config import RankingServerConfig
from ranking_server.retrieval_client import RetrievalClient
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc


class FailingFirst(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Fails the first `failures` calls with `code` (after streaming `sent_first` messages), then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode, sent_first: int = 0):
        self.failures, self.code, self.sent_first = failures, code, sent_first
        self.calls = 0

    async def Retrieve(self, request, context):
        self.calls += 1
        message = retrieval_pb2.RetrieveResponse(
            candidates=[retrieval_pb2.Candidate(item_id=f"i{n}", score=1.0 / (n + 1)) for n in range(request.k)],
            model_version="test")
        if self.calls <= self.failures:
            for _ in range(self.sent_first):
                await context.write(message)
            await context.abort(self.code, f"failing call {self.calls} on cue")
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


@pytest.mark.parametrize("code, sent_first", [(grpc.StatusCode.INVALID_ARGUMENT, 0),
                                              (grpc.StatusCode.RESOURCE_EXHAUSTED, 0),
                                              (grpc.StatusCode.UNAVAILABLE, 1)],
                         ids=["invalid-argument", "resource-exhausted", "unavailable-after-an-answer"])
def test_other_failures_and_streams_already_answering_are_not_retried(code, sent_first):
    servicer = FailingFirst(failures=1, code=code, sent_first=sent_first)
    with pytest.raises(RequestError) as error:
        asyncio.run(retrieve(servicer, attempts=3))
    assert servicer.calls == 1 and error.value.code == code


def test_a_retried_method_must_name_service_and_method():
    from palr.serving.channels import service_config

    assert service_config(retry_methods=["pkg.Svc/Get"], max_attempts=1) == {}  # 1 attempt: no retry policy
    with pytest.raises(ValueError, match="package.Service/Method"):
        service_config(retry_methods=["pkg.Svc"], max_attempts=3)
