"""Secure deployment defaults and the Kubernetes-style retrieval channel, over loopback:
both servers listen on 127.0.0.1 unless told otherwise; the ranking server under mutual TLS refuses
clients without a certificate its CA signed while its own retrieval client speaks mutual TLS too;
an oversized Recommend is RESOURCE_EXHAUSTED and the server keeps serving; the retrieval client
takes a `dns:///` target with round_robin; round_robin spreads RPCs over every address of a target
(what a headless Service's DNS name resolves to) where pick_first sticks to one. The plumbing's own
TLS/size tests live in test_serving.py; this file covers the ranking tier and load balancing."""

from __future__ import annotations

import time

import grpc
import pytest

from palr.serving.channels import open_channel

from palr.serving.config import ServerConfig

from palr.serving.server import GrpcServer
from ranking_server.config import RankingServerConfig
from recsys.v1 import ranking_pb2, ranking_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from tests.ranking_server.test_server import start_ranking, start_retrieval

WHO = "test.Who"


def test_both_servers_listen_on_loopback_unless_told_otherwise():
    assert RankingServerConfig().host == RetrievalServerConfig().host == ServerConfig().host == "127.0.0.1"


@pytest.fixture(scope="module")
def secured(server_loop, tiny_llm_bundle, pki):
    """Retrieval and ranking servers, both requiring client certificates from the test CA; the ranking
    server dials retrieval as dns:///localhost:PORT with round_robin, presenting its own client certificate."""
    mtls = dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    retrieval = start_retrieval(server_loop, tiny_llm_bundle, **mtls)
    ranking = start_ranking(server_loop, tiny_llm_bundle, f"dns:///localhost:{retrieval.server.port}",
                            retrieval_lb="round_robin", retrieval_tls_ca=pki.ca, retrieval_tls_cert=pki.client_cert,
                            retrieval_tls_key=pki.client_key, max_message_bytes=16 * 1024, **mtls)
    yield ranking
    server_loop.run(ranking.drain())
    server_loop.run(retrieval.drain())


def recommend(channel, **fields):
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    return stub.Recommend(ranking_pb2.RecommendRequest(**fields), timeout=60)


def test_ranking_under_mutual_tls_answers_a_client_with_a_certificate_its_ca_signed(secured, pki):
    with open_channel(f"localhost:{secured.server.port}", tls_ca=pki.ca, tls_cert=pki.client_cert,
                      tls_key=pki.client_key, aio=False) as channel:
        response = recommend(channel, user_id="1", k=3)
    assert len(response.items) == 3


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA", "plaintext"])
def test_ranking_under_mutual_tls_refuses_clients_without_a_valid_certificate(secured, pki, client):
    target = f"localhost:{secured.server.port}"
    if client == "plaintext":
        channel = grpc.insecure_channel(target)
    elif client == "no certificate":
        channel = open_channel(target, tls_ca=pki.ca, aio=False)
    else:
        channel = open_channel(target, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key, aio=False)
    with channel, pytest.raises(grpc.RpcError) as caught:
        recommend(channel, user_id="1", k=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_oversized_recommend_is_resource_exhausted_and_the_server_keeps_serving(secured, pki):
    with open_channel(f"localhost:{secured.server.port}", tls_ca=pki.ca, tls_cert=pki.client_cert,
                      tls_key=pki.client_key, aio=False) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            recommend(channel, history=[str(i) for i in range(1, 1683)] * 4, k=3)  # ~30 KB > 16 KB
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(recommend(channel, user_id="2", k=2).items) == 2


# -- client-side load balancing over several addresses -----------------------------------------------

def who_handler(port_box: list[int]) -> grpc.GenericRpcHandler:
    async def who(request: bytes, context) -> bytes:
        return str(port_box[0]).encode()
    return grpc.method_handlers_generic_handler(WHO, {"Who": grpc.unary_unary_rpc_method_handler(who)})


@pytest.fixture(scope="module")
def two_backends(server_loop):
    async def make() -> GrpcServer:
        box: list[int] = []
        server = GrpcServer(ServerConfig(port=0), [WHO])
        server.grpc.add_generic_rpc_handlers([who_handler(box)])
        box.append(await server.start())
        await server.set_serving()
        return server

    servers = [server_loop.run(make()) for _ in range(2)]
    yield [s.port for s in servers]
    for server in servers:
        server_loop.run(server.drain())


def answered_by(target: str, policy: str, calls: int = 20, awaited: set[int] = frozenset()) -> set[int]:
    """The ports that answered `calls` calls, and further calls (for up to 10 s) until every port in `awaited`
    has: the channel is ready once its first address connects, and the others may still be connecting."""
    with open_channel(target, load_balancing=policy, aio=False) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        who = channel.unary_unary(f"/{WHO}/Who")
        seen = {int(who(b"", timeout=10, wait_for_ready=True)) for _ in range(calls)}
        deadline = time.monotonic() + 10
        while not awaited <= seen and time.monotonic() < deadline:
            seen.add(int(who(b"", timeout=10, wait_for_ready=True)))
            time.sleep(0.01)
        return seen


def test_round_robin_spreads_rpcs_over_every_address_pick_first_sticks_to_one(two_backends):
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in two_backends)  # as DNS of a headless Service
    assert answered_by(target, "round_robin", awaited=set(two_backends)) == set(two_backends)
    assert len(answered_by(target, "pick_first")) == 1


def test_round_robin_with_health_checking_sends_nothing_to_a_backend_that_says_not_serving(server_loop):
    """A retrieval replica whose model runner died (or that is loading or draining) says NOT_SERVING; without
    client-side health checking it kept its share of the calls until its connection dropped."""
    async def make(serving: bool) -> GrpcServer:
        box: list[int] = []
        server = GrpcServer(ServerConfig(port=0), [WHO])
        server.grpc.add_generic_rpc_handlers([who_handler(box)])
        box.append(await server.start())
        if serving:
            await server.set_serving()
        return server

    healthy, sick = server_loop.run(make(True)), server_loop.run(make(False))
    try:
        target = f"ipv4:127.0.0.1:{healthy.port},127.0.0.1:{sick.port}"
        with open_channel(target, load_balancing="round_robin", aio=False, health_service=WHO) as channel:
            who = channel.unary_unary(f"/{WHO}/Who")
            assert {int(who(b"", timeout=10, wait_for_ready=True)) for _ in range(20)} == {healthy.port}
            server_loop.run(sick.set_serving())
            server_loop.run(healthy.set_not_serving("a test"))
            deadline = time.monotonic() + 10
            while {int(who(b"", timeout=10, wait_for_ready=True)) for _ in range(10)} != {sick.port}:
                assert time.monotonic() < deadline, "calls still reach the backend that says NOT_SERVING"
        both = {healthy.port, sick.port}
        assert answered_by(target, "round_robin", awaited=both) == both  # without it: both, whatever they say
    finally:
        for server in (healthy, sick):
            server_loop.run(server.drain())


def test_unknown_load_balancing_policy_is_refused():
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        open_channel("dns:///localhost:1", load_balancing="least_loaded")


def test_plaintext_health_port_serves_probes_while_the_service_port_needs_mutual_tls(server_loop, pki):
    """What Kubernetes' native grpc probes (no client certificates) need: health, and only health, in plaintext."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loadtest.servers import free_port
    from palr.serving.server import NOT_SERVING, SERVING

    async def make() -> GrpcServer:
        server = GrpcServer(ServerConfig(port=0, health_port=free_port(), tls_cert=pki.server_cert,
                                         tls_key=pki.server_key, tls_client_ca=pki.ca, grace=0.5), [WHO])
        server.grpc.add_generic_rpc_handlers([who_handler([0])])
        await server.start()
        return server

    server = server_loop.run(make())

    def check(channel) -> int:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=WHO), timeout=5).status

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            assert check(probe) == NOT_SERVING
            server_loop.run(server.set_serving())
            assert check(probe) == SERVING
            with pytest.raises(grpc.RpcError) as caught:
                probe.unary_unary(f"/{WHO}/Who")(b"", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the service itself is not there
            with pytest.raises(grpc.RpcError) as caught:  # the service port's interceptors here too
                probe.unary_unary("/grpc.health.v1.Health/Check")(b"\xff", timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # (was UNKNOWN, with a traceback)
        with grpc.insecure_channel(server.address) as plaintext, pytest.raises(grpc.RpcError) as caught:
            check(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the service port still demands mutual TLS
    finally:
        server_loop.run(server.drain())
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probe, pytest.raises(grpc.RpcError):
        check(probe)


def test_the_served_quality_check_asks_servers_under_mutual_tls(secured, pki, tiny_llm_bundle, ml100k_dir, tmp_path):
    """It opened plaintext channels only: a deployment's mutual-TLS ports could not be checked."""
    from loadtest.served_quality import ServedQualityConfig, failed_modes, run

    report = run(ServedQualityConfig(bundle=tiny_llm_bundle, data=ml100k_dir, users=3, concurrency=1, out=tmp_path,
                                     ranking=f"localhost:{secured.server.port}", retrieval=secured.config.retrieval,
                                     tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key))
    assert report["users"] == 3 and failed_modes(report, ["score", "generate"]) == []
    assert report["score_errors"] == report["generate_errors"] == {}
