"""The item catalog: id ↔ model index ↔ title, year, genres, popularity.

Model indices start at 1; index 0 is padding in every model input.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from palr.bundle import write_atomically
from palr.data import AtomicTable, DatasetFiles, read_atomic

PAD_INDEX = 0
TITLE_FIELDS = ("movie_title", "title", "name", "item_name")
YEAR_FIELDS = ("release_year", "year")
GENRE_FIELDS = ("class", "genre", "genres", "categories", "category")

# "Usual Suspects, The" → "The Usual Suspects" (MovieLens files move articles to the end).
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+), (?P<article>The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El)$")


def display_title(title: str) -> str:
    m = _TRAILING_ARTICLE.match(title.strip())
    if not m:
        return title.strip()
    article = m["article"]
    return f"{article}{'' if article.endswith(chr(39)) else ' '}{m['body']}"


@dataclass(frozen=True)
class Item:
    id: str
    title: str
    year: str  # "" when unknown
    genres: tuple[str, ...]
    train_count: int  # interactions in the training split: the popularity prior

    @property
    def label(self) -> str:
        """How prompts and logs show the item: 'The Usual Suspects (1995)'."""
        return f"{self.title} ({self.year})" if self.year else self.title


class Catalog:
    def __init__(self, items: list[Item]):
        self.items = items
        self._index = {item.id: i + 1 for i, item in enumerate(items)}
        if len(self._index) != len(items):
            raise ValueError("duplicate item ids in catalog")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_indices(self) -> int:
        """Size of a model's item vocabulary: the items plus padding."""
        return len(self.items) + 1

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def index(self, item_id: str) -> int:
        return self._index[item_id]

    def indices(self, item_ids: list[str]) -> list[int]:
        return [self._index[i] for i in item_ids]

    def unknown(self, item_ids) -> list[str]:
        return [i for i in item_ids if i not in self._index]

    def item(self, index: int) -> Item:
        if index <= PAD_INDEX:
            raise IndexError(f"index {index} is padding, not an item")
        return self.items[index - 1]

    def by_id(self, item_id: str) -> Item:
        return self.items[self._index[item_id] - 1]

    def popularity_order(self) -> list[int]:
        """Item indices by training popularity, most popular first (ties: lower index first)."""
        return sorted(range(1, self.num_indices), key=lambda i: (-self.items[i - 1].train_count, i))

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        rows = [{**asdict(item), "genres": list(item.genres)} for item in self.items]
        write_atomically(Path(path), json.dumps({"items": rows}, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "Catalog":
        rows = json.loads(Path(path).read_text())["items"]
        return cls([Item(**{**r, "genres": tuple(r["genres"])}) for r in rows])

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def build(cls, files: DatasetFiles, train_sequences: dict[str, list[str]],
              all_sequences: dict[str, list[str]]) -> "Catalog":
        """Items of the .item file plus any item seen in interactions, in natural id order."""
        meta: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        if files.item is not None:
            meta = _read_item_meta(read_atomic(files.item))
        ids = set(meta) | {i for seq in all_sequences.values() for i in seq}
        counts = Counter(i for seq in train_sequences.values() for i in seq)
        items = [
            Item(id=i, title=meta.get(i, (i, "", ()))[0], year=meta.get(i, (i, "", ()))[1],
                 genres=meta.get(i, (i, "", ()))[2], train_count=counts.get(i, 0))
            for i in sorted(ids, key=natural_key)
        ]
        return cls(items)


def natural_key(item_id: str):
    """Numeric ids first, by value ("2" before "10"), then the rest by text; "7" and "07" keep a fixed order."""
    return (0, int(item_id), item_id) if item_id.isascii() and item_id.isdigit() else (1, 0, item_id)


def _read_item_meta(table: AtomicTable) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    id_i = table.index(table.first_present("item_id") or "item_id")
    title_f, year_f, genre_f = (table.first_present(*f) for f in (TITLE_FIELDS, YEAR_FIELDS, GENRE_FIELDS))
    meta = {}
    for row in table.rows:
        title = _as_text(row[table.index(title_f)]) if title_f else row[id_i]
        year = _as_text(row[table.index(year_f)]) if year_f else ""
        genres = row[table.index(genre_f)] if genre_f else []
        genres = tuple(genres) if isinstance(genres, list) else tuple(str(genres).split())
        meta[row[id_i]] = (display_title(title) or row[id_i], _clean_year(year), genres)
    return meta


def _as_text(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return "" if value != value else str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _clean_year(year: str) -> str:
    year = year.strip()
    return year if re.fullmatch(r"\d{4}", year) else ""
