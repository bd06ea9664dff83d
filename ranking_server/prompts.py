"""`PromptBuilder`: from a `Plan` and its streamed candidates to the engine request's token ids, and from
the engine's answer to a ranking.

    PromptBuilder.candidates(chunk)       per retrieval chunk, as it arrives: catalog items, title
                                          lines tokenized (cached, so the prompt below reuses them)
    PromptBuilder.engine_request(...)     the PALR prompt (palr.prompt) as prefix/suffix token ids, each
                                          candidate's trend as of the request's moment (palr.trends) and
                                          its rank under EASE and SASRec (palr.ranking.candidate_ranks)
    PromptBuilder.ranking(...)            engine answer + retrieval scores → top-k (palr.ranking)

Prompts, fusion and ordering come from `palr/` — the same functions `compile evaluate-ranking` uses —
so the server ranks exactly as the evaluation measured.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from palr.catalog import Catalog, Item
from palr.collab import CollabTable
from palr.decoding import answer_constraint
from palr.hybrid import ranker_prompt
from palr.profiles import StatsProfiler
from palr.ranking import (candidate_ranks, complete_order, fuse, generate_logit_weight, generation_bias,
                          order_by_scores, ranker_terms, uses_collab)
from palr.serving.errors import RequestError
from palr.trends import TrendSettings, TrendTable
from ranking_server.engines.base import EngineRequest, EngineResult
from ranking_server.planner import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankingJob:
    """What the engine is asked, and what the answer is fused with besides the retrieval scores."""

    request: EngineRequest
    candidate_bias: list[float] | None  # the ranking head's per-candidate bias (trend and rank buckets'), or None
    retrieval_term: list[float]         # what the answer is fused with: `palr.ranking.retrieval_prior`


def slot_tokens(requests: Sequence[EngineRequest]) -> int:
    """Prompt + generated tokens of the longest of `requests`: the KV slot every one of them fits."""
    return max(r.tokens_needed(r.validate(vocab_size=2 ** 62, max_seq_len=2 ** 62)) for r in requests)  # sizes only


def load_trends(bundle, ranker: dict) -> TrendTable | None:
    """The bundle's trends table when the ranker reads trends (verified), else None."""
    if not ranker.get("trend"):
        return None
    bundle.verify(["trends"])
    return TrendTable.load(bundle.path("trends"))


def trend_moments(trends: TrendTable | None, ranker: dict) -> tuple[float, float] | None:
    """The moments a request may name (`TrendTable.moments`) when the ranker reads trends; None: any."""
    return None if trends is None else trends.moments(TrendSettings(**ranker["trend"]))


class PromptBuilder:
    """Builds PALR prompts as training did (`llm/ranker.json`) and turns answers into rankings."""

    def __init__(self, tokenizer, ranker: dict, catalog: Catalog, stored_profiles: dict[str, str],
                 trends: TrendTable | None = None, collab: CollabTable | None = None,
                 rebuild_profiles: str = "python -m compile profiles --bundle BUNDLE --method METHOD --force"):
        self.prompt = ranker_prompt(tokenizer, ranker, catalog)
        self.fusion_weight = float(ranker["fusion_weight"])
        self.trend = TrendSettings(**ranker["trend"]) if ranker.get("trend") else None
        if self.trend and trends is None:
            raise ValueError("this ranker's prompts carry trend tokens: the bundle's trends.npz is needed")
        self.trends = trends
        self.ranker = ranker  # its fusion weights and the head's learned biases (palr.ranking.ranker_terms)
        if uses_collab(ranker) and collab is None:
            raise ValueError("this ranker reads EASE scores (its retrieval term or rank tokens): the bundle's "
                             "collab.npy is needed")
        self.collab = collab
        self.generate_format = ranker["generate_format"]
        self.generate_k = int(ranker["generate_k"])  # answer lines generate mode writes, as evaluated
        self.generate_logit_weight = generate_logit_weight(ranker)
        self.catalog = catalog
        self.stored_profiles = stored_profiles
        self.stats_profiler = StatsProfiler(catalog)
        self.rebuild_profiles = rebuild_profiles  # the command warn_unprofiled names

    @classmethod
    def for_bundle(cls, bundle, tokenizer, ranker: dict, catalog: Catalog,
                   trends: TrendTable | None = None) -> "PromptBuilder":
        """The builder for a bundle's ranker: its stored profiles, (trend prompts) its trends table (`trends`: as
        `load_trends` gave it, when the caller has it already) and (an EASE weight in the retrieval term, EASE rank
        tokens) its collab table."""
        from palr.profiles import Profiles

        trends, collab = trends if trends is not None else load_trends(bundle, ranker), None  # (a table has a len)
        if uses_collab(ranker):
            bundle.verify(["collab"])
            collab = CollabTable.load(bundle.path("collab"))
        profiles = Profiles.load(bundle.path("profiles"))
        trained_on = ranker.get("profile_method", profiles.method)
        if profiles.method != trained_on:
            log.warning("this ranker was trained on %s profiles and the bundle's are %s: stored users get profiles of "
                        "a kind its training never showed", trained_on, profiles.method)
        elif profiles.method != "stats":
            log.warning("this ranker was trained on %s profiles: stored users get theirs, but a request that sends "
                        "its own history gets a statistics profile, a kind its training never showed",
                        profiles.method)
        return cls(tokenizer, ranker, catalog, profiles.profiles, trends, collab,
                   f"python -m compile profiles --bundle {bundle.root} --method {profiles.method} --force")

    def warn_unprofiled(self, stored_users: Iterable[str]) -> int:
        """Logs how many stored users have no stored profile (they are served an empty one, which the offline
        evaluation refuses to measure); returns that count."""
        missing = [u for u in stored_users if u not in self.stored_profiles]
        if missing:
            log.warning("%d stored users have no profile in profiles.json (e.g. %s): their prompts show an empty "
                        "profile (rebuild it: %s)", len(missing), missing[0], self.rebuild_profiles)
        return len(missing)

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

    def moment(self, plan: Plan) -> float:
        """When the request is for (palr/trends.py): the caller's `as_of`, else a stored user's last
        interaction, else the newest interaction the bundle knows."""
        if plan.as_of:
            return plan.as_of
        if plan.history_source == "stored" and plan.user_id in self.trends.as_of:
            return self.trends.as_of[plan.user_id]
        return self.trends.latest

    def candidate_trends(self, plan: Plan, candidates: Sequence[Item]) -> list[int] | None:
        if self.trend is None:
            return None
        return self.trends.buckets(self.moment(plan), [self.catalog.index(c.id) for c in candidates], self.trend)

    def candidate_collab(self, plan: Plan, candidates: Sequence[Item]) -> list[float] | None:
        """Each candidate's EASE score from the request's whole history (None: the ranker reads none)."""
        if self.collab is None:
            return None
        return self.collab.scores(self.catalog.indices(plan.history), [self.catalog.index(c.id) for c in candidates])

    def engine_request(self, engine_id: str, plan: Plan, candidates: Sequence[Item],
                       retrieval_scores: Sequence[float], profile: str | None = None) -> RankingJob:
        """`profile`: the keywords to show (default: the plan's, `profile(plan)`)."""
        trends = self.candidate_trends(plan, candidates)
        collab = self.candidate_collab(plan, candidates)
        ranks = candidate_ranks(self.prompt.settings.rank_tokens, retrieval_scores, collab)
        parts = self.prompt.retrieval(self.profile(plan) if profile is None else profile,
                                      [self.catalog.by_id(i) for i in plan.history], candidates, trends, ranks)
        prior, bias = ranker_terms(self.ranker, retrieval_scores, trends, collab, ranks)
        readout = parts.readout if self.prompt.settings.readout == "candidate" else None
        if plan.mode == "score":
            request = EngineRequest(engine_id, parts.prefix_ids, parts.suffix_ids, parts.label_token_ids, "score",
                                    min(plan.k, len(candidates)), readout=readout, context_len=parts.context_len)
        else:
            lines = min(plan.k, self.generate_k, len(candidates))  # the rest of a longer list: `ranking`
            request = EngineRequest(engine_id, parts.prefix_ids, parts.suffix_ids, parts.label_token_ids, "generate",
                                    lines, bias=generation_bias(prior, self.fusion_weight, bias),
                                    constraint=functools.partial(answer_constraint, self.generate_format,
                                                                 parts.label_token_ids, parts.candidate_line_ids,
                                                                 lines),
                                    readout=readout, context_len=parts.context_len,
                                    logit_weight=self.generate_logit_weight)
        return RankingJob(request, bias, prior)

    def longest_requests(self, candidates: int) -> list[EngineRequest]:
        """A score and a generate request at least as long as any this builder makes with `candidates`
        candidates: the longest history item in every history place (a request may repeat one), the items
        whose candidate line plus answer line are longest as the candidates, the longest profile (stored, or
        the stats profiler's longest for histories sent with a request), generate mode writing its generate_k lines."""
        prompt, settings = self.prompt, self.prompt.settings
        history_item = max(self.catalog.items, key=lambda item: len(prompt.item_ids(item, settings.history_years)))
        lines = sorted(self.catalog.items, key=lambda item: -(len(prompt.item_ids(item, settings.candidate_years))
                                                             + len(prompt.title_line_ids(item))))[:candidates]
        tokens = lambda text: len(prompt.data_ids(text))  # noqa: E731
        profile = max([*self.stored_profiles.values(), self.stats_profiler.longest(tokens)], key=tokens)
        n = len(lines)
        plans = [Plan(request_id=f"longest-{mode}", user_id="", history=[history_item.id] * settings.history_items,
                      history_source="request", exclude=[], k=n, num_candidates=n, mode=mode)
                 for mode in ("score", "generate")]
        return [self.engine_request(plan.request_id, plan, lines, [0.0] * n, profile=profile).request for plan in plans]

    @staticmethod
    def linear_ranking(retrieval_term: Sequence[float], k: int) -> list[tuple[int, float]]:
        """(candidate position, score) for the top k by the ranker's linear term alone (`RankingJob.retrieval_term`:
        retrieval + trend + EASE, no LLM): a degraded answer's order."""
        return [(position, retrieval_term[position]) for position in order_by_scores(retrieval_term)[:k]]

    def ranking(self, result: EngineResult, retrieval_term: Sequence[float], k: int,
                candidate_bias: Sequence[float] | None = None) -> list[tuple[int, float]]:
        """(candidate position, score) for the top k. Score mode: the LLM's log-prob plus its head's
        per-candidate bias, fused with the retrieval term (`RankingJob.retrieval_term`: the retrieval scores
        with the ranker's trend weights). Generate mode: the model's order (its `generate_k` lines), then the rest by
        the decoding's bias, as evaluated; score 1 / (rank + 1) (it names, not scores)."""
        if result.mode == "score":
            fused = fuse(result.scores, retrieval_term, self.fusion_weight, candidate_bias)
            return [(position, fused[position]) for position in order_by_scores(fused)[:k]]
        order = complete_order(result.order, len(retrieval_term),
                               generation_bias(retrieval_term, self.fusion_weight, candidate_bias))[:k]
        return [(position, 1.0 / (rank + 1)) for rank, position in enumerate(order)]
