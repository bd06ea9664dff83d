"""RecBole atomic files → per-user chronological sequences → leave-one-out split.

Atomic files are tab-separated with a `name:type` header (RecBole's format):

    user_id:token	item_id:token	rating:float	timestamp:float
    196	242	3	881250949

Types: token, token_seq (space-separated tokens), float, float_seq. A dataset directory holds
`<name>.inter` and, optionally, `<name>.item` and `<name>.user`. Any dataset in this format
works (`--data DIR`); bad files raise `AtomicFileError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


class AtomicFileError(ValueError):
    """A malformed atomic file; the message names the file and the line."""


@dataclass(frozen=True)
class AtomicTable:
    path: Path
    names: list[str]
    types: list[str]
    rows: list[list]  # one list per data line, values parsed by type
    line_nos: list[int] = field(default_factory=list)  # each row's line in the file (for errors)

    def column(self, name: str) -> list:
        i = self.index(name)
        return [row[i] for row in self.rows]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AtomicFileError(f"{self.path}: no field {name!r} (fields: {', '.join(self.names)})") from None

    def first_present(self, *candidates: str) -> str | None:
        return next((c for c in candidates if c in self.names), None)


def _parse_value(raw: str, ftype: str, path: Path, line_no: int, name: str):
    if ftype == "token":
        return raw
    if ftype == "token_seq":
        return raw.split()
    try:
        if ftype == "float":
            return float(raw) if raw != "" else float("nan")
        return [float(x) for x in raw.split()]
    except ValueError:
        raise AtomicFileError(f"{path}:{line_no}: field {name!r} is {ftype} but holds {raw!r}") from None


def read_atomic(path: str | Path) -> AtomicTable:
    """Reads one atomic file. Raises AtomicFileError with file:line on any malformed line."""
    path = Path(path)
    if not path.is_file():
        raise AtomicFileError(f"{path}: no such file")
    try:
        return _read_atomic(path)
    except UnicodeDecodeError as e:  # e.g. the original Latin-1 u.item: name the file, not a bare codec error
        raise AtomicFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None


def _read_atomic(path: Path) -> AtomicTable:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not part of the header
        header = f.readline().rstrip("\r\n")
        if not header:
            raise AtomicFileError(f"{path}:1: empty header; expected tab-separated name:type fields")
        names, types = [], []
        for spec in header.split("\t"):
            name, sep, ftype = spec.partition(":")
            if not sep or not name or ftype not in FIELD_TYPES:
                raise AtomicFileError(
                    f"{path}:1: header field {spec!r} is not name:type with type in {', '.join(FIELD_TYPES)}"
                )
            names.append(name)
            types.append(ftype)
        rows, line_nos = [], []
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(names):
                raise AtomicFileError(
                    f"{path}:{line_no}: expected {len(names)} tab-separated fields, got {len(values)}"
                )
            rows.append([_parse_value(v, t, path, line_no, n) for v, t, n in zip(values, types, names)])
            line_nos.append(line_no)
    return AtomicTable(path=path, names=names, types=types, rows=rows, line_nos=line_nos)


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    inter: Path
    item: Path | None
    user: Path | None

    @classmethod
    def locate(cls, data_dir: str | Path) -> "DatasetFiles":
        """Finds `<name>.inter` (+ optional .item/.user) in a directory, RecBole-style."""
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise AtomicFileError(f"{data_dir}: dataset directory does not exist (run `make data`?)")
        preferred = data_dir / f"{data_dir.name}.inter"
        inters = [preferred] if preferred.is_file() else sorted(data_dir.glob("*.inter"))
        if len(inters) != 1:
            raise AtomicFileError(f"{data_dir}: expected exactly one .inter file, found {len(inters)}")
        stem = inters[0].with_suffix("")
        # beside it, not stem.with_suffix (a dotted name, `ml.v2`, would look for `ml.item`)
        item, user = stem.with_name(stem.name + ".item"), stem.with_name(stem.name + ".user")
        return cls(
            name=stem.name,
            inter=inters[0],
            item=item if item.is_file() else None,
            user=user if user.is_file() else None,
        )

    def checksum(self) -> str:
        h = hashlib.sha256()
        for p in (self.inter, self.item, self.user):
            if p is not None:
                h.update(p.name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: float
    order: int  # line order in the file: the stable tie-break for equal timestamps


def read_interactions(path: str | Path, user_field: str = "user_id", item_field: str = "item_id",
                      time_field: str = "timestamp") -> list[Interaction]:
    table = read_atomic(path)
    ui, ii = table.index(user_field), table.index(item_field)
    ti = table.names.index(time_field) if time_field in table.names else None
    if ti is not None and table.types[ti] != "float":
        raise AtomicFileError(f"{table.path}: field {time_field!r} must be float, is {table.types[ti]}")
    if ti is not None:  # an empty or nan timestamp does not sort: the user's order, and so the split, would be wrong
        bad = next((n for n, row in enumerate(table.rows) if not math.isfinite(row[ti])), None)
        if bad is not None:
            raise AtomicFileError(f"{table.path}:{table.line_nos[bad]}: field {time_field!r} is "
                                  f"{table.rows[bad][ti]!r}; every interaction needs a finite timestamp (the "
                                  "chronological split sorts by it)")
    return [
        Interaction(row[ui], row[ii], row[ti] if ti is not None else float(n), n)
        for n, row in enumerate(table.rows)
    ]


def _chronological(interactions: list[Interaction]) -> dict[str, list[Interaction]]:
    by_user: dict[str, list[Interaction]] = {}
    for x in interactions:
        by_user.setdefault(x.user_id, []).append(x)
    return {user: sorted(xs, key=lambda x: (x.timestamp, x.order)) for user, xs in by_user.items()}


def user_sequences(interactions: list[Interaction]) -> dict[str, list[str]]:
    """Each user's items in chronological order; equal timestamps keep file order."""
    return {user: [x.item_id for x in xs] for user, xs in _chronological(interactions).items()}


def user_times(interactions: list[Interaction]) -> dict[str, list[float]]:
    """Each user's interaction timestamps, aligned with `user_sequences` (the same order)."""
    return {user: [x.timestamp for x in xs] for user, xs in _chronological(interactions).items()}


@dataclass
class Split:
    """Leave-one-out: last item → test, second-to-last → validation, the rest → train."""

    train: dict[str, list[str]]
    valid: dict[str, str]
    test: dict[str, str]
    too_short: list[str] = field(default_factory=list)  # users with < min_length items, left out

    def valid_history(self, user: str) -> list[str]:
        """Input for predicting the validation item: the training items."""
        return self.train[user]

    def test_history(self, user: str) -> list[str]:
        """Input for predicting the test item: training items + the validation item."""
        return self.train[user] + [self.valid[user]]

    def checksum(self) -> str:
        h = hashlib.sha256()
        for user in sorted(self.train):
            h.update(f"{user}\t{' '.join(self.train[user])}\t{self.valid[user]}\t{self.test[user]}\n".encode())
        return h.hexdigest()


def leave_one_out(sequences: dict[str, list[str]], min_length: int = 3) -> Split:
    train, valid, test, too_short = {}, {}, {}, []
    for user, items in sequences.items():
        if len(items) < min_length:
            too_short.append(user)
            continue
        train[user], valid[user], test[user] = items[:-2], items[-2], items[-1]
    return Split(train=train, valid=valid, test=test, too_short=sorted(too_short))


def sample_users(users: list[str], n: int, seed: int) -> list[str]:
    """`n` of `users` drawn with `seed`, sorted (all of them when n is 0 or not smaller): the evaluation's
    test-user sample, which the served check (loadtest/served_quality.py) asks the servers for too."""
    import random

    return sorted(random.Random(seed).sample(users, n)) if 0 < n < len(users) else users
