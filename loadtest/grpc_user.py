"""A Locust `User` that speaks gRPC, the way Locust's own gRPC example does it.

    class MyUser(GrpcUser):
        @task
        def ask(self):
            stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel(self.host))
            with self.rpc_errors_recorded():
                for message in stub.Retrieve(request, timeout=1.0):
                    ...

- `grpc.experimental.gevent.init_gevent()` runs on import, before any channel exists, so blocking
  gRPC calls yield to Locust's other greenlets instead of stalling the whole process.
- Every channel goes through `LocustInterceptor`, which fires Locust's `request` event once per
  call (request_type "grpc", the RPC's name, response time, response size in bytes, exception):
  unary calls are timed until the response arrived, server-streaming calls until the stream is
  fully drained (the interceptor drains it and hands the caller the messages it read).
- A failed call is recorded as `GrpcStatusError("DEADLINE_EXCEEDED: ...")`: the status code's
  name first, so Locust's failure table groups errors by code.
- Subclasses name requests (`request_name`, e.g. to split one RPC by mode) and may turn an OK
  response into a failure (`response_failure`, e.g. a degraded answer).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment

from palr.serving import tracing
from palr.serving.channels import open_channel

# gRPC's core must cooperate with gevent before the first channel is created.
grpc_gevent.init_gevent()


class GrpcStatusError(Exception):
    """A failed RPC as Locust records it: the status code name, then the server's details."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "GrpcStatusError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


class DrainedStream:
    """What a server-streaming call returns once the interceptor has read it to the end: its
    messages, then the call's error (if it failed) when iterated; the call's methods (`code()`,
    `trailing_metadata()`, ...) stay available."""

    def __init__(self, call: Any, messages: list[Any], error: grpc.RpcError | None):
        self._call = call
        self.messages = messages
        self.error = error

    def __iter__(self) -> Iterator[Any]:
        yield from self.messages
        if self.error is not None:
            raise self.error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def rpc_name(method: str | bytes) -> str:
    """"/recsys.v1.RankingService/Recommend" → "Recommend"."""
    method = method.decode() if isinstance(method, bytes) else method
    return method.rsplit("/", 1)[-1]


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Fires Locust's `request` event for every unary and server-streaming call on its channel; with a
    `tracer` (the locustfile's --otlp-endpoint) each call is a CLIENT span whose W3C trace context travels
    in the call's metadata, so the servers' spans of that call are its children."""

    def __init__(self, environment: Environment,
                 name_of: Callable[[str, Any], str] = lambda method, request: method,
                 failure_of: Callable[[str, Any], Exception | None] = lambda method, response: None,
                 tracer=None):
        self.environment = environment
        self.name_of = name_of
        self.failure_of = failure_of
        self.tracer = tracer or tracing.tracer(None, "locust")

    def intercept_unary_unary(self, continuation, client_call_details, request):
        from opentelemetry import trace

        with self.tracer.start_as_current_span(rpc_name(client_call_details.method), kind=trace.SpanKind.CLIENT):
            return self._unary_unary(continuation, tracing.with_trace_context(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        from opentelemetry import trace

        with self.tracer.start_as_current_span(rpc_name(client_call_details.method), kind=trace.SpanKind.CLIENT):
            return self._unary_stream(continuation, tracing.with_trace_context(client_call_details), request)

    def _unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        try:
            response = call.result()  # blocks this greenlet only (init_gevent)
        except grpc.RpcError as e:
            self._fire(client_call_details, request, started, None, 0, GrpcStatusError.from_rpc_error(e))
        else:
            self._fire(client_call_details, request, started, response, response.ByteSize(), None)
        return call

    def _unary_stream(self, continuation, client_call_details, request):
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        messages, size, error = [], 0, None
        try:
            for message in call:
                messages.append(message)
                size += message.ByteSize()
        except grpc.RpcError as e:
            error = e
        self._fire(client_call_details, request, started, messages, size,
                   GrpcStatusError.from_rpc_error(error) if error is not None else None)
        return DrainedStream(call, messages, error)

    def _fire(self, details, request, started: float, response: Any, size: int, error: Exception | None) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        method = rpc_name(details.method)
        if error is None:
            error = self.failure_of(method, response)
        self.environment.events.request.fire(
            request_type="grpc", name=self.name_of(method, request), response_time=elapsed_ms,
            response_length=size, response=response, context={}, exception=error)


class GrpcUser(User):
    """Base class for Locust users calling gRPC services: one intercepted channel per target.

    `self.host` is Locust's `--host` (HOST:PORT, no scheme). TLS: set `tls_ca` (and `tls_cert` +
    `tls_key` for mutual TLS) as for `palr.serving.channels.open_channel`.
    """

    abstract = True
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tracer = None  # an OpenTelemetry tracer (palr.serving.tracing): each call a CLIENT span; None: off

    def __init__(self, environment: Environment):
        super().__init__(environment)
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, target: str) -> grpc.Channel:
        """This user's channel to `target`, created on first use, every call reported to Locust."""
        if target not in self._channels:
            raw = open_channel(target, tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key, aio=False)
            interceptor = LocustInterceptor(self.environment, self.request_name, self.response_failure, self.tracer)
            self._channels[target] = grpc.intercept_channel(raw, interceptor)
        return self._channels[target]

    def request_name(self, method: str, request: Any) -> str:
        """The name Locust files this call under (and SLO files refer to): the RPC's name."""
        return method

    def response_failure(self, method: str, response: Any) -> Exception | None:
        """An OK response that must still count as a failure, or None."""
        return None

    @contextlib.contextmanager
    def rpc_errors_recorded(self) -> Iterator[None]:
        """For task code: a failed call is already in Locust's stats, so its RpcError ends the task
        quietly instead of being logged again as an unhandled exception."""
        with contextlib.suppress(grpc.RpcError):
            yield

    def on_stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
