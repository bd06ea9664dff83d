"""The `Retrieve` RPC: validate, resolve the history, ask SASRec (or popularity), stream in chunks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Sequence

import grpc
import numpy as np

from palr.catalog import Catalog
from palr.serving import tracing
from palr.serving.errors import QUEUE_FULL, RequestError, check_known_ids, invalid_argument, request_id
from palr.serving.validation import REQUEST_ID_RULE, check_item_id_count, check_user_id, loggable_request_id
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval_server.batcher import RunnerStopped
from retrieval_server.metrics import COLD_STARTS, MODEL_WAITING, RETRIEVE, TRUNCATED
from palr.sasrec_onnx import Query, Ranked

log = logging.getLogger(__name__)

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


@dataclass(frozen=True)
class Plan:
    """A validated request in item indices."""

    history: list[int]  # all of it, oldest first (the model reads the last max_len)
    exclude: list[int]  # history + the request's exclude, deduplicated
    k: int
    chunk_size: int
    source: str  # where the history came from: "request", "stored" or "none" (cold start)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, catalog: Catalog, stored_histories: dict[str, list[int]], *, max_len: int, max_k: int,
                 chunk_size: int, model_version: str, max_queue: int = 0, max_message_bytes: int = 0, tracer=None):
        self.catalog = catalog
        self.max_message_bytes = max_message_bytes  # the server's send limit (0: none): no message is made bigger
        self.tracer = tracer or tracing.tracer(None, "retrieval_server")  # palr.serving.tracing (no-op: tracing off)
        self.stored_histories = stored_histories
        self.max_len = max_len
        self.max_k = max_k
        self.chunk_size = chunk_size
        self.model_version = model_version
        self.max_queue = max_queue  # requests waiting for the model at once (0: no limit)
        self._waiting = 0
        MODEL_WAITING.set_function(lambda: self._waiting)  # the newest servicer's (one per process; tests make more)
        self._item_ids = [""] + [item.id for item in catalog.items]  # index → id (0 = padding)
        total = sum(item.train_count for item in catalog.items) or 1
        self._popularity_share = np.array([0.0] + [item.train_count / total for item in catalog.items],
                                          dtype=np.float32)  # [num_indices]
        self._popularity_order = catalog.popularity_order()
        self._model: Callable[[Query, float | None], Awaitable[Ranked]] | None = None

    def attach(self, model: Callable[[Query, float | None], Awaitable[Ranked]]) -> None:
        """Connects the warmed-up model (called with the query and the caller's deadline on time.monotonic(), or
        None); until then Retrieve answers UNAVAILABLE."""
        self._model = model

    async def Retrieve(self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext) -> None:
        rid, rid_ok = loggable_request_id(request_id(request.request_id, context))
        async with RETRIEVE.track(context, rid, log, self.tracer):
            if not rid_ok:
                raise invalid_argument(REQUEST_ID_RULE)
            await self._retrieve(request, context, rid)

    async def _ask_model(self, query: Query, deadline: float | None) -> Ranked:
        """The model's answer, or RESOURCE_EXHAUSTED at once when `max_queue` requests already wait for it:
        under overload a caller learns it now and can go elsewhere, instead of waiting out its deadline. A
        runner that has stopped (its loop died; the server is closing) is UNAVAILABLE, the code callers' channels
        retry on another replica (it was INTERNAL, which none retries)."""
        if self.max_queue and self._waiting >= self.max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self._waiting} requests already wait for the model (--max-queue {self.max_queue}); "
                               f"retry later or elsewhere", trailing_metadata=(QUEUE_FULL,))
        self._waiting += 1
        try:
            return await self._model(query, deadline)
        except RunnerStopped as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{e}; this replica cannot run the model, retry on "
                                                            f"another") from None
        finally:
            self._waiting -= 1

    async def _retrieve(self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext,
                        rid: str) -> None:
        started = time.perf_counter()
        plan = self.plan(request)  # first: a malformed request is INVALID_ARGUMENT anywhere, not worth a retry
        if self._model is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health is SERVING")
        if plan.history:
            remaining = context.time_remaining()  # None: the caller set no deadline
            # a full queue's refusal is the caller's to retry, not a server error (as on the SERVER span)
            with self.tracer.start_as_current_span("retrieval.model", attributes={"request.id": rid},
                                                   record_exception=False, set_status_on_exception=False):
                ranked = await self._ask_model(Query(history=plan.history, exclude=plan.exclude, k=plan.k),
                                               None if remaining is None else time.monotonic() + remaining)
        else:
            ranked = self.popular(plan.exclude, plan.k)
        truncated = len(plan.history) > self.max_len
        # Headers go out with the first message: a failure before it (e.g. UNAVAILABLE while loading) is one the
        # ranking server's client may retry; sending headers earlier would commit the call and end its retries.
        for message in self.messages(ranked, plan.chunk_size, cold_start=not plan.history,
                                     history_length=min(len(plan.history), self.max_len),
                                     history_truncated=truncated):
            await context.write(message)
        if not plan.history:  # counted once answered: a call cancelled mid-stream was not
            COLD_STARTS.inc()
        if truncated:
            TRUNCATED.inc()
        log.debug("rid=%s user=%r", rid, request.user_id)  # who asked: a user id, kept out of INFO logs
        log.info("rid=%s history=%d (%s)%s k=%d -> %d candidates in %.1f ms", rid, len(plan.history), plan.source, " truncated" if truncated else "", plan.k, len(ranked.indices),
                 (time.perf_counter() - started) * 1e3)

    def plan(self, request: retrieval_pb2.RetrieveRequest) -> Plan:
        """Validates the request (INVALID_ARGUMENT naming the field) and resolves its history:
        explicit `history` wins, else the user's stored history, else none (cold start)."""
        check_user_id(request.user_id)
        if not 1 <= request.k <= self.max_k:
            raise invalid_argument(f"k must be between 1 and {self.max_k}, got {request.k}")
        if request.chunk_size < 0:
            raise invalid_argument(f"chunk_size must be >= 0 (0 = server default), got {request.chunk_size}")
        history = self._indices("history", request.history)
        exclude = self._indices("exclude", request.exclude)
        source = "request"
        if not history:
            history = self.stored_histories.get(request.user_id, [])
            source = "stored" if history else "none"
        return Plan(history=history, exclude=list(dict.fromkeys([*history, *exclude])), k=request.k,
                    chunk_size=request.chunk_size or self.chunk_size, source=source)

    def popular(self, exclude: Sequence[int], k: int) -> Ranked:
        """Cold start: the k most popular items not excluded, scored by their share of interactions."""
        excluded = set(exclude)
        top = []
        for index in self._popularity_order:
            if index not in excluded:
                top.append(index)
                if len(top) == k:
                    break
        indices = np.array(top, dtype=np.int64)  # [n]
        return Ranked(indices=indices, scores=self._popularity_share[indices])

    def messages(self, ranked: Ranked, chunk_size: int, **flags) -> Iterator[retrieval_pb2.RetrieveResponse]:
        """Chunks of `chunk_size` candidates in rank order (fewer where a chunk would pass the server's message
        limit: gRPC would fail the call with RESOURCE_EXHAUSTED after the first messages); at least one message,
        so the flags and model version arrive even when nothing is left to recommend."""
        ids = [self._item_ids[i] for i in ranked.indices.tolist()]
        scores = ranked.scores.tolist()
        for start in range(0, max(len(ids), 1), chunk_size):
            candidates = [retrieval_pb2.Candidate(item_id=ids[rank], score=scores[rank], rank=rank)
                          for rank in range(start, min(start + chunk_size, len(ids)))]
            yield from self._within_limit(candidates, flags)

    def largest_one_candidate_message(self) -> int:
        """Bytes of the biggest message of one candidate this servicer can send (the longest item id, every flag
        set): a `max_message_bytes` below it would fail some answers midway (`_within_limit` cannot split one)."""
        longest = max(self._item_ids, key=lambda item_id: len(item_id.encode()))
        message = retrieval_pb2.RetrieveResponse(
            candidates=[retrieval_pb2.Candidate(item_id=longest, score=1.0, rank=self.max_k - 1)],
            model_version=self.model_version, cold_start=True, history_length=self.max_len, history_truncated=True)
        return message.ByteSize()

    def _within_limit(self, candidates: list, flags: dict) -> Iterator[retrieval_pb2.RetrieveResponse]:
        """One message of `candidates`, or halves of it until each fits `max_message_bytes`."""
        message = retrieval_pb2.RetrieveResponse(candidates=candidates, model_version=self.model_version, **flags)
        if not self.max_message_bytes or message.ByteSize() <= self.max_message_bytes:
            yield message
        elif len(candidates) <= 1:  # nothing left to split
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"one candidate's message is {message.ByteSize()} bytes, over --max-message-bytes "
                               f"{self.max_message_bytes}")
        else:
            half = len(candidates) // 2
            yield from self._within_limit(candidates[:half], flags)
            yield from self._within_limit(candidates[half:], flags)

    def _indices(self, field_name: str, item_ids: Sequence[str]) -> list[int]:
        check_item_id_count(field_name, item_ids)
        check_known_ids(field_name, item_ids, self.catalog)
        return self.catalog.indices(item_ids)
