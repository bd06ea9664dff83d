"""Prometheus metrics of the ranking server (registered once per process).

Per request (updated by the servicer):
    ranking_requests{code}                  Recommend RPCs by final status code (+ latency, in flight)
    ranking_stage_seconds{stage}            retrieval | queue | ranking | total, per answered request (queue and
                                            ranking: the answers the model computed)
    ranking_answer_seconds{answer}          an answered request's total time, by how it was answered: model |
                                            repeat | degraded | cold_start | nothing_to_rank (`ANSWER_SOURCES`);
                                            the model's own latency apart from answers that never ran it
    ranking_degraded{reason}                answers by the linear term instead of the LLM: deadline, engine_error
    ranking_rejected{reason}                requests refused: invalid_argument, queue_full, deadline,
                                            retrieval_unavailable, retrieval_queue_full (the retrieval tier
                                            refused it RESOURCE_EXHAUSTED), retrieval_error, loading
    ranking_cold_starts                     answers from popularity (no history)
    ranking_retrieval_model_mismatch        answers over candidates from another SASRec than the bundle's (the
                                            ranker's fusion weights were fit on the bundle's SASRec scores)
    ranking_retrieval_queue_full_retries    Retrieves sent again after a replica refused them for a full queue
Engine (read from `engine.stats()` at every scrape, so they cost nothing per request):
    ranking_engine_queued                   queue depth: requests waiting for a batch slot
    ranking_engine_active                   active batch size: requests holding a slot now
    ranking_engine_tokens_per_second        tokens the model ran per second of engine busy time (since start)
    ranking_engine_tokens{kind}             prompt | cached (prefix KV reused) | generated (decoded) | written (from
                                            the bias at generate logit weight 0, no pass), counters
    ranking_engine_requests{outcome}        completed | failed | aborted | rejected, counters
    ranking_engine_context_cache_total{event}  hit | miss | evict of the per-user context KV cache, counters
    ranking_engine_context_cache_bytes      memory the cached user contexts hold
    ranking_engine_answer_cache_total{event}   hit | miss | evict of the answers kept for exact repeats
    ranking_engine_steps, ranking_engine_busy_seconds, ranking_engine_mean_batch_size,
    ranking_engine_healthy
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from palr.serving.metrics import LATENCY_BUCKETS, RpcMetrics
from ranking_server.engines.base import RankingEngine

RECOMMEND = RpcMetrics("ranking", "Recommend")
STAGE_SECONDS = Histogram("ranking_stage_seconds", "time per request stage: retrieval, queue (waiting for a "
                          "batch slot), ranking (LLM), total; queue and ranking of the answers the model computed "
                          "only (not cold starts or empty lists, which never reach it, kept answers to exact repeats, "
                          "which wait for no slot, or a degraded answer's aborted wait, which has no split)",
                          ["stage"], buckets=LATENCY_BUCKETS)
ANSWER_SOURCES = {
    "model": "the engine ran the LLM for it (or it joined an identical request's run, waiting for that run)",
    "repeat": "the engine's kept answer to an exact repeat of an earlier request (no model time)",
    "degraded": "the linear term's order, after the deadline neared or the engine failed (ranking_degraded)",
    "cold_start": "popularity candidates as they are (no history: no user for the LLM to read)",
    "nothing_to_rank": "one candidate or none came back from retrieval: answered as it is",
}
ANSWER_SECONDS = Histogram("ranking_answer_seconds", "answered requests' total time, by how each was answered: "
                           + "; ".join(f"{k}: {v}" for k, v in ANSWER_SOURCES.items()), ["answer"],
                           buckets=LATENCY_BUCKETS)
DEGRADED = Counter("ranking_degraded", "answers by the linear term (no LLM) instead of the LLM's, by reason", ["reason"])
REJECTED = Counter("ranking_rejected", "requests refused, by reason", ["reason"])
RETRIEVAL_QUEUE_FULL_RETRIES = Counter(
    "ranking_retrieval_queue_full_retries", "Retrieve calls sent again after a retrieval replica refused them for a "
    "full queue (--retrieval-queue-full-retries; round_robin only)")
COLD_STARTS = Counter("ranking_cold_starts", "answers from popularity candidates (user without history)")
RETRIEVAL_MODEL_MISMATCH = Counter(
    "ranking_retrieval_model_mismatch", "answers ranked over candidates and scores of another SASRec than the one "
    "this bundle's ranker was fit with (the retrieval tier's model_version is not the bundle's sasrec_onnx)")
BUILD = Info("ranking_build", "what this process ranks with once its engine is attached: the bundle's LLM, ranker "
             "and engine versions, as answers name them in model_version")
DEGRADED_REASONS = ("deadline", "engine_error")
RETRIEVAL_DROPPED = Counter(
    "ranking_retrieval_candidates_dropped", "retrieval candidates not ranked: in the request's history or exclusions, "
    "a duplicate, or past its num_candidates (a retrieval tier of another bundle or settings)", ["reason"])
DROPPED_REASONS = ("history_or_excluded", "duplicate", "over_num_candidates")
REJECTED_REASONS = ("invalid_argument", "out_of_range", "queue_full", "deadline", "retrieval_unavailable",
                    "retrieval_queue_full", "retrieval_error", "loading")
for _source in ANSWER_SOURCES:  # every series exists from the start, at 0, for dashboards and rate()
    ANSWER_SECONDS.labels(_source)
for _reason in DEGRADED_REASONS:
    DEGRADED.labels(_reason)
for _reason in REJECTED_REASONS:
    REJECTED.labels(_reason)
for _reason in DROPPED_REASONS:
    RETRIEVAL_DROPPED.labels(_reason)


HEALTHY_DOC = "1 while an engine is attached and its loop is alive; 0 while loading, after a crash, at shutdown"


class EngineCollector:
    """Exports the serving engine's own counters at scrape time. One per process; `attach` points it
    at the engine now serving (tests build several servers in one process)."""

    def __init__(self) -> None:
        self.engine: RankingEngine | None = None

    def attach(self, engine: RankingEngine | None) -> None:
        self.engine = engine

    def describe(self):
        return []  # metric names depend on nothing; skip the registry's collision check at collect time

    def collect(self):
        if self.engine is None:  # loading, or detached at shutdown: no engine to serve with (an alert on 0 fires)
            yield GaugeMetricFamily("ranking_engine_healthy", HEALTHY_DOC, value=0.0)
            return
        stats = self.engine.stats()
        gauges = {
            "queued": (stats.queued, "requests waiting for a batch slot (queue depth)"),
            "active": (stats.active, "requests holding a batch slot now (active batch size)"),
            "tokens_per_second": (stats.tokens_per_s, "prompt + decoded tokens per second of engine busy time (the "
                                  "model's), since the engine started; for now: rate(ranking_engine_tokens_total)"),
            "mean_batch_size": (stats.mean_batch, "requests in the running batch per engine step, since the engine "
                                "started; for now: rate(ranking_engine_batch_slots_total) / rate(ranking_engine_steps_total)"),
            "healthy": (float(stats.healthy), HEALTHY_DOC),
        }
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(f"ranking_engine_{name}", doc, value=value)
        tokens = CounterMetricFamily("ranking_engine_tokens", "tokens through the engine (written: answer tokens "
                                     "written from the bias, no model pass)", labels=["kind"])
        for kind in ("prompt", "cached", "generated", "written"):
            tokens.add_metric([kind], getattr(stats, f"{kind}_tokens"))
        yield tokens
        requests = CounterMetricFamily("ranking_engine_requests", "engine requests by outcome", labels=["outcome"])
        for outcome in ("completed", "failed", "aborted", "rejected"):
            requests.add_metric([outcome], getattr(stats, outcome))
        yield requests
        cache = CounterMetricFamily("ranking_engine_context_cache", "per-user context KV cache: requests that found "
                                    "their context (hit), that computed it (miss), contexts dropped (evict)",
                                    labels=["event"])
        for event, value in (("hit", stats.context_hits), ("miss", stats.context_misses),
                             ("evict", stats.context_evictions)):
            cache.add_metric([event], value)
        yield cache
        yield GaugeMetricFamily("ranking_engine_context_cache_bytes", "memory the cached user contexts hold",
                                value=stats.context_bytes)
        answers = CounterMetricFamily("ranking_engine_answer_cache", "answers of exact repeats: requests answered "
                                      "from the cache (hit), run by the model (miss), answers dropped (evict)",
                                      labels=["event"])
        for event, value in (("hit", stats.answer_hits), ("miss", stats.answer_misses),
                             ("evict", stats.answer_evictions)):
            answers.add_metric([event], value)
        yield answers
        yield CounterMetricFamily("ranking_engine_steps", "engine iterations that ran the model", value=stats.steps)
        yield CounterMetricFamily("ranking_engine_batch_slots", "requests in the running batch, summed over the engine's "
                                  "steps (over steps_total: the mean batch per step)",
                                  value=sum(size * n for size, n in stats.batch_size_hist.items()))
        yield CounterMetricFamily("ranking_engine_busy_seconds", "time the engine spent running steps",
                                  value=stats.busy_s)


ENGINE = EngineCollector()
REGISTRY.register(ENGINE)
