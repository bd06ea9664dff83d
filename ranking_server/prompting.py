"""From a `RecommendRequest` to an engine request, and from the engine's answer to a ranking.

    RequestPlanner.plan(request)          validates (INVALID_ARGUMENT naming the field) and resolves
                                          the history: explicit > stored > none (cold start)
    PromptBuilder.candidates(chunk)       per retrieval chunk, as it arrives: catalog items, title
                                          lines tokenized (cached, so the prompt below reuses them)
    PromptBuilder.engine_request(...)     the PALR prompt (palr.prompt) as prefix/suffix token ids
    PromptBuilder.ranking(...)            engine answer + retrieval scores → top-k (palr.ranking)

Prompts, fusion and ordering come from `palr/` — the same functions `compile evaluate --tier
ranking` uses — so the server ranks exactly as the evaluation measured.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from palr.catalog import Catalog, Item
from palr.decoding import answer_constraint
from palr.profiles import StatsProfiler
from palr.prompt import PalrPrompt, PromptParts, PromptSettings
from palr.ranking import complete_order, fuse, generation_bias, order_by_scores
from palr.serving import RequestError, check_known_ids, invalid_argument
from palr.validation import check_user_id
from ranking_server.engines.base import EngineRequest, EngineResult
from recsys.v1 import ranking_pb2

MODES = {ranking_pb2.RANKING_MODE_UNSPECIFIED: "score", ranking_pb2.RANKING_MODE_SCORE: "score",
         ranking_pb2.RANKING_MODE_GENERATE: "generate"}
PROTO_MODES = {"score": ranking_pb2.RANKING_MODE_SCORE, "generate": ranking_pb2.RANKING_MODE_GENERATE}
# Request ids go into logs and into `x-request-id` metadata (printable ASCII only).
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def valid_request_id(value: str) -> bool:
    return bool(REQUEST_ID.fullmatch(value))


@dataclass(frozen=True)
class Plan:
    """A validated request, history resolved."""

    request_id: str
    user_id: str
    history: list[str]      # item ids, oldest first ([] = cold start)
    history_source: str     # "request", "stored" or "none"
    exclude: list[str]
    k: int
    num_candidates: int
    mode: str               # "score" or "generate"

    @property
    def proto_mode(self) -> int:
        return PROTO_MODES[self.mode]


class RequestPlanner:
    def __init__(self, catalog: Catalog, stored_histories: dict[str, list[str]], *, default_candidates: int,
                 max_candidates: int):
        self.catalog = catalog
        self.stored_histories = stored_histories
        self.default_candidates = default_candidates
        self.max_candidates = max_candidates

    def plan(self, request: ranking_pb2.RecommendRequest, request_id: str) -> Plan:
        check_user_id(request.user_id)
        if request.mode not in MODES:
            raise invalid_argument(f"mode: unknown value {request.mode}; use RANKING_MODE_SCORE or "
                                   f"RANKING_MODE_GENERATE")
        if not 0 <= request.num_candidates <= self.max_candidates:
            raise invalid_argument(f"num_candidates must be between 1 and {self.max_candidates} "
                                   f"(0 = the server's default, {self.default_candidates}), got {request.num_candidates}")
        num_candidates = request.num_candidates or self.default_candidates
        if not 1 <= request.k <= num_candidates:
            raise invalid_argument(f"k must be between 1 and num_candidates ({num_candidates}), got {request.k}")
        history = self._known_ids("history", request.history)
        exclude = self._known_ids("exclude", request.exclude)
        source = "request"
        if not history:
            history = self.stored_histories.get(request.user_id, [])
            source = "stored" if history else "none"
        return Plan(request_id=request_id, user_id=request.user_id, history=history, history_source=source,
                    exclude=exclude, k=request.k, num_candidates=num_candidates, mode=MODES[request.mode])

    def _known_ids(self, field_name: str, item_ids: Sequence[str]) -> list[str]:
        check_known_ids(field_name, item_ids, self.catalog)
        return list(item_ids)


class PromptBuilder:
    """Builds PALR prompts as training did (`llm/ranker.json`) and turns answers into rankings."""

    def __init__(self, tokenizer, ranker: dict, catalog: Catalog, stored_profiles: dict[str, str]):
        self.prompt = PalrPrompt(tokenizer, PromptSettings.from_dict(ranker["prompt"]))
        self.fusion_weight = float(ranker["fusion_weight"])
        self.generate_format = ranker["generate_format"]
        self.catalog = catalog
        self.stored_profiles = stored_profiles
        self.stats_profiler = StatsProfiler(catalog)

    def candidates(self, item_ids: Sequence[str]) -> list[Item]:
        """One retrieval chunk → catalog items, their title lines tokenized now (while the rest of the
        stream is still on its way; `PalrPrompt` caches them for the prompt)."""
        unknown = self.catalog.unknown(item_ids)
        if unknown:
            raise RequestError(grpc.StatusCode.INTERNAL, f"the retrieval tier returned item ids unknown to this "
                                                         f"bundle's catalog ({unknown[:3]}): the two servers "
                                                         f"serve different bundles")
        items = [self.catalog.by_id(i) for i in item_ids]
        for item in items:
            self.prompt.title_line_ids(item)
        return items

    def profile(self, plan: Plan) -> str:
        """The stored profile for a stored history (as evaluated); statistics of an explicit one."""
        if plan.history_source == "stored":
            return self.stored_profiles.get(plan.user_id, "")
        return self.stats_profiler([self.catalog.by_id(i) for i in plan.history])

    def engine_request(self, engine_id: str, plan: Plan, candidates: Sequence[Item],
                       retrieval_scores: Sequence[float]) -> EngineRequest:
        parts = self.prompt.retrieval(self.profile(plan), [self.catalog.by_id(i) for i in plan.history], candidates)
        k = min(plan.k, len(candidates))
        if plan.mode == "score":
            return EngineRequest(engine_id, parts.prefix_ids, parts.suffix_ids, parts.label_token_ids, "score", k)
        return EngineRequest(engine_id, parts.prefix_ids, parts.suffix_ids, parts.label_token_ids, "generate", k,
                             bias=generation_bias(retrieval_scores, self.fusion_weight),
                             constraint=functools.partial(answer_constraint, self.generate_format, parts.label_token_ids,
                                                          parts.candidate_line_ids, k))

    def ranking(self, result: EngineResult, retrieval_scores: Sequence[float], k: int) -> list[tuple[int, float]]:
        """(candidate position, score) for the top k. Score mode: LLM label log-prob fused with the
        retrieval score. Generate mode: the model's order; score 1 / (rank + 1) (it names, not scores)."""
        if result.mode == "score":
            fused = fuse(result.scores, retrieval_scores, self.fusion_weight)
            return [(position, fused[position]) for position in order_by_scores(fused)[:k]]
        order = complete_order(result.order, len(retrieval_scores))[:k]
        return [(position, 1.0 / (rank + 1)) for rank, position in enumerate(order)]
