"""Server interceptors shared by both servers (installed by `palr.serving.GrpcServer`).

`ParseErrorInterceptor`: a request body that does not parse as the method's protobuf message
(random bytes, a message of another schema cut short) is the caller's error. Left to grpc.aio,
the deserializer's `DecodeError` is answered UNKNOWN, which callers and meshes read as a server
bug; here it is answered INVALID_ARGUMENT, "request body did not parse as recsys.v1.<Message>",
counted in `recsys_unparsable_requests_total{method}` (the servicer, and so its own
`*_requests_total`, never sees it), and the server keeps serving.

How: each unary-request method handler gets a deserializer that returns a marker instead of
raising, and a behavior that aborts on that marker before the servicer sees it. Handlers with
streaming requests (reflection) are left as they are.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from palr.serving.errors import REQUEST_ID_KEY, request_id
from palr.serving.validation import loggable_request_id

log = logging.getLogger(__name__)

UNPARSABLE = Counter("recsys_unparsable_requests", "request bodies that did not parse as the method's message, "
                     "answered INVALID_ARGUMENT before any servicer saw them", ["method"])


class Unparsed:
    """What the wrapped deserializer returns for a body that is not a valid message."""

    __slots__ = ("message_name", "error", "size")

    def __init__(self, message_name: str, error: Exception, size: int):
        self.message_name, self.error, self.size = message_name, error, size

    def detail(self) -> str:
        return (f"request body ({self.size} bytes) did not parse as {self.message_name}: "
                f"{type(self.error).__name__}; send a serialized {self.message_name}")


def message_name(method: str, deserializer: Callable) -> str:
    """The full name of a method's request message, e.g. 'recsys.v1.RecommendRequest'."""
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    if descriptor is not None and hasattr(descriptor, "full_name"):
        return descriptor.full_name
    try:  # '/recsys.v1.RankingService/Recommend'
        service, name = method.lstrip("/").rsplit("/", 1)
        return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name].input_type.full_name
    except (KeyError, ValueError, AttributeError):
        return "the method's request message"


def _safe(deserializer: Callable, name: str, method: str) -> Callable[[bytes], Any]:
    unparsable = UNPARSABLE.labels(method)

    def deserialize(body: bytes) -> Any:
        try:
            return deserializer(body)
        except DecodeError as e:
            unparsable.inc()
            return Unparsed(name, e, len(body))
    return deserialize


def _guarded(behavior: Callable) -> Callable:
    """`behavior` that aborts with INVALID_ARGUMENT when its request did not parse; same kind
    (coroutine or async generator) as the original, so grpc.aio drives it the same way."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, Unparsed):
                await _abort(request, context)
            async for response in behavior(request, context):
                yield response
        return stream

    if inspect.iscoroutinefunction(behavior):
        async def unary(request, context):
            if isinstance(request, Unparsed):
                await _abort(request, context)
            return await behavior(request, context)
        return unary

    def sync(request, context):  # a synchronous servicer method (run in grpc's thread pool)
        if isinstance(request, Unparsed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail(), _logged_rid(request, context))
        return behavior(request, context)
    return sync


async def _abort(request: Unparsed, context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail(), _logged_rid(request, context))


def _logged_rid(request: Unparsed, context) -> tuple[tuple[str, str], ...]:
    """Logs the refusal under the request id (the caller's `x-request-id`, else a new one; the body that would
    carry one did not parse) and returns it as the answer's trailing metadata, as `RpcMetrics.track` does."""
    rid, _ = loggable_request_id(request_id("", context))
    log.info("rid=%s INVALID_ARGUMENT: %s", rid, request.detail())
    return ((REQUEST_ID_KEY, rid),)


class ParseErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers an unparsable request body INVALID_ARGUMENT naming the message (see the module doc)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method → (its handler, the guarded one)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler_call_details.method, handler)
        self._wrapped[handler_call_details.method] = (handler, guarded)
        return guarded

    @staticmethod
    def _guard(method: str, handler):
        name = message_name(method, handler.request_deserializer)
        deserializer = _safe(handler.request_deserializer, name, method)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream), deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary), deserializer,
                                                   handler.response_serializer)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What `GrpcServer` installs on every grpc.aio server it makes."""
    return [ParseErrorInterceptor()]
