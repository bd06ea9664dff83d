"""The edges a held-out client found (issue 11), over loopback with real servers on the tiny bundle:
an unparsable request body is INVALID_ARGUMENT naming the message on both servers (which keep
serving), and `user_id` is validated like `request_id` (length, printable), never logged raw."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from palr.bundle import Bundle
from palr.serving.validation import MAX_USER_ID_CHARS, user_id_problem
from ranking_server.config import RankingServerConfig
from ranking_server.server import RankingServer
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.server import RetrievalServer

RECOMMEND = "/recsys.v1.RankingService/Recommend"
RETRIEVE = "/recsys.v1.RetrievalService/Retrieve"
# Not protobuf: 0xff starts a varint tag that never ends (every parser refuses it), then noise.
GARBAGE = [b"\xff" * 12, b"\xff\xff\xff\xff" + os.urandom(64), b"\x0a\xff\xff\xff\xff\x0f"]


def _start(server_loop, server):
    async def up():
        await server.start()
        await server.load()
        await server.server.set_serving()
        return server
    return server_loop.run(up(), timeout=120)


@pytest.fixture(scope="module")
def servers(server_loop, tiny_llm_bundle: Path):
    async def make_retrieval():
        return RetrievalServer(RetrievalServerConfig(bundle=tiny_llm_bundle, port=0))
    retrieval = _start(server_loop, server_loop.run(make_retrieval()))

    async def make_ranking():
        return RankingServer(RankingServerConfig(bundle=tiny_llm_bundle, retrieval=retrieval.server.address, port=0))
    ranking = _start(server_loop, server_loop.run(make_ranking()))
    yield retrieval, ranking
    server_loop.run(ranking.drain())
    server_loop.run(retrieval.drain())


@pytest.fixture(scope="module")
def channels(servers):
    retrieval, ranking = servers
    with grpc.insecure_channel(retrieval.server.address) as r, grpc.insecure_channel(ranking.server.address) as k:
        yield r, k


def known_user(bundle: Path) -> str:
    users = json.loads(Bundle.open(bundle).path("users").read_text())["users"]
    return next(u for u, e in users.items() if e["history"])


def recommend(channel, **fields) -> ranking_pb2.RecommendResponse:
    return ranking_pb2_grpc.RankingServiceStub(channel).Recommend(ranking_pb2.RecommendRequest(**fields), timeout=60)


def unparsable_count(method: str) -> float:
    return REGISTRY.get_sample_value("recsys_unparsable_requests_total", {"method": method}) or 0.0


def retrieve(channel, **fields) -> list[retrieval_pb2.RetrieveResponse]:
    return list(retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(retrieval_pb2.RetrieveRequest(**fields),
                                                                          timeout=30))


# -- a body that is not a protobuf message ----------------------------------------------------------

@pytest.mark.parametrize("body", GARBAGE, ids=["ff", "ff+random", "truncated-field"])
def test_unparsable_recommend_body_is_invalid_argument_and_the_server_keeps_serving(channels, tiny_llm_bundle, body):
    _, ranking = channels
    raw = ranking.unary_unary(RECOMMEND)  # no serializers: bytes in, bytes out
    before = unparsable_count(RECOMMEND)
    with pytest.raises(grpc.RpcError) as error:
        raw(body, timeout=30, metadata=(("x-request-id", "garbage-1"),))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "garbage-1") in tuple(error.value.trailing_metadata())  # the id its log line names
    assert unparsable_count(RECOMMEND) == before + 1  # counted (the servicer's metrics never see it)
    assert "did not parse as recsys.v1.RecommendRequest" in error.value.details()
    assert recommend(ranking, user_id=known_user(tiny_llm_bundle), k=2).items


@pytest.mark.parametrize("body", GARBAGE, ids=["ff", "ff+random", "truncated-field"])
def test_unparsable_retrieve_body_is_invalid_argument_and_the_server_keeps_serving(channels, tiny_llm_bundle, body):
    retrieval, _ = channels
    raw = retrieval.unary_stream(RETRIEVE)
    before = unparsable_count(RETRIEVE)
    with pytest.raises(grpc.RpcError) as error:
        list(raw(body, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unparsable_count(RETRIEVE) == before + 1
    assert "did not parse as recsys.v1.RetrieveRequest" in error.value.details()
    assert retrieve(retrieval, user_id=known_user(tiny_llm_bundle), k=3)


def test_a_valid_body_through_a_raw_channel_is_served_as_usual(channels, tiny_llm_bundle):
    retrieval, ranking = channels
    user = known_user(tiny_llm_bundle)
    body = ranking_pb2.RecommendRequest(user_id=user, k=2).SerializeToString()
    answer = ranking_pb2.RecommendResponse.FromString(ranking.unary_unary(RECOMMEND)(body, timeout=60))
    assert len(answer.items) == 2
    body = retrieval_pb2.RetrieveRequest(user_id=user, k=3).SerializeToString()
    messages = [retrieval_pb2.RetrieveResponse.FromString(m) for m in retrieval.unary_stream(RETRIEVE)(body, timeout=30)]
    assert sum(len(m.candidates) for m in messages) == 3


# -- user_id ------------------------------------------------------------------------------------------

BAD_USER_IDS = {
    "1 MiB of NUL and non-characters": ("\x00\ufffe\uffff" * (1 << 20))[: (1 << 20) // 3],
    "too long": "u" * (MAX_USER_ID_CHARS + 1),
    "NUL": "user\x00id",
    "newline": "user\nINFO forged log line",
    "non-character": "user\ufdd0",
    "escape": "user\x1b[31m",
}


@pytest.mark.parametrize("name", list(BAD_USER_IDS))
def test_bad_user_id_is_invalid_argument_naming_the_field_on_both_servers_and_not_logged(channels, caplog, name):
    retrieval, ranking = channels
    bad = BAD_USER_IDS[name]
    with caplog.at_level(logging.INFO):
        for call in (lambda: recommend(ranking, user_id=bad, k=2), lambda: retrieve(retrieval, user_id=bad, k=3)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith("user_id "), error.value.details()
            assert bad not in error.value.details() and len(error.value.details()) < 400
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "user_id " in logged  # the refusal is logged ...
    assert bad not in logged and repr(bad)[1:-1] not in logged  # ... without the id itself


@pytest.mark.parametrize("good", ["", "no-such-user", "jos\u00e9 42", "u" * MAX_USER_ID_CHARS, "\u7528\u6237-7"])
def test_acceptable_user_ids_are_served_empty_and_unknown_as_cold_start(channels, good):
    retrieval, ranking = channels
    assert user_id_problem(good) is None
    answer = recommend(ranking, user_id=good, k=2)
    assert len(answer.items) == 2 and answer.cold_start
    messages = retrieve(retrieval, user_id=good, k=3)
    assert messages[0].cold_start and sum(len(m.candidates) for m in messages) == 3


# -- request_id ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["rid\nINFO forged log line", "with space", "r" * 129, "caf\u00e9"],
                         ids=["newline", "space", "too long", "non-ASCII"])
def test_bad_request_id_is_invalid_argument_on_both_servers_and_not_logged(channels, tiny_llm_bundle, caplog, bad):
    retrieval, ranking = channels
    user = known_user(tiny_llm_bundle)
    with caplog.at_level(logging.INFO):
        for call in (lambda: recommend(ranking, user_id=user, k=2, request_id=bad),
                     lambda: retrieve(retrieval, user_id=user, k=3, request_id=bad)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith("request_id "), error.value.details()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "rid=invalid-" in logged and bad not in logged
    assert retrieve(retrieval, user_id=user, k=3, request_id="fine-id-1")


# -- item-id lists --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field_name", ["history", "exclude"])
def test_an_item_id_list_over_the_limit_is_invalid_argument_on_both_servers(channels, tiny_llm_bundle, field_name):
    from palr.serving.validation import MAX_ITEM_IDS

    retrieval, ranking = channels
    item = json.loads(Bundle.open(tiny_llm_bundle).path("users").read_text())["users"][known_user(tiny_llm_bundle)][
        "history"][0]
    too_many = {field_name: [item] * (MAX_ITEM_IDS + 1)}
    for call in (lambda: recommend(ranking, k=2, **too_many), lambda: retrieve(retrieval, k=3, **too_many)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(f"{field_name} has {MAX_ITEM_IDS + 1} item ids"), error.value.details()
    assert recommend(ranking, k=2, **{field_name: [item] * MAX_ITEM_IDS}).items  # the limit itself is served
