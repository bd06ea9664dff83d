"""The ranking server's client of the retrieval tier: one long-lived channel, a server-streaming
`Retrieve` per request consumed chunk by chunk, the caller's deadline and request id passed on,
and the retrieval tier's failures turned into the status our caller should see."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from palr.serving import tracing
from palr.serving.channels import open_channel

from palr.serving.errors import RequestError
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from ranking_server.config import RankingServerConfig

log = logging.getLogger(__name__)

# Statuses the caller gets as they are (with the retrieval tier named): they describe its request
# or its deadline. Any other failure means the retrieval tier cannot serve us now: UNAVAILABLE.
PASSED_THROUGH = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
RETRIEVAL_SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
RETRIEVE_METHOD = f"{RETRIEVAL_SERVICE}/Retrieve"


class RetrievalClient:
    def __init__(self, config: RankingServerConfig):
        self.target = config.retrieval
        self.channel = open_channel(config.retrieval, tls_ca=config.retrieval_tls_ca,
                                    tls_cert=config.retrieval_tls_cert, tls_key=config.retrieval_tls_key,
                                    max_message_bytes=config.max_message_bytes,
                                    load_balancing=config.retrieval_lb, aio=True,
                                    retry_methods=[RETRIEVE_METHOD], max_attempts=config.retrieval_attempts,
                                    health_service=RETRIEVAL_SERVICE)  # round_robin skips replicas NOT_SERVING
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)
        self.chunk_size = config.retrieval_chunk_size

    async def stream(self, request: retrieval_pb2.RetrieveRequest, timeout: float
                     ) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        """Yields the retrieval stream's messages as they arrive. `timeout` (seconds) is what is left
        of the caller's deadline; the request id travels in the request and as `x-request-id`."""
        request.chunk_size = request.chunk_size or self.chunk_size
        # the current span (the servicer's retrieval.stream) travels as W3C trace context in the metadata
        metadata = (("x-request-id", request.request_id), *tracing.context_metadata())
        call = self.stub.Retrieve(request, timeout=timeout, metadata=metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as e:
            raise self._error(e, timeout) from None
        finally:
            call.cancel()  # no-op when the stream ended; stops the server's work when we stop early

    def _error(self, error: grpc.aio.AioRpcError, timeout: float) -> RequestError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RequestError(code, f"retrieval server {self.target} did not answer within the "
                                      f"{timeout * 1e3:.0f} ms left of the deadline")
        if code in PASSED_THROUGH:
            return RequestError(code, f"retrieval server {self.target} refused the request: {details}")
        return RequestError(grpc.StatusCode.UNAVAILABLE,
                            f"retrieval server {self.target} unavailable ({code.name}: {details})")

    async def close(self) -> None:
        await self.channel.close()
