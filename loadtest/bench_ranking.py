"""The ranking half of the benchmark: real PALR requests from a bundle, and measured cells.

Requests are what the ranking server would hand its engine: real users from users.json (their
stored history and profile), their real SASRec top-K from `sasrec.onnx`, the prompt built by the
server's own `PromptBuilder` (palr/prompt.py underneath, the `llm/ranker.json` settings, fusion bias
and generate-mode answer format). The model is the bundle's merged checkpoint. Every strategy gets
the same model object and the same requests, in the same order.

A cell is one (mode, strategy, concurrency, prefix reuse) setting, measured by the in-process
closed-loop driver `loadtest/drive.py` on a freshly built engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.patterns import PATTERNS, zipf_weights
from palr.ranking import MODES, load_ranker
from ranking_server.engines.base import EngineRequest

log = logging.getLogger(__name__)

ARTIFACTS = ("catalog", "users", "profiles", "sasrec_onnx", "llm_merged", "ranker")


@dataclass(frozen=True)
class Workload:
    """The model and one request per sampled user for each mode (same users, same order)."""

    model: Any
    requests: dict[str, list[EngineRequest]]
    users: list[str]
    candidates: int
    generate_k: int
    generate_format: str
    build_model: Any = None  # the bundle's hf-cpu build for this machine (its chosen precision), if any
    build_dtype: str = ""

    def describe(self) -> dict:
        prompts = [len(r.prefix_ids) + len(r.suffix_ids) for r in self.requests["score"]]
        weights = {r.logit_weight for r in self.requests["generate"]}
        contexts = [r.context_len for r in self.requests["score"]]
        return {"users": len(self.users), "candidates": self.candidates, "generate_k": self.generate_k,
                "context_tokens_mean": round(sum(contexts) / len(contexts), 1), "build_dtype": self.build_dtype,
                "generate_format": self.generate_format, "generate_logit_weight": sorted(weights),
                "prefix_tokens": len(self.requests["score"][0].prefix_ids),
                "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1), "prompt_tokens_min": min(prompts),
                "prompt_tokens_max": max(prompts)}


def load_workload(bundle_dir: Path, n: int, *, candidates: int = 0, generate_k: int = 0, seed: int = 0,
                  device: str = "cpu", generate_logit_weight: float | None = None) -> Workload:
    """`n` requests per mode for `n` users sampled (with `seed`) from the bundle's users with a history.
    `generate_logit_weight`: instead of the ranker's (a weight of 0 writes the answer without decoding)."""
    from palr.bundle import Bundle
    from palr.catalog import Catalog
    from palr.llm import load_causal_lm
    from ranking_server.planner import Plan
    from ranking_server.prompts import PromptBuilder
    from palr.sasrec_onnx import Query, SasrecOnnx

    bundle = Bundle.open(bundle_dir)
    bundle.verify(list(ARTIFACTS))
    ranker = load_ranker(bundle)
    catalog = Catalog.load(bundle.path("catalog"))
    histories = {u: e["history"] for u, e in json.loads(bundle.path("users").read_text())["users"].items()
                 if e["history"]}
    users = users_for_load(sorted(histories), n, seed)
    k_candidates = candidates or int(ranker["candidates"])
    k_generate = min(generate_k or int(ranker["generate_k"]), k_candidates)

    ranked = SasrecOnnx.from_bundle(bundle).retrieve(
        [Query(history=catalog.indices(histories[u]), exclude=catalog.indices(histories[u]), k=k_candidates)
         for u in users])
    model, tokenizer = load_causal_lm(bundle.path("llm_merged"), device)
    builder = PromptBuilder.for_bundle(bundle, tokenizer, ranker, catalog)
    builder.generate_k = k_generate  # --generate-k, when given, instead of the ranker's
    requests: dict[str, list[EngineRequest]] = {mode: [] for mode in MODES}
    for user, top in zip(users, ranked):
        items = builder.candidates([catalog.item(int(i)).id for i in top.indices])
        scores = [float(s) for s in top.scores]
        for mode in MODES:
            plan = Plan(request_id=f"bench-{user}", user_id=user, history=histories[user], history_source="stored",
                        exclude=[], k=k_generate, num_candidates=k_candidates, mode=mode)
            request = builder.engine_request(plan.request_id, plan, items, scores).request
            if mode == "generate" and generate_logit_weight is not None:
                request = dataclasses.replace(request, logit_weight=generate_logit_weight)
            requests[mode].append(request)
    build_model, build_dtype = hf_cpu_build(bundle) if device == "cpu" else (None, "")
    workload = Workload(model, requests, users, k_candidates, k_generate, ranker["generate_format"], build_model,
                        build_dtype)
    log.info("workload: %s", workload.describe())
    return workload


def server_engine_config():
    """The engine limits `python -m ranking_server` runs with by default (batch, token budget, score first)."""
    from ranking_server.config import RankingServerConfig
    from ranking_server.engines.config import EngineConfig

    return EngineConfig(max_batch_size=RankingServerConfig.max_batch_size,
                        max_tokens_per_step=RankingServerConfig.max_tokens_per_step,
                        score_first_ms=RankingServerConfig.score_first_ms)


def hf_cpu_build(bundle) -> tuple[Any, str]:
    """(model, dtype) of the bundle's hf-cpu build when it was made for this machine, else (None, "")."""
    from palr.hf_build import load_bundle_hf_cpu

    loaded = load_bundle_hf_cpu(bundle, without="no build cells")
    return (loaded[0], str(loaded[1].get("dtype"))) if loaded else (None, "")


def users_for_load(users: list[str], n: int, seed: int) -> list[str]:
    """`n` users to send load for: drawn without replacement, cycling when the bundle has fewer (unlike
    `palr.data.sample_users`, the evaluation's sample, which never repeats a user)."""
    shuffled = random.Random(seed).sample(users, len(users))
    return [shuffled[i % len(shuffled)] for i in range(n)]


@dataclass(frozen=True)
class Cell:
    """One measured setting."""

    mode: str
    strategy: str
    concurrency: int
    prefix_reuse: bool = True   # False: no KV reuse at all (neither the shared prefix nor user contexts)
    context_reuse: bool = True  # False: the shared prefix only (per-user context KV cache off)
    build: bool = False         # the bundle's hf-cpu build (its precision) instead of the fp32 merged model
    answer_cache: bool = False  # behind an AnswerCache, as the server runs it (exact repeats answered unrun)

    @property
    def key(self) -> str:
        reuse = "" if not self.prefix_reuse else ("" if self.context_reuse else "/no-context-reuse")
        return f"{self.mode}/{self.strategy}/c{self.concurrency}" + ("" if self.prefix_reuse else "/no-prefix-reuse") \
            + reuse + ("/hf-cpu-build" if self.build else "") + ("/answer-cache" if self.answer_cache else "")


MIXED = "mixed"


def request_order(users: int, n: int, pattern: str = "uniform", exponent: float = 1.1, seed: int = 0) -> list[int]:
    """Which user (an index into the workload's users) each of `n` requests is for.

    uniform: every user in turn (0, 1, ..., users - 1, 0, ...): no user repeats before all have come.
    zipf: users drawn independently with P(user of rank k) proportional to 1 / k^exponent (rank 1 =
    the first sampled user): a few users come back often, as feeds refreshing and pages reloading do.
    The same seed gives the same order for every cell."""
    if pattern == "uniform":
        return [i % users for i in range(n)]
    if pattern != "zipf":
        raise ValueError(f"unknown request pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    return random.Random(seed).choices(range(users), weights=zipf_weights(users, exponent), k=n)


def mixed_modes(n: int, generate_share: float) -> list[str]:
    """The mode of each of `n` requests of a mixed cell: generate for a `generate_share` of them,
    spread evenly (0.2: every fifth request), score for the rest."""
    if not 0 < generate_share < 1:
        raise ValueError(f"the generate share of a mixed cell must be in (0, 1), got {generate_share}")
    return ["generate" if int((i + 1) * generate_share) > int(i * generate_share) else "score" for i in range(n)]


def workload_batch(workload: Workload, modes: list[str], users: list[int]) -> list[EngineRequest]:
    """Request i: the workload's request in `modes[i]` for user `users[i]` (an index into its users)."""
    return [workload.requests[m][u % len(workload.requests[m])] for m, u in zip(modes, users)]


def measure(cell: Cell, workload: Workload, engine_config, requests: int, order: list[int] | None = None,
            generate_share: float = 0.2) -> dict:
    """Drives `max(requests, concurrency)` requests through a fresh engine (every caller sends at
    least one) after one unmeasured request (it fills the engine's prefix cache; the process was
    warmed up before the first cell); returns the driver's summary (throughput, p50/p95, mean batch,
    errors). `order`: the user of each request (`request_order`; default: every user in turn).
    A `mixed` cell sends score and generate requests together (`mixed_modes`) and also reports each
    mode's own p50/p95."""
    from loadtest.baselines import strategy_engine
    from loadtest.drive import drive, run_engine
    from ranking_server.engines.answers import AnswerCache

    n = max(requests, cell.concurrency)
    users = order[:n] if order is not None else [i % len(workload.users) for i in range(n)]
    if len(users) < n:
        raise ValueError(f"request order of {len(users)} requests for a cell of {n}")
    modes = mixed_modes(n, generate_share) if cell.mode == MIXED else [cell.mode] * n
    batch = workload_batch(workload, modes, users)
    context = engine_config.context_cache_mb if cell.prefix_reuse and cell.context_reuse else 0.0
    config = dataclasses.replace(engine_config, prefix_reuse=cell.prefix_reuse, context_cache_mb=context)
    model = workload.build_model if cell.build else workload.model
    if model is None:
        raise ValueError(f"{cell.key}: the bundle has no hf-cpu build for this machine (python -m compile build)")
    engine = strategy_engine(cell.strategy, model, config)
    # one unmeasured request first, without a user context (no context KV kept) and without the answer cache: it
    # left the first measured user's context cached, a context hit the cell's traffic did not make
    warm = dataclasses.replace(batch[0], request_id=f"{batch[0].request_id}-warm-up", context_len=0)
    asyncio.run(drive(engine, [warm], 1))
    if cell.answer_cache:
        engine = AnswerCache(engine, config.answer_cache_size)
    result = run_engine(engine, batch, cell.concurrency, warmup=0, label=cell.strategy)
    summary = {**result.summary(), "requests": n,
               "p99_ms": round(result.percentile_ms(99), 1) if len(result.latencies_ms) >= MIN_P99 else None}
    if cell.mode == MIXED:
        summary.update(per_mode(result.latencies_ms if not result.errors else None, modes))
    if cell.concurrency == 1 and not result.errors:  # one request at a time: each latency is that request's own
        summary["request_ms"] = [round(x, 2) for x in result.latencies_ms]  # in request order (a paired ratio's)
    if cell.answer_cache and not result.errors:
        summary.update(answer_split(result))
    elif context and not result.errors:
        summary.update(context_split(result, batch))
    return summary


MIN_P99 = 100  # a p99 over fewer requests is the slowest one or two: not reported


def context_split(result, batch: list[EngineRequest]) -> dict:
    """p50 of the requests that found their user's context cached (hits) and of those that computed it
    (misses), within one cell; and which requests hit, in request order (`context_hit`)."""
    hits = [c > len(r.prefix_ids) for c, r in zip(result.cached_tokens, batch)]
    return {**hit_split("context", result.latencies_ms, hits, digits=1), "context_hit": hits}


def answer_split(result) -> dict:
    """p50 of the requests answered from the AnswerCache (exact repeats: hits) and of those the model ran
    (misses), within one cell; a hit takes ~0.1 ms, so to the microsecond."""
    return hit_split("answer", result.latencies_ms, result.answer_reused, digits=3)


MIN_SPLIT = 5  # requests on each side of a hit / miss split before its p50s are reported


def hit_split(cache: str, latencies_ms: list[float], hits: list[bool], digits: int) -> dict:
    """`<cache>_hits`, `<cache>_misses` and the p50 of each, requests aligned with `hits`; a p50 over fewer than
    MIN_SPLIT requests is None (under uniform users the only context hit is the request whose user the warm-up
    called: one sample made a headline ratio)."""
    import numpy as np

    out = {f"{cache}_hits": sum(hits), f"{cache}_misses": len(hits) - sum(hits)}
    for name, wanted in (("hit", True), ("miss", False)):
        values = [x for x, h in zip(latencies_ms, hits) if h == wanted]
        out[f"{cache}_{name}_p50_ms"] = round(float(np.percentile(values, 50)), digits) if len(values) >= MIN_SPLIT \
            else None
    return out


def per_mode(latencies_ms: list[float] | None, modes: list[str]) -> dict:
    """p50/p95 of each mode's requests in a mixed cell (the driver's latencies are in request order;
    with errors they no longer line up with the modes: None)."""
    import numpy as np

    out = {}
    for mode in ("score", "generate"):
        values = [x for x, m in zip(latencies_ms or [], modes) if m == mode]
        for q in (50, 95):
            out[f"{mode}_p{q}_ms"] = round(float(np.percentile(values, q)), 1) if values else None
        out[f"{mode}_requests"] = modes.count(mode)
    return out
