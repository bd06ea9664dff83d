"""The `Recommend` RPC, start to end. A request:

  1. enters `Recommend`: request id, deadline (the caller's, or --default-deadline-ms), validation;
  2. streams candidates from the retrieval tier (`RetrievalClient.stream`), turning each chunk into
     catalog items and tokenized title lines as it arrives, with what is left of the deadline as its
     timeout (the linear term's order is the degraded answer, so a deadline shorter than
     --degrade-reserve-ms still gets it, without the LLM);
  3. cold start (no history): answers the popularity candidates as they are (the LLM would see no
     user at all: no history, no profile); one candidate (or none) is answered as it is too: there is
     nothing to order;
  4. WAITS in the engine: `await engine.rank(...)` queues for a batch slot, then the MODEL RUNS on
     the engine thread (`ranking_server/engines/hf.py`), bounded by what is left of the deadline;
  5. fuses the LLM's scores with the retrieval scores (`palr.ranking`, as the evaluation does) and
     answers the top k with per-stage timings.

When the deadline nears first, the engine request is aborted (its batch slot freed) and the answer
is the order of the ranker's linear term (retrieval + trend + EASE, no LLM) flagged `degraded`; an engine
that fails degrades the same way. A full queue
is RESOURCE_EXHAUSTED at once; a client that cancels aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from palr.catalog import Item
from palr.serving.errors import QUEUE_FULL, RequestError, invalid_argument, request_id
from palr.serving import tracing
from palr.serving.metrics import Answered
from palr.serving.validation import REQUEST_ID_RULE, loggable_request_id
from ranking_server.config import RankingServerConfig
from ranking_server.inject import injected_delay_s
from ranking_server.engines.base import EngineError, EngineOverloaded, InvalidRequest, RankingEngine
from ranking_server.metrics import (
    ANSWER_SECONDS, BUILD, COLD_STARTS, DEGRADED, RECOMMEND, REJECTED, RETRIEVAL_DROPPED, RETRIEVAL_MODEL_MISMATCH,
    STAGE_SECONDS)
from ranking_server.planner import Plan, RequestPlanner, retrieval_lists
from ranking_server.prompts import PromptBuilder
from ranking_server.retrieval_client import RetrievalClient
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
RETRIEVAL_REJECTIONS = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
                        grpc.StatusCode.UNAVAILABLE: "retrieval_unavailable"}


async def within(awaitable, budget_s: float):
    """`awaitable`'s result, or asyncio.TimeoutError after `budget_s` (it is cancelled then). Python 3.11's
    `asyncio.wait_for` returned the result of an inner call that had just finished when its own task was cancelled
    (the caller's cancel, or the server's stop), so a handler whose client had gone went on and was counted OK;
    `asyncio.timeout` (3.11+) lets the cancel through. On Python 3.10, which has no asyncio.timeout, the race
    stays (wait_for's own)."""
    if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(awaitable, budget_s)
    async with asyncio.timeout(budget_s):
        return await awaitable


def retrieval_rejection(error: RequestError) -> str:
    """The `ranking_rejected` reason of a failed Retrieve: a replica's full queue (RESOURCE_EXHAUSTED marked
    `QUEUE_FULL`: overload) apart from what else fails, e.g. a message over its size limit (unmarked) or tiers
    that disagree (`retrieval_error`: a configuration to mend)."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and QUEUE_FULL in error.trailing_metadata:
        return "retrieval_queue_full"
    return RETRIEVAL_REJECTIONS.get(error.code, "retrieval_error")


@dataclass
class Retrieved:
    """The retrieval stream, gathered chunk by chunk."""

    items: list[Item] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    cold_start: bool = False
    model_version: str = ""


class CandidateScreen:
    """What the ranking tier takes from a retrieval stream: at most `num_candidates` items, each once, none of the
    request's history or exclusions. A retrieval tier of this bundle never sends others; one of another bundle or
    version (a rolling update, a higher --max-k) can, and an excluded item answered, a duplicate ranked twice or a
    27th candidate (no label for it: INTERNAL) would reach the caller. What only such a tier sends is counted, and
    warned about once per reason. A stored history longer than a request's fields hold (`retrieval_lists`) leaves
    its oldest items unsent, which a tier of this bundle may return: dropped too, not counted."""

    def __init__(self, plan: Plan, sent_history: list[str], sent_exclude: list[str]):
        self.limit = plan.num_candidates
        self.barred = set(sent_history) | set(sent_exclude)
        self.unsent = set(plan.history) - self.barred
        self.seen: set[str] = set()
        self.dropped: Counter[str] = Counter()

    def keep(self, candidates: list[tuple[str, float]]) -> list[tuple[str, float]]:
        kept = []
        for item_id, score in candidates:
            reason = ("history_or_excluded" if item_id in self.barred else "unsent_history" if item_id in self.unsent
                      else "duplicate" if item_id in self.seen else
                      "over_num_candidates" if len(self.seen) >= self.limit else "")
            if reason:
                self.dropped[reason] += 1
                continue
            self.seen.add(item_id)
            kept.append((item_id, score))
        return kept

    def report(self, request_id: str, warned: set[str]) -> None:
        for reason, n in self.dropped.items():
            if reason == "unsent_history":
                log.debug("rid=%s dropped %d candidates from the history older than the request sent", request_id, n)
                continue
            RETRIEVAL_DROPPED.labels(reason).inc(n)
            if reason not in warned:
                warned.add(reason)
                log.warning("rid=%s dropped %d retrieval candidates (%s): the retrieval tier serves another bundle or "
                            "settings; counted in ranking_retrieval_candidates_dropped, warned about once",
                            request_id, n, reason)


@dataclass
class Answer:
    """What the response reports besides the items."""

    ranking: list[tuple[int, float]]  # (candidate position, score), best first
    queue_ms: float = 0.0
    ranking_ms: float = 0.0
    degraded_reason: str = ""
    reused: bool = False  # the engine's kept answer to an identical earlier request (or to one running then)
    source: str = "model"  # how it was answered: `ranking_server.metrics.ANSWER_SOURCES` ("model" includes a
    # request that joined an identical one's run: it waited for that run's slot and passes)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, config: RankingServerConfig, planner: RequestPlanner, retrieval: RetrievalClient,
                 bundle_versions: str, tracer=None, retrieval_model: str | None = None):
        self.config = config
        self.tracer = tracer or tracing.tracer(None, "ranking_server")  # no-op unless --otlp-endpoint
        self.planner = planner
        self.retrieval = retrieval
        self.bundle_versions = bundle_versions  # "llm:<merged> ranker:<ranker.json>": what the bundle ranks with
        self.retrieval_model = retrieval_model  # the bundle's sasrec_onnx version: the SASRec the ranker was fit on
        self._other_models: set[str] = set()  # retrieval model versions already warned about
        self._dropped_warned: set[str] = set()  # reasons for dropping retrieval candidates already warned about
        self.model_version = ""  # the answers': sasrec's version (per answer) goes first, then these and the engine's
        self.engine: RankingEngine | None = None
        self.prompts: PromptBuilder | None = None
        self._engine_ids = itertools.count()
        self._injected_delay_s = injected_delay_s()  # test-only (RANKING_INJECT_DELAY_MS), 0 by default

    def attach(self, engine: RankingEngine | None, prompts: PromptBuilder | None) -> None:
        """Connects the warmed-up engine and the prompt builder (its tokenizer); until then (and after
        `attach(None, None)` at shutdown) Recommend answers UNAVAILABLE."""
        self.engine, self.prompts = engine, prompts
        if engine is not None:  # requests still answering after the detach at shutdown keep naming it
            self.model_version = self.bundle_versions + (f" engine:{engine.version}" if engine.version else "")
            BUILD.info({"models": self.model_version})

    async def Recommend(self, request: ranking_pb2.RecommendRequest,
                        context: grpc.aio.ServicerContext) -> ranking_pb2.RecommendResponse:
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = started + (remaining if remaining is not None else self.config.default_deadline_ms / 1e3)
        rid, rid_ok = loggable_request_id(request_id(request.request_id, context))
        async with RECOMMEND.track(context, rid, log, self.tracer) as answered:
            if not rid_ok:
                REJECTED.labels("invalid_argument").inc()
                raise invalid_argument(REQUEST_ID_RULE)
            response = await self._recommend(request, rid, started, deadline, answered)
            if self._injected_delay_s:
                await asyncio.sleep(self._injected_delay_s)
        return response

    async def _recommend(self, request: ranking_pb2.RecommendRequest, rid: str, started: float,
                         deadline: float, answered: Answered) -> ranking_pb2.RecommendResponse:
        try:  # first: a malformed request is INVALID_ARGUMENT on any replica, not worth a retry elsewhere
            plan = self.planner.plan(request, rid)
        except RequestError as e:
            REJECTED.labels("out_of_range" if e.code == grpc.StatusCode.OUT_OF_RANGE else "invalid_argument").inc()
            raise
        if self.engine is None:
            REJECTED.labels("loading").inc()
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health is SERVING")
        with self.tracer.start_as_current_span("retrieval.stream", kind=trace.SpanKind.CLIENT,
                                               attributes={"request.id": plan.request_id,
                                                           "rpc.service": "recsys.v1.RetrievalService"}):
            retrieved = await self._retrieve(plan, deadline)
        retrieval_ms = 1e3 * (time.perf_counter() - started)
        k = min(plan.k, len(retrieved.items))
        if retrieved.cold_start or len(retrieved.items) <= 1:  # no user for the LLM to read, or nothing to order
            answer = Answer(ranking=[(i, retrieved.scores[i]) for i in range(k)],
                            source="cold_start" if retrieved.cold_start else "nothing_to_rank")
        else:
            answer = await self._rank(plan, retrieved, k, deadline)
        total_ms = 1e3 * (time.perf_counter() - started)
        answered.then(lambda: self._observe(retrieval_ms, answer, total_ms))  # once sent in time
        log.debug("rid=%s user=%r", rid, plan.user_id)  # who asked: a user id, kept out of INFO logs
        log.info("rid=%s history=%d (%s) mode=%s k=%d -> %d of %d candidates (%s)%s%s%s; retrieval %.1f ms, "
                 "queue %.1f ms, ranking %.1f ms%s, total %.1f ms", rid, len(plan.history),
                 plan.history_source, plan.mode, plan.k, len(answer.ranking), len(retrieved.items), answer.source,
                 " cold start" if retrieved.cold_start else "",
                 f" DEGRADED ({answer.degraded_reason})" if answer.degraded_reason else "",
                 " (a repeat: the kept answer)" if answer.reused else "",
                 retrieval_ms, answer.queue_ms, answer.ranking_ms,
                 " (the LLM's wait before its abort, queue included)" if answer.degraded_reason else "", total_ms)
        return self._response(plan, retrieved, answer, retrieval_ms, total_ms)

    async def _retrieve(self, plan: Plan, deadline: float) -> Retrieved:
        """Streams the candidates; each chunk is tokenized as it arrives. The history sent is the one the
        planner resolved (explicit > stored > none), so the retrieval tier does not resolve it again.

        Retrieval may use the whole time left: the degrade reserve is kept for the LLM's abort, and a
        deadline shorter than it still gets the linear term's order (degraded: no time for the LLM)."""
        timeout = deadline - time.perf_counter()
        if timeout <= 0:
            REJECTED.labels("deadline").inc()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before retrieval started")
        history, exclude = retrieval_lists(plan)
        request = retrieval_pb2.RetrieveRequest(user_id=plan.user_id, history=history, k=plan.num_candidates,
                                                exclude=exclude, request_id=plan.request_id)
        retrieved, screen = Retrieved(), CandidateScreen(plan, history, exclude)
        try:
            # closed on the way out, so a failure here (an unknown candidate id) cancels the Retrieve at once
            async with contextlib.aclosing(self.retrieval.stream(request, timeout)) as stream:
                async for message in stream:
                    kept = screen.keep([(c.item_id, c.score) for c in message.candidates])
                    retrieved.items += self.prompts.candidates([item_id for item_id, _ in kept])
                    retrieved.scores += [score for _, score in kept]
                    retrieved.cold_start = message.cold_start
                    retrieved.model_version = message.model_version
        except RequestError as e:
            REJECTED.labels(retrieval_rejection(e)).inc()
            raise
        screen.report(plan.request_id, self._dropped_warned)
        # no history here (an unknown user, none sent): nothing for the LLM to read, whatever the retrieval tier
        # found for that user id (a tier on another bundle knows users this one does not)
        retrieved.cold_start = retrieved.cold_start or not plan.history
        self._check_retrieval_model(retrieved.model_version)
        return retrieved

    def _check_retrieval_model(self, served: str) -> None:
        """Counts an answer over another SASRec's candidates (a rolling update, or the tiers on different bundles):
        the ranker's fusion weights were fit on its bundle's SASRec scores, so its ranking may be worse; served
        anyway (the answer names the SASRec it used), warned once per version."""
        if not self.retrieval_model or not served or served == self.retrieval_model:
            return
        RETRIEVAL_MODEL_MISMATCH.inc()
        if served not in self._other_models:
            self._other_models.add(served)
            log.warning("the retrieval tier serves SASRec %s, and this bundle's ranker was fit on %s: answers are "
                        "ranked with weights fit for another model (counted in ranking_retrieval_model_mismatch)",
                        served, self.retrieval_model)

    async def _rank(self, plan: Plan, retrieved: Retrieved, k: int, deadline: float) -> Answer:
        """The LLM's ranking, or, flagged degraded when the deadline comes first or the engine fails, the order of
        the ranking tier's linear term (retrieval + trend + EASE, what the fusion adds to the LLM's scores; no model
        time): better than the retrieval order by what that term adds (compile evaluate's `retrieval_term`)."""
        job = self.prompts.engine_request(f"{plan.request_id}#{next(self._engine_ids)}", plan, retrieved.items,
                                          retrieved.scores)
        linear_order = self.prompts.linear_ranking(job.retrieval_term, k)
        budget = self._time_left(deadline)
        if budget <= 0:
            return self._degrade(plan, linear_order, "deadline", "no time left for the LLM", 0.0)
        submitted = time.perf_counter()
        submitted_ns = time.time_ns()  # the engine spans' clock (epoch ns)
        try:
            result = await within(self.engine.rank(job.request), budget)
        except asyncio.TimeoutError:  # the timeout cancelled engine.rank, which aborts the engine request (unless
            # identical requests wait on its run: the AnswerCache keeps it going for them)
            return self._degrade(plan, linear_order, "deadline",
                                 f"LLM aborted after {budget * 1e3:.0f} ms to keep the deadline", submitted,
                                 submitted_ns)
        except EngineOverloaded as e:
            REJECTED.labels("queue_full").inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later or elsewhere",
                               trailing_metadata=(QUEUE_FULL,)) from None
        except InvalidRequest as e:  # the request is this server's own making (the caller's input was checked)
            log.error("rid=%s the engine refused the request this server built: %s", plan.request_id, e)
            return self._degrade(plan, linear_order, "engine_error", f"engine refused the request: {e}", submitted,
                                 submitted_ns)
        except EngineError as e:
            return self._degrade(plan, linear_order, "engine_error", str(e), submitted, submitted_ns)
        waited_ms = 1e3 * (time.perf_counter() - submitted)
        tracing.add_stage_spans(self.tracer, submitted_ns, result.timings, {
            "request.id": plan.request_id, "ranking.mode": plan.mode, "llm.prompt_tokens": result.prompt_tokens,
            "llm.cached_tokens": result.cached_tokens, "llm.generated_tokens": result.generated_tokens,
            "llm.candidates": len(retrieved.items), "llm.batch_size": result.batch_size,
            "llm.answer_reused": result.answer_reused})
        return Answer(ranking=self.prompts.ranking(result, job.retrieval_term, k, job.candidate_bias),
                      queue_ms=result.timings.queue_ms, ranking_ms=waited_ms - result.timings.queue_ms,
                      reused=result.answer_reused,
                      source="repeat" if result.answer_reused and not result.answer_joined else "model")

    def _degrade(self, plan: Plan, linear_order: list[tuple[int, float]], reason: str, detail: str,
                 submitted: float, submitted_ns: int = 0) -> Answer:
        """`submitted`, `submitted_ns`: when the engine request went in (0: it never did); its wait becomes an
        `engine.wait` span, the time the trace would otherwise show as a gap."""
        trace.get_current_span().set_attribute("ranking.degraded_reason", reason)
        if submitted_ns:
            self.tracer.start_span("engine.wait", start_time=submitted_ns, attributes={
                "request.id": plan.request_id, "ranking.mode": plan.mode, "ranking.degraded_reason": reason}).end()
        log.warning("rid=%s degraded (%s): %s; answering by the linear term, no LLM", plan.request_id, reason,
                    detail)
        waited_ms = 1e3 * (time.perf_counter() - submitted) if submitted else 0.0
        return Answer(ranking=linear_order, ranking_ms=waited_ms, degraded_reason=reason, source="degraded")

    def _time_left(self, deadline: float) -> float:
        """Seconds until the deadline minus the reserve kept to answer degraded."""
        return deadline - time.perf_counter() - self.config.degrade_reserve_ms / 1e3

    def _observe(self, retrieval_ms: float, answer: Answer, total_ms: float) -> None:
        """Counts an answer the client got (in time; a late one is DEADLINE_EXCEEDED alone). Queue and ranking are
        observed for the engine's answers from the model only: a degraded answer's LLM
        wait is not split (the engine request was aborted before it reported one), cold starts and empty lists
        never reach the engine, and a kept answer to an exact repeat (`ranking_engine_answer_cache_total`) waits
        for no slot; their zeros would show overload as an empty queue. One that joined an identical request's run
        waited for that run's slot and passes: observed."""
        stages = [("retrieval", retrieval_ms), ("total", total_ms)]
        if answer.source == "model":
            stages += [("queue", answer.queue_ms), ("ranking", answer.ranking_ms)]
        for stage, ms in stages:
            STAGE_SECONDS.labels(stage).observe(ms / 1e3)
        ANSWER_SECONDS.labels(answer.source).observe(total_ms / 1e3)
        if answer.source == "cold_start":
            COLD_STARTS.inc()
        if answer.degraded_reason:
            DEGRADED.labels(answer.degraded_reason).inc()

    def _response(self, plan: Plan, retrieved: Retrieved, answer: Answer, retrieval_ms: float,
                  total_ms: float) -> ranking_pb2.RecommendResponse:
        items = [ranking_pb2.RankedItem(item_id=retrieved.items[position].id, title=retrieved.items[position].label,
                                        score=score, rank=rank, retrieval_rank=position)
                 for rank, (position, score) in enumerate(answer.ranking)]
        return ranking_pb2.RecommendResponse(
            items=items,
            timings=ranking_pb2.StageTimings(retrieval_ms=retrieval_ms, queue_ms=answer.queue_ms,
                                             ranking_ms=answer.ranking_ms, total_ms=total_ms),
            degraded=bool(answer.degraded_reason), degraded_reason=answer.degraded_reason,
            cold_start=retrieved.cold_start,
            model_version=f"sasrec:{retrieved.model_version} {self.model_version}",
            request_id=plan.request_id, mode=plan.proto_mode)
