"""palr/serving/ (server, config, channels, errors, metrics) over real loopback gRPC: health transitions, drain, TLS and mutual TLS, error
mapping and Prometheus metrics. The servers here carry a small real test service (raw bytes)
besides health and reflection; tests/test_retrieval_server*.py cover the same plumbing under the
retrieval service."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from loadtest.servers import free_port, scrape_metrics
from tests.fixtures.serving import wait_until
from palr.serving.channels import open_channel
from palr.serving.config import ServerConfig
from palr.serving.errors import RequestError
from palr.serving.metrics import RpcMetrics, answered_code, deadline_skew_s
from palr.serving.server import NOT_SERVING, SERVING, GrpcServer

SERVICE = "test.Plumbing"
METRICS = RpcMetrics("test_plumbing", "Plumbing")
log = logging.getLogger(__name__)


class PlumbingService:
    """Echo (bytes back), Slow (echo after `delay_s`; sets `entered` on arrival), Blocking (echo after blocking
    the loop `delay_s`), Refuse (a RequestError) and Crash (a bug), each wrapped by RpcMetrics.track like real
    servicers."""

    def __init__(self, delay_s: float = 0.5):
        self.delay_s = delay_s
        self.entered = threading.Event()
        self.answered: list[str] = []  # the methods whose answer track() counted as sent (Answered.then)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {"Echo": self.echo, "Slow": self.slow, "Refuse": self.refuse, "Crash": self.crash,
                   "Blocking": self.blocking}
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: grpc.unary_unary_rpc_method_handler(self._tracked(fn)) for name, fn in methods.items()})

    def _tracked(self, fn):
        async def handle(request: bytes, context) -> bytes:
            async with METRICS.track(context, "test-rid", log) as answered:
                answered.then(lambda: self.answered.append(fn.__name__))
                return await fn(request)
        return handle

    async def echo(self, request: bytes) -> bytes:
        return request

    async def slow(self, request: bytes) -> bytes:
        self.entered.set()
        await asyncio.sleep(self.delay_s)
        return request

    async def blocking(self, request: bytes) -> bytes:
        time.sleep(self.delay_s)  # no await: nothing can cancel it when its deadline passes
        return request

    async def refuse(self, request: bytes) -> bytes:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "field: refused on purpose")

    async def crash(self, request: bytes) -> bytes:
        raise ZeroDivisionError("a bug")


def start_server(server_loop, config: ServerConfig, service: PlumbingService | None = None) -> GrpcServer:
    async def make() -> GrpcServer:
        server = GrpcServer(config, [SERVICE])
        server.grpc.add_generic_rpc_handlers([(service or PlumbingService()).handler()])
        await server.start()
        return server
    return server_loop.run(make())


def call(channel: grpc.Channel, method: str, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    return channel.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=timeout)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_the_answered_series_exist_at_zero_before_the_first_call():
    """An SLO ratio or rate() over code="OK" reads 0 on a replica no call reached yet, not "no data"."""
    RpcMetrics("test_fresh", "Fresh")
    assert REGISTRY.get_sample_value("test_fresh_requests_total", {"code": "OK"}) == 0
    assert REGISTRY.get_sample_value("test_fresh_request_seconds_count", {"code": "OK"}) == 0


def test_health_not_serving_until_warm_then_serving_then_not_serving_while_draining(server_loop):
    service = PlumbingService(delay_s=0.5)
    server = start_server(server_loop, ServerConfig(port=0, grace=5.0), service)
    serving_gauge = lambda: REGISTRY.get_sample_value("recsys_health_serving")  # noqa: E731
    with grpc.insecure_channel(server.address) as channel:
        assert [health_status(channel, name) for name in ("", SERVICE)] == [NOT_SERVING, NOT_SERVING]
        assert serving_gauge() == 0
        server_loop.run(server.set_serving())
        assert [health_status(channel, name) for name in ("", SERVICE)] == [SERVING, SERVING]
        assert serving_gauge() == 1

        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert next(watch).status == SERVING
        in_flight = channel.unary_unary(f"/{SERVICE}/Slow").future(b"slow", timeout=10)
        assert service.entered.wait(5)
        drained = server_loop.submit(server.drain())
        assert next(watch).status == NOT_SERVING  # watchers hear it as the drain starts
        assert serving_gauge() == 0
        watch.cancel()
        assert in_flight.result() == b"slow"  # the in-flight RPC finished OK
        drained.result(10)
    with grpc.insecure_channel(server.address) as channel:  # a new connection is refused
        with pytest.raises(grpc.RpcError) as refused:
            health_status(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_failure_reported_before_the_load_ends_keeps_health_not_serving(server_loop):
    """The model's watcher (a dead micro-batcher, a failed engine) may report before `run()` turns health SERVING at
    the end of the load: SERVING then overwrote NOT_SERVING for good, with the watcher gone."""
    server = start_server(server_loop, ServerConfig(port=0, grace=1.0))
    try:
        server_loop.run(server.set_not_serving("the runner died"))
        server_loop.run(server.set_serving())
        with grpc.insecure_channel(server.address) as channel:
            assert [health_status(channel, name) for name in ("", SERVICE)] == [NOT_SERVING, NOT_SERVING]
    finally:
        server_loop.run(server.drain())


def test_an_open_health_watch_does_not_hold_the_stop_to_the_whole_grace(server_loop):
    """A Watch never returns on its own: one open (a ranking server's client-side health checking of its retrieval
    replicas, under round_robin) counted as an RPC in flight, so an idle server's stop waited all of --grace."""
    server = start_server(server_loop, ServerConfig(port=0, grace=60.0))
    server_loop.run(server.set_serving())
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert next(watch).status == SERVING
        server_loop.run(server.drain(), timeout=20)  # well inside the 60 s grace: the watch ended with the stop
        statuses = [r.status for r in watch]  # the stream ends (OK) instead of being cut at the grace's end
    assert statuses == [NOT_SERVING]


def test_drain_cancels_what_outlives_the_grace_period_and_logs_it_as_the_stops(server_loop, caplog):
    service = PlumbingService(delay_s=30.0)
    server = start_server(server_loop, ServerConfig(port=0, grace=0.3), service)
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
        slow = channel.unary_unary(f"/{SERVICE}/Slow").future(b"slow", timeout=20)
        assert service.entered.wait(5)
        server_loop.run(server.drain(), timeout=10)
        with pytest.raises(grpc.RpcError) as cut:
            slow.result()
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rid=test-rid cancelled")]
    assert said == ["rid=test-rid cancelled by the server's stop: its --grace period ended before this RPC did"]


def test_a_call_its_client_cancels_is_logged_as_the_clients(server_loop, caplog):
    service = PlumbingService(delay_s=30.0)
    server = start_server(server_loop, ServerConfig(port=0, grace=0.3), service)
    try:
        with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
            slow = channel.unary_unary(f"/{SERVICE}/Slow").future(b"slow", timeout=20)
            assert service.entered.wait(5)
            slow.cancel()
            wait_until(lambda: any("cancelled" in r.getMessage() for r in caplog.records), what="the cancel's log line")
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rid=test-rid cancelled")]
        assert said == ["rid=test-rid cancelled by the client"]
    finally:
        server_loop.run(server.drain())


def test_request_errors_keep_their_code_bugs_become_internal_and_the_server_keeps_serving(server_loop):
    metrics_port = free_port()
    server = start_server(server_loop, ServerConfig(port=0, metrics_port=metrics_port))
    before = scrape_metrics(metrics_port)  # the counters are the module's, shared with the tests before
    try:
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "Refuse")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "field" in refused.value.details()
            with pytest.raises(grpc.RpcError) as crashed:
                call(channel, "Crash")
            assert crashed.value.code() == grpc.StatusCode.INTERNAL
            assert "test-rid" in crashed.value.details()
            assert call(channel, "Echo", b"still here") == b"still here"
            # every answer names the request id its log lines carry, errors too (a made-up id was the logs' only)
            _, echoed = channel.unary_unary(f"/{SERVICE}/Echo").with_call(b"ping", timeout=10)
            for answer in (echoed, refused.value, crashed.value):
                assert ("x-request-id", "test-rid") in tuple(answer.trailing_metadata())
        assert server.metrics_port == metrics_port
        samples = scrape_metrics(metrics_port)
        counted = {code: samples.get(f'test_plumbing_requests_total{{code="{code}"}}', 0.0)
                   - before.get(f'test_plumbing_requests_total{{code="{code}"}}', 0.0)
                   for code in ("FAILED_PRECONDITION", "INTERNAL", "OK")}
        assert counted == {"FAILED_PRECONDITION": 1, "INTERNAL": 1, "OK": 2}  # this test's calls, each once
        assert samples["test_plumbing_requests_in_flight"] == 0
    finally:
        server_loop.run(server.drain())


def test_an_ipv6_host_in_brackets_serves_grpc_and_metrics(server_loop):
    """`--host [::1]` (the bracketed form gRPC and the --help text use): the metrics port refused it ("Name or
    service not known") and the server did not start."""
    metrics_port = free_port()
    server = start_server(server_loop, ServerConfig(host="[::1]", port=0, metrics_port=metrics_port))
    try:
        before = scrape_metrics(metrics_port, host="[::1]").get('test_plumbing_requests_total{code="OK"}', 0.0)
        with grpc.insecure_channel(server.address) as channel:
            assert call(channel, "Echo", b"v6") == b"v6"
        assert server.metrics_port == metrics_port
        samples = scrape_metrics(metrics_port, host="[::1]")
        assert samples['test_plumbing_requests_total{code="OK"}'] == before + 1
    finally:
        server_loop.run(server.drain())


def test_a_server_on_port_0_writes_the_ports_it_bound_to_its_ports_file(server_loop, tmp_path):
    """`--ports-file`: how a harness learns the port of a server it started on port 0 (no port picked beforehand
    that another process could take first). The file holds the ports the server answers on; off ones are null."""
    ports_file = tmp_path / "ports.json"
    ports_file.write_text('{"port": 1}')  # a stale file is replaced whole
    server = start_server(server_loop, ServerConfig(port=0, health_port=0, ports_file=ports_file))
    try:
        ports = json.loads(ports_file.read_text())
        assert ports == {"port": server.port, "metrics_port": None, "health_port": None, "pid": os.getpid()}
        assert ports["port"] > 0
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            assert call(channel, "Echo", b"found") == b"found"
        assert [p.name for p in tmp_path.iterdir()] == ["ports.json"]  # no partial file left beside it
    finally:
        server_loop.run(server.drain())


def test_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(server_loop):
    server = start_server(server_loop, ServerConfig(port=0, max_message_bytes=1024))
    try:
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as too_big:
                call(channel, "Echo", b"x" * 4096)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert call(channel, "Echo", b"x" * 512) == b"x" * 512
    finally:
        server_loop.run(server.drain())


def test_tls_server_answers_clients_that_trust_its_ca_only(server_loop, pki):
    config = ServerConfig(port=0, tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert config.tls == "TLS"
    server = start_server(server_loop, config)
    try:
        with open_channel(server.address, tls_ca=pki.ca, aio=False) as channel:
            assert call(channel, "Echo", b"secret") == b"secret"
        with open_channel(server.address, aio=False) as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                call(plaintext, "Echo", timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server_loop.run(server.drain())


def test_mutual_tls_refuses_clients_without_a_certificate_its_ca_signed(server_loop, pki):
    config = ServerConfig(port=0, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    assert config.tls == "mutual TLS"
    server = start_server(server_loop, config)
    try:
        with open_channel(server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key,
                          aio=False) as channel:
            assert call(channel, "Echo", b"mutual") == b"mutual"
        for client in ({"tls_ca": pki.ca},
                       {"tls_ca": pki.ca, "tls_cert": pki.rogue_cert, "tls_key": pki.rogue_key}):
            with open_channel(server.address, aio=False, **client) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel, "Echo", timeout=3)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server_loop.run(server.drain())


def test_tls_files_that_cannot_work_are_refused_when_read_naming_the_option(server_loop, pki, tmp_path):
    """gRPC said "Failed to bind to address" for a key that is not the certificate's, and started with an empty
    client CA or an expired certificate, then failed every handshake while health said SERVING."""
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    for settings, message in (
            (dict(tls_cert=pki.server_cert, tls_key=pki.client_key),
             "--tls-key .* is not an unencrypted PEM private key of --tls-cert"),
            (dict(tls_cert=pki.expired_cert, tls_key=pki.expired_key), "--tls-cert .*: the certificate expired on"),
            (dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=empty),
             "--tls-client-ca .*: no PEM certificate in it")):
        with pytest.raises(ValueError, match=message):
            start_server(server_loop, ServerConfig(port=0, **settings))
    with pytest.raises(ValueError, match="tls_ca .*empty.pem: no PEM certificate in it"):
        open_channel("127.0.0.1:1", tls_ca=empty)
    expired_ca = tmp_path / "expired-ca.pem"
    expired_ca.write_bytes(pki.expired_cert.read_bytes())
    with pytest.raises(ValueError, match="tls_ca .*: none of its 1 certificate.* is valid now"):
        open_channel("127.0.0.1:1", tls_ca=expired_ca)
    rotating = tmp_path / "rotating-ca.pem"  # the old CA (expired) before its successor: valid while rotating
    rotating.write_bytes(pki.expired_cert.read_bytes() + pki.ca.read_bytes())
    open_channel("127.0.0.1:1", tls_ca=rotating, aio=False).close()
    with pytest.raises(ValueError, match="--my-cert .*: the certificate expired on"):
        open_channel("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.expired_cert, tls_key=pki.expired_key,
                     tls_flags=("--my-ca", "--my-cert", "--my-key"))


def test_a_server_takes_renewed_tls_files_for_new_connections_and_keeps_serving_on_broken_ones(server_loop, pki,
                                                                                                tmp_path, caplog):
    """cert-manager renews a mounted Secret in place: the server kept the bytes it read at start-up and failed every
    handshake once they expired. Here the renewal comes from another CA, so only a reload lets its clients in."""
    import shutil

    from cryptography import x509
    from prometheus_client import REGISTRY

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    server = start_server(server_loop, ServerConfig(port=0, tls_cert=cert, tls_key=key))
    expiry = lambda: REGISTRY.get_sample_value("recsys_tls_certificate_expiry_timestamp_seconds",  # noqa: E731
                                               {"role": "server"})
    caplog.set_level("INFO", logger="palr.serving.tls")
    try:
        assert expiry() > time.time()
        with open_channel(server.address, tls_ca=pki.ca, aio=False) as channel:
            assert call(channel, "Echo", b"before") == b"before"
        cert.write_bytes(pki.expired_cert.read_bytes())  # a renewal gone wrong: not taken, the old pair serves on
        key.write_bytes(pki.expired_key.read_bytes())
        with open_channel(server.address, tls_ca=pki.ca, aio=False) as channel:
            assert call(channel, "Echo", b"still") == b"still"
        cert.write_bytes(pki.other_server_cert.read_bytes())
        key.write_bytes(pki.other_server_key.read_bytes())
        with open_channel(server.address, tls_ca=pki.rogue_ca, aio=False) as channel:
            assert call(channel, "Echo", b"renewed") == b"renewed"
        with open_channel(server.address, tls_ca=pki.ca, aio=False) as channel:  # the old CA's clients: no more
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "Echo", timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        renewed = x509.load_pem_x509_certificate(pki.other_server_cert.read_bytes())
        assert expiry() == renewed.not_valid_after_utc.timestamp()
        assert "the TLS files changed and cannot be used" in caplog.text  # the expired pair, logged
        assert "the TLS files changed: new connections use them" in caplog.text
    finally:
        server_loop.run(server.drain())


def test_server_config_refuses_half_tls_settings(pki):
    with pytest.raises(ValueError, match="tls-key"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        ServerConfig(tls_client_ca=pki.ca)
    with pytest.raises(ValueError, match="tls_key"):
        open_channel("127.0.0.1:1", tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(tls_cert=pki.server_cert, tls_key=pki.server_key.with_name("missing.key"))


@pytest.mark.parametrize("field_name", ["grace", "drain_delay"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_server_config_refuses_stop_timings_that_are_not_finite_seconds(field_name, value):
    with pytest.raises(ValueError, match=f"{field_name} must be a finite number of seconds"):
        ServerConfig(**{field_name: value})


@pytest.mark.parametrize("field_name", ["port", "metrics_port", "health_port"])
@pytest.mark.parametrize("value", [-1, 65536, 70000])
def test_server_config_refuses_a_port_outside_tcps_range(field_name, value):
    """gRPC listened on port % 65536 (70000 became 4464) and logged that as where it listened."""
    with pytest.raises(ValueError, match=f"--{field_name.replace('_', '-')} must be a TCP port, 0 to 65535"):
        ServerConfig(**{field_name: value})


@pytest.mark.parametrize("value", [0, 2 ** 31])
def test_server_config_refuses_a_message_limit_grpc_cannot_take(value):
    with pytest.raises(ValueError, match="max_message_bytes must be between 1 and 2147483647"):
        ServerConfig(max_message_bytes=value)


def test_a_taken_port_is_an_error_not_a_shared_port(server_loop):
    first = start_server(server_loop, ServerConfig(port=0))
    try:
        with pytest.raises(OSError, match="cannot listen"):
            start_server(server_loop, ServerConfig(port=first.port))
    finally:
        server_loop.run(first.drain())



def codes_counted(server_loop, service: PlumbingService, calls, rpcs: int) -> dict[str, float]:
    """`calls(channel)` against a server of `service`; how many RPCs it counted, by status code, once it has counted
    `rpcs` (a handler counts when it ends, which for a cancelled one can be after its client has raised)."""
    metrics_port = free_port()
    server = start_server(server_loop, ServerConfig(port=0, metrics_port=metrics_port), service)
    key = 'test_plumbing_requests_total{{code="{}"}}'.format

    def counted() -> dict[str, float]:
        after = scrape_metrics(metrics_port)
        return {code: after.get(key(code), 0) - before.get(key(code), 0)
                for code in ("OK", "DEADLINE_EXCEEDED", "CANCELLED")}

    try:
        before = scrape_metrics(metrics_port)
        with grpc.insecure_channel(server.address) as channel:
            calls(channel)
        wait_until(lambda: sum(counted().values()) >= rpcs, timeout=10, what=f"the server to count {rpcs} RPCs")
        result = counted()
    finally:
        server_loop.run(server.drain())
    return {code: n for code, n in result.items() if n}


def test_an_answer_finished_after_its_deadline_is_counted_as_the_client_saw_it(server_loop):
    """The handler returns normally, but after the deadline: the client gets DEADLINE_EXCEEDED, and so does the
    server's count (it said OK)."""
    def calls(channel):
        with pytest.raises(grpc.RpcError) as late:
            call(channel, "Blocking", timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert call(channel, "Echo") == b"ping"

    service = PlumbingService(delay_s=0.6)
    assert codes_counted(server_loop, service, calls, 2) == {"DEADLINE_EXCEEDED": 1, "OK": 1}
    # what the handler counts about its answer (the ranking server: how it was answered, its stages, degraded, cold
    # starts) runs for the answer the client got only
    assert service.answered == ["echo"]


def test_a_deadline_whose_timeout_grpc_rounded_up_is_counted_deadline_exceeded_not_cancelled(server_loop):
    """gRPC sends a 1.011 s timeout as 1.02 s: the client's deadline passes first and it cancels the call while
    the server's deadline has ~9 ms left, which was counted CANCELLED ("by the client")."""
    def calls(channel):
        for timeout in (1.011, 1.091):
            with pytest.raises(grpc.RpcError) as late:
                call(channel, "Slow", timeout=timeout)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert codes_counted(server_loop, PlumbingService(delay_s=3.0), calls, 2) == {"DEADLINE_EXCEEDED": 2}


def test_a_client_that_cancels_well_before_its_deadline_is_counted_cancelled(server_loop):
    """The deadline rule's slack (rounding + transit) covers the last few ms before a deadline, not a client that
    gave up early: cancelled once the server has it, seconds before its 10 s deadline, it is counted CANCELLED."""
    service = PlumbingService(delay_s=30.0)

    def calls(channel):
        future = channel.unary_unary(f"/{SERVICE}/Slow").future(b"ping", timeout=10.0)
        assert service.entered.wait(10)
        future.cancel()
        assert future.cancelled()

    assert codes_counted(server_loop, service, calls, 1) == {"CANCELLED": 1}


def test_the_deadline_slack_is_the_timeouts_rounding_plus_transit_at_most_a_tenth_of_it():
    assert deadline_skew_s(1.011) == pytest.approx(0.01011 + 0.025)
    assert deadline_skew_s(0.2) == pytest.approx(0.002 + 0.02)
    assert deadline_skew_s(0.01) == pytest.approx(0.001 + 0.001)  # a 10 ms call cancelled at 5 ms: CANCELLED


@pytest.mark.parametrize("late_ms, code", [(-5.0, "OK"), (0.5, "OK"), (2.0, "DEADLINE_EXCEEDED"),
                                           (600.0, "DEADLINE_EXCEEDED")])
def test_an_answer_is_counted_as_its_client_most_likely_got_it(late_ms, code):
    """On loopback, answers sent 0.5 ms after the deadline mostly arrived OK (14 of 15), 2 ms after never."""
    assert answered_code(late_ms / 1e3) == getattr(grpc.StatusCode, code)


def test_a_second_signal_during_cleanup_neither_kills_nor_interrupts_the_server():
    """The signal handlers were removed once the drain ended, before the servers closed their model (an engine's
    join takes up to 30 s): a second Ctrl-C then raised KeyboardInterrupt out of asyncio.run, a second SIGTERM
    killed the process (143). Here the cleanup itself receives the second SIGINT."""
    import os
    import signal

    events = []

    async def main() -> None:
        server = GrpcServer(ServerConfig(port=0, grace=0.5), [SERVICE])

        async def load() -> None:
            asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)  # the first: drain

        async def cleanup() -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the second, while the model closes
            await asyncio.sleep(0.3)
            events.append("closed")

        await server.run(load, cleanup=cleanup)
        events.append("returned")

    asyncio.run(main())  # a KeyboardInterrupt here fails the test (and was the bug)
    assert events == ["closed", "returned"]


def test_a_parent_pid_that_is_not_the_parent_is_refused_before_serving():
    """It passed config (only negative PIDs were refused), the watch found at once that the PID was not the
    parent, and the server drained before it had served and exited 0 (a wrapper between them: bash -c, nohup)."""
    import os

    async def main() -> None:
        server = GrpcServer(ServerConfig(port=0, parent_pid=os.getpid()), [SERVICE])  # never its own parent

        async def load() -> None:
            raise AssertionError("loaded though refused")

        await server.run(load)

    with pytest.raises(ValueError, match=f"--parent-pid {os.getpid()} is not this process's parent"):
        asyncio.run(main())


def test_a_failure_streak_reaches_its_limit_once_and_a_success_starts_it_again():
    from palr.serving.streak import FailureStreak

    streak = FailureStreak(limit=3)
    assert [streak.failed() for _ in range(2)] == [False, False]
    streak.succeeded()
    assert not streak.tripped
    assert [streak.failed() for _ in range(4)] == [False, False, True, False]  # True once: one NOT_SERVING
    streak.succeeded()  # a call in a parallel thread that got through: health stays NOT_SERVING, and so does this
    assert streak.tripped
