"""From a `RecommendRequest` to a `Plan`: the request validated and its history resolved, once.

    RequestPlanner.plan(request)          validates (INVALID_ARGUMENT naming the field; OUT_OF_RANGE for a
                                          moment outside the bundle's interactions) and resolves
                                          the history: explicit > stored > none (cold start)

The resolved history is what the ranking tier sends to the retrieval tier (explicitly), so the
retrieval tier does not look it up again (`retrieval_lists`: within the per-field item-id limit).
The prompt and the ranking are `ranking_server.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc

from palr.catalog import Catalog
from palr.ranking import MODES as RANKING_MODES
from palr.serving.errors import RequestError, check_known_ids, invalid_argument
from palr.serving.validation import MAX_ITEM_IDS, check_item_id_count, check_user_id
from recsys.v1 import ranking_pb2

# the wire enum ↔ palr.ranking.MODES: RANKING_MODE_<MODE> for each mode; UNSPECIFIED is the first (score)
PROTO_MODES = {mode: ranking_pb2.RankingMode.Value(f"RANKING_MODE_{mode.upper()}") for mode in RANKING_MODES}
# 1 Jan 10000 in Unix seconds: a time in milliseconds (1.8e12 today) lies far beyond, and would count every
# candidate's trend as of a moment after all the data, so all would fall in the lowest bucket
AS_OF_LIMIT_S = 253_402_300_800
MODES = {ranking_pb2.RANKING_MODE_UNSPECIFIED: RANKING_MODES[0], **{v: mode for mode, v in PROTO_MODES.items()}}


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
    as_of: float = 0.0      # the caller's moment (Unix s) for candidates' trends; 0: the default (palr/trends.py)

    @property
    def proto_mode(self) -> int:
        return PROTO_MODES[self.mode]


class RequestPlanner:
    """`as_of_span`: (first, last) moment a caller may send for a ranker that reads trends (`TrendTable.moments`);
    None: any."""

    def __init__(self, catalog: Catalog, stored_histories: dict[str, list[str]], *, default_candidates: int,
                 max_candidates: int, as_of_span: tuple[float, float] | None = None):
        self.catalog = catalog
        self.stored_histories = stored_histories
        self.default_candidates = default_candidates
        self.max_candidates = max_candidates
        self.as_of_span = as_of_span

    def plan(self, request: ranking_pb2.RecommendRequest, request_id: str) -> Plan:
        check_user_id(request.user_id)
        if request.mode not in MODES:
            raise invalid_argument(f"mode: unknown value {request.mode}; use RANKING_MODE_SCORE or "
                                   f"RANKING_MODE_GENERATE")
        if not 0 <= request.num_candidates <= self.max_candidates:
            raise invalid_argument(f"num_candidates must be between 1 and {self.max_candidates} "
                                   f"(0 = the server's default, {self.default_candidates}), got {request.num_candidates}")
        num_candidates = request.num_candidates or self.default_candidates
        if not 0 <= request.as_of_unix_s < AS_OF_LIMIT_S:
            raise invalid_argument(f"as_of_unix_s must be a Unix time in seconds, from 0 (the default) to before "
                                   f"year 10000, got {request.as_of_unix_s}"
                                   + (" (milliseconds?)" if request.as_of_unix_s > 0 else ""))
        if not 1 <= request.k <= num_candidates:
            raise invalid_argument(f"k must be between 1 and num_candidates ({num_candidates}), got {request.k}"
                                   + (f"; raise num_candidates (at most {self.max_candidates})"
                                      if num_candidates < request.k <= self.max_candidates else ""))
        history = self._known_ids("history", request.history)
        exclude = self._known_ids("exclude", request.exclude)
        self._check_moment(request.as_of_unix_s)  # last: a field wrong on any bundle is INVALID_ARGUMENT first
        stored = self.stored_histories.get(request.user_id, [])
        # a stored user sending its own stored history is that user: its stored profile and last interaction's
        # moment, as evaluated (it got the bundle's newest moment and a profile made from the list before)
        source = "stored" if history and history == stored else "request"
        if not history:
            history, source = stored, ("stored" if stored else "none")
        return Plan(request_id=request_id, user_id=request.user_id, history=history, history_source=source,
                    exclude=exclude, k=request.k, num_candidates=num_candidates, mode=MODES[request.mode],
                    as_of=float(request.as_of_unix_s))

    def _check_moment(self, as_of: int) -> None:
        """OUT_OF_RANGE for a moment outside the bundle's interactions (e.g. today's date on a 1998 dataset): every
        candidate's trend would read 'no views', a prompt the ranker never saw, and its trend terms would rank
        nothing."""
        if not as_of or self.as_of_span is None:
            return
        first, last = self.as_of_span
        if not first < as_of <= last:  # (counts take the events strictly before the moment: none at the first)
            raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                               f"as_of_unix_s {as_of} ({_day(as_of)}) is outside this bundle's interactions, "
                               f"{int(first)} ({_day(first)}) to {int(last)} ({_day(last)}, the last one plus the "
                               f"trend window): no candidate would have any recent views; send 0 for the default "
                               f"moment, or one in that span")

    def _known_ids(self, field_name: str, item_ids: Sequence[str]) -> list[str]:
        check_item_id_count(field_name, item_ids)
        check_known_ids(field_name, item_ids, self.catalog)
        return list(item_ids)


def _day(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).date().isoformat()


def retrieval_lists(plan: Plan) -> tuple[list[str], list[str]]:
    """(history, exclude) for the retrieval request, each within the `MAX_ITEM_IDS` a field may hold. A stored
    history can be longer: the newest `MAX_ITEM_IDS` go as the history (SASRec reads only the newest
    `max_len`), and the older items not among them go to the exclude list (newest first, as room allows), so
    they are still never recommended again."""
    history = plan.history[-MAX_ITEM_IDS:]
    if len(history) == len(plan.history):
        return history, plan.exclude
    kept = set(history)
    exclude = list(dict.fromkeys(plan.exclude))
    listed = set(exclude)
    for item in reversed(plan.history[:-MAX_ITEM_IDS]):
        if len(exclude) == MAX_ITEM_IDS:
            break
        if item not in kept and item not in listed:
            exclude.append(item)
            listed.add(item)
    return history, exclude
