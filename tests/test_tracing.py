"""OpenTelemetry across both tiers (real servers in process on the tiny bundle, the SDK's in-memory
exporter): one Recommend is one trace whose ranking-server span is the parent, through the retrieval
stream's client span, of the retrieval server's span (W3C trace context in gRPC metadata), with the
engine's queue / prefill / decode spans carrying the request's attributes; with no endpoint, no spans."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from palr.bundle import Bundle
from palr.serving import tracing
from ranking_server.config import RankingServerConfig
from ranking_server.server import RankingServer
from recsys.v1 import ranking_pb2, ranking_pb2_grpc
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.server import RetrievalServer


@pytest.fixture(scope="module")
def traced(server_loop, tiny_llm_bundle: Path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()

    retrieval = server_loop.serve(lambda: RetrievalServer(
        RetrievalServerConfig(bundle=tiny_llm_bundle, port=0),
        tracing.tracer_provider("retrieval_server", exporter=exporter)))
    ranking = server_loop.serve(lambda: RankingServer(
        RankingServerConfig(bundle=tiny_llm_bundle, retrieval=retrieval.server.address, port=0),
        tracing.tracer_provider("ranking_server", exporter=exporter)))
    try:
        yield exporter, ranking
    finally:
        server_loop.run(ranking.drain())
        server_loop.run(retrieval.drain())


def test_one_recommend_is_one_trace_across_both_servers(traced, tiny_llm_bundle):
    exporter, ranking = traced
    users = json.loads(Bundle.open(tiny_llm_bundle).path("users").read_text())["users"]
    user = next(u for u, e in users.items() if e["history"])
    exporter.clear()
    with grpc.insecure_channel(ranking.server.address) as channel:
        ranking_pb2_grpc.RankingServiceStub(channel).Recommend(
            ranking_pb2.RecommendRequest(user_id=user, k=2, request_id="traced-1"), timeout=60)
    spans = exporter.get_finished_spans()
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert len({span.context.trace_id for span in spans}) == 1, [s.name for s in spans]
    recommend = by_name["Recommend"]
    retrieve = by_name["Retrieve"]
    services = {span.resource.attributes["service.name"]: span for span in recommend + retrieve
                if span.kind.name == "SERVER"}
    assert set(services) == {"ranking_server", "retrieval_server"}
    root = services["ranking_server"]
    assert root.parent is None
    stream = by_name["retrieval.stream"][0]  # the ranking server's client span of the Retrieve stream
    assert services["retrieval_server"].parent.span_id == stream.context.span_id, "retrieval is the child"
    assert stream.parent.span_id == root.context.span_id
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        span = by_name[name][0]
        assert span.parent.span_id == root.context.span_id
        assert span.attributes["request.id"].startswith("traced-1")
        assert span.attributes["ranking.mode"] == "score" and span.attributes["llm.prompt_tokens"] > 0
        assert span.attributes["llm.batch_size"] >= 1, "the running batch the request was part of"
    queue, prefill = by_name["engine.queue"][0], by_name["engine.prefill"][0]
    assert queue.end_time == prefill.start_time <= prefill.end_time


def test_a_callers_client_span_is_the_parent_of_the_servers(traced, tiny_llm_bundle):
    """What the Locust user's interceptor does (loadtest/grpc_user.py, not imported here: it turns gevent on
    for the whole process): a CLIENT span per call, its context put in the call's metadata by
    `tracing.with_trace_context`; the ranking server's Recommend span continues that trace under it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, ranking = traced
    caller = InMemorySpanExporter()
    tracer = tracing.tracer(tracing.tracer_provider("locust", exporter=caller), "locust")

    class Traced(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            with tracer.start_as_current_span("Recommend", kind=trace.SpanKind.CLIENT):
                return continuation(tracing.with_trace_context(details), request)

    users = json.loads(Bundle.open(tiny_llm_bundle).path("users").read_text())["users"]
    exporter.clear()
    with grpc.insecure_channel(ranking.server.address) as raw:
        ranking_pb2_grpc.RankingServiceStub(grpc.intercept_channel(raw, Traced())).Recommend(
            ranking_pb2.RecommendRequest(user_id=next(u for u, e in users.items() if e["history"]), k=2), timeout=60)
    (client,) = caller.get_finished_spans()
    server = next(s for s in exporter.get_finished_spans() if s.name == "Recommend")
    assert server.parent.span_id == client.context.span_id and server.context.trace_id == client.context.trace_id


def test_tracing_is_off_without_an_endpoint():
    assert tracing.tracer_provider("ranking_server", "") is None
    from opentelemetry import trace

    assert isinstance(tracing.tracer(None, "x"), trace.NoOpTracer) and tracing.context_metadata() == []


def test_a_server_failure_marks_its_span_as_an_error_and_a_callers_mistake_does_not(server_loop):
    """Spans of failed RPCs were closed without a status, so trace backends did not flag a server's INTERNAL."""
    import logging

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from palr.serving.config import ServerConfig
    from palr.serving.errors import RequestError
    from palr.serving.metrics import RpcMetrics
    from palr.serving.server import GrpcServer

    exporter = InMemorySpanExporter()
    tracer = tracing.tracer(tracing.tracer_provider("test", exporter=exporter), "test")
    rpc = RpcMetrics("test_traced", "Traced")

    async def handle(request: bytes, context) -> bytes:
        async with rpc.track(context, request.decode(), logging.getLogger(__name__), tracer):
            if request == b"refuse":
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "field: refused on purpose")
            if request == b"crash":
                raise ZeroDivisionError("a bug")
            return request

    async def make() -> GrpcServer:
        server = GrpcServer(ServerConfig(port=0), ["test.Traced"])
        server.grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Traced", {"Call": grpc.unary_unary_rpc_method_handler(handle)})])
        await server.start()
        return server

    server = server_loop.run(make())
    try:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.unary_unary("/test.Traced/Call")
            assert call(b"ok", timeout=10) == b"ok"
            for payload in (b"refuse", b"crash"):
                with pytest.raises(grpc.RpcError):
                    call(payload, timeout=10)
    finally:
        server_loop.run(server.drain())
    spans = {span.attributes["request.id"]: span for span in exporter.get_finished_spans()}
    assert {rid: span.attributes["rpc.grpc.status_code"] for rid, span in spans.items()} == {
        "ok": 0, "refuse": 3, "crash": 13}  # OpenTelemetry's gRPC conventions: the status code as an int
    assert spans["crash"].status.status_code == StatusCode.ERROR
    assert spans["ok"].status.status_code == spans["refuse"].status.status_code == StatusCode.UNSET


def test_a_degraded_answer_traces_the_llm_wait_it_gave_up_on_and_retrieval_traces_its_model(server_loop,
                                                                                             tiny_llm_bundle):
    """The deadline aborted the LLM: its wait, most of the request, showed as a gap in the trace (no engine span
    was made from timings the engine never reported). And the retrieval tier's wait for its model (queue + ONNX
    Runtime) is a span of its own."""
    import threading

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    retrieval = server_loop.serve(lambda: RetrievalServer(
        RetrievalServerConfig(bundle=tiny_llm_bundle, port=0),
        tracing.tracer_provider("retrieval_server", exporter=exporter)))
    ranking = server_loop.serve(lambda: RankingServer(
        RankingServerConfig(bundle=tiny_llm_bundle, retrieval=retrieval.server.address, port=0, degrade_reserve_ms=500,
                            answer_cache_size=0),  # the hf engine itself, no kept answers
        tracing.tracer_provider("ranking_server", exporter=exporter)))
    engine, gate = ranking.engine, threading.Event()

    def held(group, run=engine._prefill):  # the LLM held at its prompt pass until the answer is in
        gate.wait(30)
        return run(group)

    engine._prefill = held
    try:
        users = json.loads(Bundle.open(tiny_llm_bundle).path("users").read_text())["users"]
        user = next(u for u, e in users.items() if e["history"])
        exporter.clear()
        with grpc.insecure_channel(ranking.server.address) as channel:
            response = ranking_pb2_grpc.RankingServiceStub(channel).Recommend(
                ranking_pb2.RecommendRequest(user_id=user, k=2, request_id="traced-late"), timeout=2.0)
        gate.set()
        assert response.degraded and response.degraded_reason == "deadline"
        spans = {span.name: span for span in exporter.get_finished_spans()}
        root, wait = spans["Recommend"], spans["engine.wait"]
        assert wait.parent.span_id == root.context.span_id and "engine.prefill" not in spans
        assert wait.attributes["ranking.degraded_reason"] == "deadline"
        assert root.start_time <= wait.start_time < wait.end_time <= root.end_time  # one clock, inside the request
        model = spans["retrieval.model"]
        assert model.parent.span_id == spans["Retrieve"].context.span_id
        assert model.attributes["request.id"] == "traced-late"
    finally:
        gate.set()
        del engine._prefill
        server_loop.run(ranking.drain())
        server_loop.run(retrieval.drain())
