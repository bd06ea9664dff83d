"""OpenTelemetry traces across both tiers, off unless asked for.

`--otlp-endpoint URL` (both servers) exports spans over OTLP/gRPC to a collector (an OpenTelemetry
Collector, Jaeger, ...; see docs/tracing.md). Each server has its own TracerProvider (service.name
= the server), passed explicitly, never installed globally, so two servers in one process (the tests)
stay apart. Propagation is done here, in the two places every RPC passes: the per-RPC wrapper of both
servers opens a SERVER span whose parent comes from the caller's W3C `traceparent` metadata
(`server_span`, from `RpcMetrics.track`), and the ranking server's Retrieve call carries its current span
that way (`context_metadata`). (opentelemetry-instrumentation-grpc's aio interceptors were tried: they
expect streaming handlers to be async generators, and our handlers write with `context.write`.) With no
endpoint (the default) there is no provider, no
interceptor and no span: nothing is paid per request.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc


def tracer_provider(service: str, endpoint: str = "", exporter: Any = None):
    """A provider exporting to `endpoint` (OTLP/gRPC, batched) or to `exporter` (synchronously; tests pass
    an InMemorySpanExporter); None when neither is given (tracing off)."""
    if not endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


@contextlib.contextmanager
def server_span(tracer_, rpc: str, context, request_id: str):
    """The SERVER span of one RPC, a child of the caller's span when its metadata carries W3C trace context;
    current while the handler runs (the no-op tracer makes it free when tracing is off)."""
    from opentelemetry import propagate, trace

    parent = propagate.extract({k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)})
    with tracer_.start_as_current_span(rpc, context=parent, kind=trace.SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "request.id": request_id}) as span:
        yield span


# the codes a SERVER span reports as errors (OpenTelemetry's gRPC conventions): the server's failures, not the
# caller's mistakes (INVALID_ARGUMENT, NOT_FOUND, ...), which leave the status unset
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS"})


def end_status(span, code_name: str) -> None:
    """The RPC's final gRPC code on its SERVER span: the attribute always, ERROR status for a server failure (a
    trace backend then flags it)."""
    from opentelemetry import trace

    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code_name].value[0])  # the int, as the conventions say
    if code_name in SERVER_ERROR_CODES:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code_name))


def context_metadata() -> list[tuple[str, str]]:
    """The current span's W3C trace context (`traceparent`, `tracestate`) as gRPC metadata; [] when no
    span is recording (tracing off)."""
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def with_trace_context(details):
    """Sync gRPC client call `details` plus the current span's trace context in the metadata (unchanged when
    none is recording): what the Locust user's interceptor sends (loadtest/grpc_user.py)."""
    import collections

    import grpc

    extra = context_metadata()
    if not extra:
        return details

    class CallDetails(collections.namedtuple("CallDetails", ("method", "timeout", "metadata", "credentials",
                                                             "wait_for_ready", "compression")),
                      grpc.ClientCallDetails):
        pass

    return CallDetails(details.method, details.timeout, [*(details.metadata or ()), *extra], details.credentials,
                       getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


def tracer(provider, name: str):
    """The provider's tracer, or OpenTelemetry's no-op tracer when tracing is off."""
    from opentelemetry import trace

    return provider.get_tracer(name) if provider is not None else trace.NoOpTracer()


def add_stage_spans(tracer_, submitted_ns: int, timings, attributes: dict[str, Any]) -> None:
    """The engine's queue wait, prefill and decode as child spans of the current span, from the timings
    the engine measured (`EngineTimings`, ms from submission), with the request's attributes."""
    start = submitted_ns
    for name, ms in (("engine.queue", timings.queue_ms), ("engine.prefill", timings.prefill_ms),
                     ("engine.decode", timings.decode_ms)):
        end = start + int(ms * 1e6)
        span = tracer_.start_span(name, start_time=start, attributes=attributes)
        span.end(end_time=end)
        start = end
