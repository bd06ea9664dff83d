"""The ranking server's client of the retrieval tier: one long-lived channel, a server-streaming
`Retrieve` per request consumed chunk by chunk, the caller's deadline and request id passed on,
and the retrieval tier's failures turned into the status our caller should see."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palr.serving import tracing
from palr.serving.channels import open_channel
from palr.serving.metrics import CERT_EXPIRY

from palr.serving.errors import QUEUE_FULL, REQUEST_ID_KEY, RequestError
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from ranking_server.config import RankingServerConfig
from ranking_server.metrics import RETRIEVAL_QUEUE_FULL_RETRIES

log = logging.getLogger(__name__)

RETRIEVAL_SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
RETRIEVE_METHOD = f"{RETRIEVAL_SERVICE}/Retrieve"


def _queue_full(error: grpc.aio.AioRpcError) -> bool:
    """A replica's refusal for a full queue (palr.serving.errors.QUEUE_FULL), which another replica may not share."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL in tuple(error.trailing_metadata() or ())


class RetrievalClient:
    def __init__(self, config: RankingServerConfig, max_message_bytes: int | None = None):
        """`max_message_bytes`: the channel's limit each way (default: the server's own `--max-message-bytes`)."""
        self.target = config.retrieval
        self.channel = open_channel(config.retrieval, tls_ca=config.retrieval_tls_ca,
                                    tls_cert=config.retrieval_tls_cert, tls_key=config.retrieval_tls_key,
                                    max_message_bytes=max_message_bytes or config.max_message_bytes,
                                    load_balancing=config.retrieval_lb, aio=True,
                                    retry_methods=[RETRIEVE_METHOD], max_attempts=config.retrieval_attempts,
                                    health_service=RETRIEVAL_SERVICE,  # round_robin skips replicas NOT_SERVING
                                    tls_flags=("--retrieval-tls-ca", "--retrieval-tls-cert", "--retrieval-tls-key"),
                                    on_certificate=CERT_EXPIRY.labels("client").set)
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)
        self.chunk_size = config.retrieval_chunk_size
        # under pick_first a retry would reach the replica that just refused
        self.queue_full_retries = config.retrieval_queue_full_retries if config.retrieval_lb == "round_robin" else 0

    async def unreachable(self, timeout_s: float = 5.0) -> str | None:
        """None when the retrieval tier's health says SERVING through this channel (the address, TLS and
        certificates Retrieve uses), or when it answers without a health service (reached all the same); else what
        stands in the way."""
        try:
            answer = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=RETRIEVAL_SERVICE), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            return None if e.code() == grpc.StatusCode.UNIMPLEMENTED else f"{e.code().name}: {e.details()}"
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return f"its health says {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
        return None

    async def stream(self, request: retrieval_pb2.RetrieveRequest, timeout: float
                     ) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        """Yields the retrieval stream's messages as they arrive. `timeout` (seconds) is what is left
        of the caller's deadline; the request id travels in the request and as `x-request-id`. A refusal for
        a full queue before any answer is sent again (`queue_full_retries` times: round_robin's next pick)."""
        request.chunk_size = request.chunk_size or self.chunk_size
        # the current span (the servicer's retrieval.stream) travels as W3C trace context in the metadata
        metadata = ((REQUEST_ID_KEY, request.request_id), *tracing.context_metadata())
        deadline = time.monotonic() + timeout
        refusals = 0
        while True:
            left = deadline - time.monotonic()
            call = self.stub.Retrieve(request, timeout=left, metadata=metadata)
            answered = False
            try:
                async for message in call:
                    answered = True
                    yield message
                return
            except grpc.aio.AioRpcError as e:
                if (not answered and refusals < self.queue_full_retries and _queue_full(e)
                        and time.monotonic() < deadline):
                    refusals += 1
                    RETRIEVAL_QUEUE_FULL_RETRIES.inc()
                    log.info("rid=%s retrieval replica's queue is full; sending the Retrieve again (%d of %d)",
                             request.request_id, refusals, self.queue_full_retries)
                    continue
                raise self._error(e, timeout) from None
            finally:
                call.cancel()  # no-op when the stream ended; stops the server's work when we stop early

    def _error(self, error: grpc.aio.AioRpcError, timeout: float) -> RequestError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RequestError(code, f"retrieval server {self.target} did not answer within the "
                                      f"{timeout * 1e3:.0f} ms left of the deadline")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a full queue (its mark passed on) or a message too large
            return RequestError(code, f"retrieval server {self.target} refused the request: {details}",
                                trailing_metadata=(QUEUE_FULL,) if _queue_full(error) else ())
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # this tier checked every field it sends by the same rules, so the tiers disagree (e.g. the retrieval
            # server's --max-k below our num_candidates, different bundles): not the caller's fault
            return RequestError(grpc.StatusCode.INTERNAL, f"retrieval server {self.target} refused a request this "
                                f"server accepted ({details}): the two tiers' settings or bundles disagree")
        return RequestError(grpc.StatusCode.UNAVAILABLE,
                            f"retrieval server {self.target} unavailable ({code.name}: {details})")

    async def close(self) -> None:
        await self.channel.close()
