"""`PromptBuilder`: from a `Plan` and its streamed candidates to the engine request's token ids, and from
the engine's answer to a ranking.

    PromptBuilder.candidates(chunk)       per retrieval chunk, as it arrives: catalog items, title
                                          lines tokenized (cached, so the prompt below reuses them)
    PromptBuilder.engine_request(...)     the PALR prompt (palr.prompt) as prefix/suffix token ids
    PromptBuilder.ranking(...)            engine answer + retrieval scores → top-k (palr.ranking)

Prompts, fusion and ordering come from `palr/` — the same functions `compile evaluate-ranking` uses —
so the server ranks exactly as the evaluation measured.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grpc

from palr.catalog import Catalog, Item
from palr.decoding import answer_constraint
from palr.hybrid import ranker_prompt
from palr.profiles import StatsProfiler
from palr.ranking import complete_order, fuse, generation_bias, order_by_scores
from palr.serving.errors import RequestError
from ranking_server.engines.base import EngineRequest, EngineResult
from ranking_server.planner import Plan


class PromptBuilder:
    """Builds PALR prompts as training did (`llm/ranker.json`) and turns answers into rankings."""

    def __init__(self, tokenizer, ranker: dict, catalog: Catalog, stored_profiles: dict[str, str]):
        self.prompt = ranker_prompt(tokenizer, ranker, catalog)
        self.fusion_weight = float(ranker["fusion_weight"])
        self.label_bias = ranker.get("label_bias")  # the ranker's learned per-label bias (None: none)
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
                             bias=generation_bias(retrieval_scores, self.fusion_weight, self.label_bias),
                             constraint=functools.partial(answer_constraint, self.generate_format, parts.label_token_ids,
                                                          parts.candidate_line_ids, k))

    def ranking(self, result: EngineResult, retrieval_scores: Sequence[float], k: int) -> list[tuple[int, float]]:
        """(candidate position, score) for the top k. Score mode: LLM label log-prob fused with the
        retrieval score. Generate mode: the model's order; score 1 / (rank + 1) (it names, not scores)."""
        if result.mode == "score":
            fused = fuse(result.scores, retrieval_scores, self.fusion_weight, self.label_bias)
            return [(position, fused[position]) for position in order_by_scores(fused)[:k]]
        order = complete_order(result.order, len(retrieval_scores))[:k]
        return [(position, 1.0 / (rank + 1)) for rank, position in enumerate(order)]
