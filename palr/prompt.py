"""The PALR prompt, in one place: training (`compile sft-data`), evaluation and the ranking server
all build token ids here, so what the model was tuned on is exactly what it is asked.

A prompt has three parts (PALR, arXiv 2305.07622): the user's profile keywords, the interaction
history (the most recent N titles with years, oldest first) and, for *Recommend_Retrieval*, the
candidates, each behind a single-token label (" A" ... " T"):

    prefix  (identical for every request of a task: its KV is computed once and reused)
        <|im_start|>system ... <|im_end|> <|im_start|>user
        Pick the movie this user will watch next from the candidates. ...
    suffix  (per request)
        Profile: drama, comedy, 1990s, mainstream
        Watched: Heat (1995); Fargo (1996); ...
        Candidates:
         A Toy Story
         B Scream
        ...<|im_end|> <|im_start|>assistant
    answer  " B Scream\\n"   (label, then the candidate's title tokens as the list shows them, then a newline)

Score mode reads one logit per candidate in one forward pass (`Readout`): with `readout="label"` the
labels' next-token logits after the suffix (a verbalizer); with `readout="candidate"` the score row's
logit at each candidate's own last token (no label-letter prior, so no position bias from it). With
`trend=True` each candidate line ends with its trend token (palr/trends.py), then with `rank_tokens` one
token per named ranking (its rank bucket among the candidates under EASE's or SASRec's scores), and the
candidate readout reads at the line's last token. Generate mode lets the model write answer lines: a label, then that
candidate's title tokens exactly as its list line shows them (without the line's soft, trend and rank tokens;
see `palr.decoding.TitleConstraint`).

Every piece (preamble, profile, each title, each separator) is tokenized on its own and the ids
are concatenated, so a title is the same token sequence wherever it appears (history, candidate
list, answer) and prefix + suffix ids never depend on how a tokenizer would merge across pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from palr.ranking import RANK_BUCKETS, RANKINGS

RECOMMEND = "recommend"  # history → the next item titles (training only)
READOUTS = ("label", "candidate")
RETRIEVAL = "retrieval"  # history + candidates → the label of the next item (training and serving)
TASKS = (RECOMMEND, RETRIEVAL)
PROMPTS = ("text", "hybrid", "ids")

SYSTEM = "You are a movie recommender."
INSTRUCTIONS = {
    RETRIEVAL: ("Pick the movie this user will watch next from the candidates. "
                "Answer with its letter and title."),
    RECOMMEND: "Name the movies this user will watch next, one title per line.",
}
_PLACEHOLDER = "\x00USER\x00"


def chat_frame(tokenizer, earlier: list[dict]) -> tuple[str, str]:
    """The tokenizer's chat template around one user message after the `earlier` messages, with the generation
    prompt: (the text before the message, the text after it)."""
    messages = [*earlier, {"role": "user", "content": _PLACEHOLDER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, _, tail = text.partition(_PLACEHOLDER)
    return head, tail


class PromptError(ValueError):
    """A prompt that cannot be built as asked (too many candidates, a label that is not one token)."""


@dataclass
class PromptSettings:
    """How prompts are built; stored in `llm/ranker.json` so serving builds them as training did."""

    history_items: int = field(default=10, metadata={"help": "most recent history titles shown"})
    history_years: bool = field(default=True, metadata={"help": "show release years in the history"})
    candidate_years: bool = field(default=False, metadata={"help": "show release years in the candidate list"})
    profile: bool = field(default=True, metadata={"help": "include the profile keywords"})
    chat_template: bool = field(default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template"})
    max_title_tokens: int = field(default=16, metadata={"help": "titles are cut to this many tokens"})
    label_prefix: str = field(default=" ", metadata={"help": "text before each label letter"})
    label_alphabet: str = field(default="ABCDEFGHIJKLMNOPQRSTUVWXYZ", metadata={
        "help": "label letters; the candidate count is at most their number"})
    prompt: str = field(default="text", metadata={
        "help": "how items appear: text (title), hybrid (title + a soft token carrying its SASRec embedding, "
                "RSLLM) or ids (the soft token alone); see palr/hybrid.py", "choices": ("text", "hybrid", "ids")})
    trend: bool = field(default=False, metadata={
        "help": "end each candidate line with its trend token: how much the item was watched in the days before "
                "the request (palr/trends.py)"})
    rank_tokens: list[str] = field(default_factory=list, metadata={
        "help": f"after the trend token, one token per named ranking ({', '.join(RANKINGS)}: EASE's or SASRec's "
                "scores of the candidates): the candidate's rank bucket among the candidates under it "
                "(palr.ranking.rank_buckets); the option alone: none", "nargs": "*"})
    readout: str = field(default="label", metadata={
        "help": "what score mode reads: label (each candidate label's logit after the prompt, a verbalizer) or "
                "candidate (the score row's logit at each candidate's last token: no label-letter prior)",
        "choices": READOUTS})

    def extra_tokens_used(self) -> list[str]:
        """What of the ranker's extra vocabulary (rows the fine-tune adds past the base model's) these prompts use;
        none: a text prompt with label readout, which the untuned base model can read."""
        return [what for what, used in (("soft tokens", self.prompt != "text"), ("trend tokens", self.trend),
                                        ("rank tokens", bool(self.rank_tokens)),
                                        ("a score row", self.readout == "candidate")) if used]

    def to_dict(self) -> dict:
        """Only the prompt's own fields (a step config that extends this class carries more)."""
        return {f.name: getattr(self, f.name) for f in fields(PromptSettings)}

    @classmethod
    def from_dict(cls, values: dict) -> "PromptSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise PromptError(f"unknown prompt settings {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class Readout:
    """What score mode reads, per candidate (candidate order): the logit of `tokens[c]` at prompt position
    `positions[c]` (0-based in prefix + suffix). The scores are their log-softmax over the candidates."""

    positions: tuple[int, ...]
    tokens: tuple[int, ...]

    def __post_init__(self):
        if len(self.positions) != len(self.tokens):
            raise ValueError(f"readout: {len(self.positions)} positions for {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def end(self) -> int:
        """The prompt tokens this readout needs: up to its last position. A causal model's later tokens
        cannot change these logits, so score mode runs no further (the chat template's closing turn)."""
        return max(self.positions) + 1

    @classmethod
    def after_prompt(cls, prompt_len: int, labels: Sequence[int]) -> "Readout":
        """The label readout: each label's logit after the prompt's last token."""
        return cls((prompt_len - 1,) * len(labels), tuple(int(t) for t in labels))


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one prompt. `input_ids` = prefix + suffix, as the model sees them."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    label_token_ids: list[int]  # one per candidate, in candidate order ([] for RECOMMEND)
    candidate_line_ids: list[list[int]]  # each candidate's title line after its label, "\n" included
    readout: Readout | None = None  # what score mode reads (RETRIEVAL only)
    context_len: int = 0  # suffix tokens before the candidates (profile, history): the same on a user's calls

    @property
    def input_ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids


@dataclass(frozen=True)
class Title:
    """What the prompt shows of an item: its title and (optionally shown) year; `id` finds its soft token."""

    title: str
    year: str = ""
    id: str = ""


class PalrPrompt:
    """Builds PALR prompts for one tokenizer and one `PromptSettings`.

    Labels are checked once, here: each must be exactly one token, or building fails clearly.
    Hybrid prompts (`settings.prompt` hybrid or ids) need `item_tokens`: each item's soft-token id
    (`palr.hybrid.ItemTokens`); an item without one is shown by its title alone."""

    def __init__(self, tokenizer, settings: PromptSettings | None = None, item_tokens=None):
        self.tokenizer = tokenizer
        self.settings = PromptSettings.from_dict((settings or PromptSettings()).to_dict())
        if self.settings.prompt not in PROMPTS:
            raise PromptError(f"prompt must be one of {PROMPTS}, got {self.settings.prompt!r}")
        if self.settings.readout not in READOUTS:
            raise PromptError(f"readout must be one of {READOUTS}, got {self.settings.readout!r}")
        needs = self.settings.extra_tokens_used()
        if needs and item_tokens is None:
            raise PromptError(f"this prompt needs the ranker's extra vocabulary for {', '.join(needs)} "
                              f"(palr.hybrid.ItemTokens, from llm/ranker.json)")
        if self.settings.trend and not item_tokens.trend_buckets:
            raise PromptError("trend prompts need trend tokens: the extra vocabulary has no trend buckets")
        unknown = [name for name in self.settings.rank_tokens if name not in RANKINGS]
        if unknown:
            raise PromptError(f"unknown rank tokens {unknown}: choose from {', '.join(RANKINGS)}")
        if self.settings.rank_tokens and (item_tokens is None or item_tokens.rank_rows < RANK_BUCKETS * len(
                self.settings.rank_tokens)):
            raise PromptError(f"rank tokens {self.settings.rank_tokens} need {RANK_BUCKETS} rank rows each in the "
                              f"extra vocabulary (palr.hybrid.ItemTokens), it has "
                              f"{0 if item_tokens is None else item_tokens.rank_rows}")
        self.vocabulary = item_tokens  # the extra vocabulary (trend and score tokens)
        self.item_tokens = item_tokens if self.settings.prompt != "text" else None  # soft tokens
        self._labels = self._single_token_labels()
        self._head, self._tail = self._frame()
        self._newline = self._ids("\n")
        self._prefix = {task: self._prefix_ids(task) for task in TASKS}

    # -- tokens ----------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        """The prompt's own text (the chat frame's control tokens included)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def data_ids(self, text: str) -> list[int]:
        """Text from the data (titles, profiles): "<|im_end|>" in a title is those characters, not the control
        token that would close the chat turn mid-prompt."""
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []

    def _single_token_labels(self) -> list[int]:
        if not self.settings.label_alphabet:
            raise PromptError("the label alphabet is empty: a prompt needs one label per candidate")
        ids = []
        for letter in self.settings.label_alphabet:
            text = self.settings.label_prefix + letter
            tokens = self._ids(text)
            if len(tokens) != 1:
                raise PromptError(
                    f"label {text!r} is {len(tokens)} tokens {tokens} in this tokenizer; labels must be single "
                    f"tokens so one forward pass scores every candidate (try another --label-prefix or alphabet)")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise PromptError(f"labels {self.settings.label_alphabet!r} do not map to distinct tokens: {ids}")
        return ids

    @property
    def max_candidates(self) -> int:
        return len(self._labels)

    def label_token_ids(self, n: int) -> list[int]:
        if not 0 < n <= len(self._labels):
            raise PromptError(f"{n} candidates: this prompt labels 1 to {len(self._labels)} "
                              f"({self.settings.label_alphabet[0]}..{self.settings.label_alphabet[-1]})")
        return self._labels[:n]

    def _frame(self) -> tuple[str, str]:
        """Text before the user message and after it (chat template or plain)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not (self.settings.chat_template and template):
            return "", "\nAnswer:"
        return chat_frame(self.tokenizer, [{"role": "system", "content": SYSTEM}])

    def _prefix_ids(self, task: str) -> list[int]:
        head = self._head if self._head else SYSTEM + "\n"
        bos = self.tokenizer.bos_token
        adds_bos = bool(self.tokenizer.encode("", add_special_tokens=True))
        # a tokenizer that adds BOS by itself gets it once, unless the chat template already wrote it
        lead = [] if not adds_bos or (bos and head.startswith(bos)) else self.tokenizer.encode("", add_special_tokens=True)
        return lead + self._ids(head) + self._ids(INSTRUCTIONS[task] + "\n")

    def prefix_ids(self, task: str = RETRIEVAL) -> list[int]:
        """The shared instruction preamble of a task: identical for every request."""
        return list(self._prefix[task])

    @functools.lru_cache(maxsize=8192)
    def _title_ids(self, title: str, year: str, with_year: bool) -> tuple[int, ...]:
        ids = self.data_ids(" " + title.strip())[: self.settings.max_title_tokens]
        if with_year and year:
            ids += self.data_ids(f" ({year})")
        return tuple(ids)

    def item_ids(self, item: Title, with_year: bool) -> list[int]:
        """How the prompt shows an item: its title (and year), then its soft token in hybrid prompts; in
        ids prompts the soft token alone (the title when the item has none)."""
        soft = self.item_tokens.token(getattr(item, "id", "")) if self.item_tokens else None
        if soft is None:
            return list(self._title_ids(item.title, item.year, with_year))
        if self.settings.prompt == "ids":
            return [soft]
        return list(self._title_ids(item.title, item.year, with_year)) + [soft]

    def title_line_ids(self, item: Title) -> list[int]:
        """A candidate's line after its label: " Title\\n" (the unit generate mode writes)."""
        return list(self._title_ids(item.title, item.year, self.settings.candidate_years)) + self._newline

    # -- prompts ---------------------------------------------------------------------------------

    def _context_ids(self, profile: str, history: Sequence[Title]) -> list[int]:
        ids: list[int] = []
        if self.settings.profile and profile.strip():
            ids += self._ids("Profile:") + self.data_ids(" " + profile.strip()) + self._newline
        recent = list(history)[-self.settings.history_items:] if self.settings.history_items > 0 else []
        ids += self._ids("Watched:")
        for i, item in enumerate(recent):
            ids += (self._ids(";") if i else []) + self.item_ids(item, self.settings.history_years)
        return ids + self._newline

    def retrieval(self, profile: str, history: Sequence[Title], candidates: Sequence[Title],
                  trends: Sequence[int] | None = None, ranks: Sequence[Sequence[int]] | None = None) -> PromptParts:
        """Recommend_Retrieval: pick from the candidates. What score and generate modes run.

        Each candidate line is its label, the item, and (trend prompts) its trend token (`trends`: one
        bucket per candidate, palr/trends.py) and rank tokens (`ranks`: per candidate, its rank bucket under each
        of `settings.rank_tokens`, palr.ranking.candidate_ranks); a candidate's last token is where a candidate
        readout reads."""
        labels = self.label_token_ids(len(candidates))
        if self.settings.trend and (trends is None or len(trends) != len(candidates)):
            raise PromptError(f"a trend prompt needs one trend bucket per candidate "
                              f"({len(candidates)}), got {None if trends is None else len(trends)}")
        rankings = len(self.settings.rank_tokens)
        if rankings and (ranks is None or len(ranks) != len(candidates) or any(len(r) != rankings for r in ranks)):
            raise PromptError(f"a prompt with rank tokens {self.settings.rank_tokens} needs {rankings} rank "
                              f"bucket(s) for each of the {len(candidates)} candidates")
        prefix = self.prefix_ids(RETRIEVAL)
        lines = [self.title_line_ids(c) for c in candidates]
        suffix = self._context_ids(profile, history) + self._ids("Candidates:") + self._newline
        context_len = len(suffix)
        ends = []
        for c, (label, item) in enumerate(zip(labels, candidates)):
            suffix += [label] + self.item_ids(item, self.settings.candidate_years)
            if self.settings.trend:
                suffix.append(self.vocabulary.trend_token(int(trends[c])))
            for r in range(rankings):
                suffix.append(self.vocabulary.rank_token(r, int(ranks[c][r])))
            ends.append(len(prefix) + len(suffix) - 1)
            suffix += self._newline
        suffix += self._ids(self._tail)
        if self.settings.readout == "candidate":
            readout = Readout(tuple(ends), (self.vocabulary.score_token,) * len(candidates))
        else:
            readout = Readout((len(prefix) + len(suffix) - 1,) * len(candidates), tuple(labels))
        return PromptParts(prefix, suffix, labels, lines, readout, context_len)

    def recommend(self, profile: str, history: Sequence[Title]) -> PromptParts:
        """Recommend: name the next items (no candidates). Training only."""
        suffix = self._context_ids(profile, history) + self._ids(self._tail)
        return PromptParts(self.prefix_ids(RECOMMEND), suffix, [], [])

    # -- answers (training targets) --------------------------------------------------------------

    def retrieval_answer(self, parts: PromptParts, position: int) -> list[int]:
        """The answer naming candidate `position`: its label, then its title line."""
        return [parts.label_token_ids[position]] + parts.candidate_line_ids[position]

    def recommend_answer(self, items: Sequence[Title]) -> list[int]:
        """The next items, one title line each (years as in the history)."""
        ids: list[int] = []
        for item in items:
            ids += list(self._title_ids(item.title, item.year, self.settings.history_years)) + self._newline
        return ids
