"""User profile keywords for the PALR prompt, and the `profiles.json` the bundle keeps.

Two methods, both a function of the history the model sees (never of a held-out item):

- `stats`: deterministic keywords from genre, year and popularity statistics of the history,
  e.g. "Drama, Comedy, Thriller; lately Action, Sci-Fi; mostly 1990s; mainstream". Cheap enough to
  compute per request, so it also serves histories sent explicitly with a request.
- `llm`: the base LLM summarises the titles into keywords (PALR), hierarchically in blocks for long
  histories (LLM-TRSR); see `compile/profiles.py`. Too slow per request: precomputed per user.

`profiles.json` = {"method": ..., "settings": {...}, "profiles": {user_id: keywords}}, where each
user's profile is computed from train + valid items (what a test-time request sees).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from palr.bundle import write_atomically
from palr.catalog import Catalog, Item

METHODS = ("stats", "llm")
VERSION = 1  # bump when a method's keywords for the same history change: compile's profiles step then reruns
_UNKNOWN_GENRES = {"unknown", "(no genres listed)", ""}
POPULARITY = ("mainstream", "popular films", "lesser-known films")  # median item in the top 10 %, 25 %, the rest


@dataclass(frozen=True)
class StatsProfileSettings:
    genres: int = field(default=3, metadata={"help": "top genres named"})
    recent_items: int = field(default=10, metadata={"help": "items that count as 'lately'"})
    recent_genres: int = field(default=2, metadata={"help": "top recent genres named"})


def _top_genres(items: Sequence[Item], n: int) -> list[str]:
    counts = Counter(g for item in items for g in item.genres if g not in _UNKNOWN_GENRES)
    return [g for g, _ in sorted(counts.items(), key=lambda gc: (-gc[1], gc[0]))[:n]]


def _era(items: Sequence[Item]) -> str:
    decades = Counter(item.year[:3] + "0s" for item in items if item.year)
    if not decades:
        return ""
    (top, count), *rest = decades.most_common()
    if count >= 0.6 * sum(decades.values()) or not rest:
        return f"mostly {top}"
    return f"{top} and {rest[0][0]}"


class StatsProfiler:
    """`stats` profiles for one catalog: keywords from genre, year and popularity statistics."""

    def __init__(self, catalog: Catalog, settings: StatsProfileSettings = StatsProfileSettings()):
        self.catalog = catalog
        self.settings = settings
        order = catalog.popularity_order()
        self._popularity_rank = {index: r / len(order) for r, index in enumerate(order)}  # 0 = most popular

    def _popularity(self, items: Sequence[Item]) -> str:
        """Where the history's median item sits in the catalog's popularity order."""
        ranks = sorted(self._popularity_rank[self.catalog.index(item.id)] for item in items)
        median = ranks[len(ranks) // 2]
        mainstream, popular, rest = POPULARITY
        return mainstream if median < 0.1 else popular if median < 0.25 else rest

    def longest(self, tokens: Callable[[str], int]) -> str:
        """A profile at least as long, in `tokens(text)`, as any this profiler writes for this catalog: the
        longest genre names in every slot, two decades, the longest popularity phrase."""
        # ties in length broken by name: one text whatever the hash seed ordered the sets in
        genres = sorted({g for item in self.catalog.items for g in item.genres if g not in _UNKNOWN_GENRES},
                        key=lambda g: (-tokens(" " + g), g))
        decades = sorted({item.year[:3] + "0s" for item in self.catalog.items if item.year},
                         key=lambda d: (-tokens(" " + d), d))
        parts = [", ".join(genres[:self.settings.genres])]
        if self.settings.recent_genres and genres:
            parts.append("lately " + ", ".join(genres[:self.settings.recent_genres]))
        if decades:
            parts.append(max([f"mostly {decades[0]}", " and ".join(decades[:2])], key=tokens))
        parts.append(max(POPULARITY, key=tokens))
        return "; ".join(p for p in parts if p)

    def __call__(self, history: Sequence[Item]) -> str:
        """e.g. "Drama, Comedy, Thriller; lately Action, Sci-Fi; mostly 1990s; mainstream"; "" if empty."""
        if not history:
            return ""
        top = _top_genres(history, max(self.settings.genres, self.settings.recent_genres))
        parts = [", ".join(top[: self.settings.genres])]
        recent = _top_genres(history[-self.settings.recent_items:], self.settings.recent_genres)
        if recent and recent != top[: self.settings.recent_genres]:
            parts.append("lately " + ", ".join(recent))
        parts += [_era(history), self._popularity(history)]
        return "; ".join(p for p in parts if p)


@dataclass
class Profiles:
    """The bundle's `profiles.json`: one keyword string per user."""

    method: str
    profiles: dict[str, str]
    settings: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        write_atomically(Path(path), json.dumps(asdict(self), ensure_ascii=False, indent=0, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "Profiles":
        raw = json.loads(Path(path).read_text())
        if raw.get("method") not in METHODS:
            raise ValueError(f"{path}: profile method {raw.get('method')!r} is not one of {METHODS}")
        return cls(method=raw["method"], profiles=raw["profiles"], settings=raw.get("settings", {}))
