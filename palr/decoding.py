"""Per-request decoding constraints for generate mode: which tokens may come next, and what was picked.

A decoder (the one-at-a-time reference in `palr.llm` or a batching engine) drives a constraint with
three questions per step and nothing else, so any constraint plugs into any decoder:

    while not c.done:
        allowed = c.allowed_tokens()          # token ids the model may pick now
        extra = c.token_bias(bias)            # additive logit per allowed token (score fusion)
        c.advance(argmax over allowed of logits[allowed] + extra)
    c.emitted()                               # candidate positions, in the order the model named them

`LabelConstraint` ranks by single-token labels (" A", " B", ...): each step names one candidate not
named yet, and it stops after exactly k. `TitleConstraint` (the PALR answer format of `palr.prompt`)
writes k lines, each a label not named yet followed by that candidate's title tokens (forced), with
the bias on the label token that starts each line.

Pure Python on purpose: no torch here, so `import palr` stays light.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

# Generate mode checks a draft of the bias's own next picks in one pass (`palr.llm.draft_by_bias`): at most
# this many tokens a pass (1 = plain decoding, one token a pass). The answer is the same either way.
DRAFT_TOKENS = 16


class DecodingConstraint(ABC):
    """One request's constraint; stateful, used by one decoder at a time, never shared."""

    @abstractmethod
    def allowed_tokens(self) -> list[int]:
        """Token ids the model may emit next, in a fixed order (ties go to the first). Empty when done."""

    @abstractmethod
    def token_bias(self, bias: Sequence[float]) -> list[float]:
        """Additive logit for each of `allowed_tokens()` (same order), given one bias per candidate.

        A candidate's bias applies to the token that starts it; continuation tokens get 0."""

    @abstractmethod
    def advance(self, token_id: int) -> None:
        """Record that `token_id` was emitted. Raises ValueError if it was not allowed."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once nothing more may be emitted."""

    @property
    @abstractmethod
    def max_new_tokens(self) -> int:
        """Upper bound on the number of `advance` calls: what a decoder reserves in its KV cache."""

    @abstractmethod
    def emitted(self) -> list[int]:
        """Candidate positions (0-based, in candidate order of the prompt) in the order emitted."""

    def fork(self) -> "DecodingConstraint":
        """An independent copy in the same state: generate mode tries picks ahead on it (its drafts)."""
        return copy.deepcopy(self)


class LabelConstraint(DecodingConstraint):
    """Emit exactly `k` distinct candidate labels; each label is one token (" A" ... " T").

    Allowed at every step: the labels of candidates not yet emitted, in candidate order.
    """

    def __init__(self, label_token_ids: Sequence[int], k: int):
        labels = [int(t) for t in label_token_ids]
        if not labels:
            raise ValueError("label_token_ids is empty: there is no candidate to rank")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label_token_ids has duplicates: {labels}")
        if not 1 <= k <= len(labels):
            raise ValueError(f"k={k} must be between 1 and the number of candidates ({len(labels)})")
        self._labels = labels
        self._position = {token: i for i, token in enumerate(labels)}
        self._k = k
        self._emitted: list[int] = []

    def allowed_tokens(self) -> list[int]:
        if self.done:
            return []
        taken = set(self._emitted)
        return [token for i, token in enumerate(self._labels) if i not in taken]

    def token_bias(self, bias: Sequence[float]) -> list[float]:
        if len(bias) != len(self._labels):
            raise ValueError(f"bias has {len(bias)} values for {len(self._labels)} candidates")
        return [float(bias[self._position[token]]) for token in self.allowed_tokens()]

    def advance(self, token_id: int) -> None:
        position = self._position.get(int(token_id))
        if self.done or position is None or position in self._emitted:
            raise ValueError(f"token {token_id} is not allowed now (allowed: {self.allowed_tokens()})")
        self._emitted.append(position)

    @property
    def done(self) -> bool:
        return len(self._emitted) >= self._k

    @property
    def max_new_tokens(self) -> int:
        return self._k

    def emitted(self) -> list[int]:
        return list(self._emitted)


class TitleConstraint(DecodingConstraint):
    """Write exactly `k` candidate lines, each a label not written yet followed by that candidate's
    title line (" B" " Scream" "\\n"): the answer format `palr.prompt` trains, so the model writes
    titles (PALR) while every line is that candidate's label and title tokens as its list line shows them
    (the list line's soft, trend and rank tokens are not written).

    The choice is made at the label (same tokens, same bias, as `LabelConstraint`); the title tokens
    after it are forced. So no line can name an item outside the list or repeat one.
    """

    def __init__(self, label_token_ids: Sequence[int], line_token_ids: Sequence[Sequence[int]], k: int):
        self._labels = LabelConstraint(label_token_ids, k)
        lines = [[int(t) for t in line] for line in line_token_ids]
        if len(lines) != len(label_token_ids):
            raise ValueError(f"{len(lines)} title lines for {len(label_token_ids)} labels")
        if any(not line for line in lines):
            raise ValueError("every candidate needs a non-empty title line")
        self._lines = lines
        self._pending: list[int] = []  # forced title tokens still to write on the current line
        self._max_new_tokens = k + sum(sorted(map(len, lines), reverse=True)[:k])

    def allowed_tokens(self) -> list[int]:
        return self._pending[:1] if self._pending else self._labels.allowed_tokens()

    def token_bias(self, bias: Sequence[float]) -> list[float]:
        return [0.0] if self._pending else self._labels.token_bias(bias)

    def advance(self, token_id: int) -> None:
        if self._pending:
            if int(token_id) != self._pending[0]:
                raise ValueError(f"token {token_id} is not allowed now (allowed: {self._pending[:1]})")
            self._pending.pop(0)
            return
        self._labels.advance(token_id)
        self._pending = list(self._lines[self._labels.emitted()[-1]])

    @property
    def done(self) -> bool:
        return self._labels.done and not self._pending

    @property
    def max_new_tokens(self) -> int:
        return self._max_new_tokens

    def emitted(self) -> list[int]:
        return self._labels.emitted()


def answer_constraint(generate_format: str, label_token_ids: Sequence[int],
                      candidate_line_ids: Sequence[Sequence[int]], k: int) -> DecodingConstraint:
    """Generate mode's constraint for the ranker's answer format (`llm/ranker.json`'s `generate_format`):
    "titles" → `TitleConstraint`, "labels" → `LabelConstraint`. Used by evaluation and by the server."""
    if generate_format == "titles":
        return TitleConstraint(label_token_ids, candidate_line_ids, k)
    if generate_format == "labels":
        return LabelConstraint(label_token_ids, k)
    raise ValueError(f"unknown generate_format {generate_format!r} (expected 'titles' or 'labels')")
