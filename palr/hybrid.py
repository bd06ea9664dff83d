"""RSLLM/LLaRA-style hybrid prompts: each item in the prompt is its title plus one soft token whose input
embedding is a frozen SASRec item embedding passed through a trained projector into the LLM's space.

Token ids, not side tables: the soft token of the item at catalog index i is the id `vocab_size + i`
(`ItemTokens.token`). During training its input embedding is computed on the fly,
`ItemProjector(table)[i]` (`input_embeddings`); at merge the projector's output for every catalog item is
folded into the merged checkpoint's input-embedding matrix as extra vocabulary rows, the way LoRA is
folded into the weights (`fold_into_vocabulary`). So every engine serves a hybrid prompt as plain token
ids: in-flight batching, prefix and context KV reuse, the ONNX and TensorRT-LLM builds all see an
ordinary (slightly larger) vocabulary, and the prompt-building code is the only place that knows.

An item without an embedding (new in the catalog since the projector was trained) gets no soft token:
its title alone. The projector artifact (`llm/projector/`) keeps the frozen embedding table it was
trained on (with the SASRec checkpoint's version), so a later SASRec retrain cannot silently shift it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from palr.ranking import RANK_BUCKETS

PROJECTOR_DIR = "llm/projector"
WEIGHTS = "projector.safetensors"
SETTINGS = "projector.json"


@dataclass(frozen=True)
class ItemTokens:
    """The ranker's extra vocabulary after the base LLM's (`offset` = its size):

        offset + row                      an item's soft token (row = its SASRec table row; 0 is padding)
        offset + table_rows + b           trend bucket b of a candidate (palr/trends.py), b < trend_buckets
        offset + table_rows + trend_buckets + r * RANK_BUCKETS + b
                                          rank token: bucket b of a candidate's rank under the prompt's r-th
                                          ranking (`PromptSettings.rank_tokens`, palr.ranking.rank_buckets)
        offset + table_rows + trend_buckets + rank_rows   the score row: the LM-head row score mode reads at
                                          each candidate's last token (`PromptSettings.readout` "candidate")

    All of it is folded into the merged checkpoint like the LoRA weights (`fold_into_vocabulary`), so an
    engine sees plain token ids."""

    offset: int
    rows: dict[str, int]
    table_rows: int = 0          # rows of the item table (catalog + 1); 0: max(rows) + 1
    trend_buckets: int = 0
    rank_rows: int = 0           # rank-token rows: RANK_BUCKETS per ranking the prompt shows

    def __post_init__(self):
        if not self.table_rows:
            object.__setattr__(self, "table_rows", max(self.rows.values(), default=0) + 1)

    def token(self, item_id: str) -> int | None:
        row = self.rows.get(item_id)
        return None if row is None else self.offset + row

    def trend_token(self, bucket: int) -> int:
        if not 0 <= bucket < self.trend_buckets:
            raise ValueError(f"trend bucket {bucket} outside 0..{self.trend_buckets - 1}")
        return self.offset + self.table_rows + bucket

    def rank_token(self, ranking: int, bucket: int) -> int:
        """The token of rank bucket `bucket` under the prompt's `ranking`-th ranking."""
        row = ranking * RANK_BUCKETS + bucket
        if not (0 <= bucket < RANK_BUCKETS and 0 <= row < self.rank_rows):
            raise ValueError(f"rank bucket {bucket} of ranking {ranking} outside the {self.rank_rows} rank rows")
        return self.offset + self.table_rows + self.trend_buckets + row

    @property
    def score_token(self) -> int:
        return self.offset + self.table_rows + self.trend_buckets + self.rank_rows

    @property
    def size(self) -> int:
        """Extra rows: item table, trend buckets, rank rows, score row."""
        return self.table_rows + self.trend_buckets + self.rank_rows + 1

    @classmethod
    def for_catalog(cls, offset: int, item_ids: Iterable[str], trend_buckets: int = 0,
                    rank_rows: int = 0) -> "ItemTokens":
        """Rows = catalog indices (1-based, in catalog order), as the SASRec embedding table has them."""
        rows = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
        return cls(offset, rows, len(rows) + 1, trend_buckets, rank_rows)

    def to_dict(self) -> dict:
        return {"offset": self.offset, "rows": self.table_rows, "trend_buckets": self.trend_buckets,
                "rank_rows": self.rank_rows, "score_token": self.score_token}


def ranker_prompt(tokenizer, ranker: dict, catalog):
    """The PALR prompt a ranker (`llm/ranker.json`) was trained with, for this catalog: its settings and its
    extra vocabulary (soft tokens of the catalog's items; items beyond the trained table: titles alone).
    Evaluation, serving and the benchmark all build prompts through here."""
    from palr.prompt import PalrPrompt, PromptSettings

    settings = PromptSettings.from_dict(ranker["prompt"])
    meta = ranker.get("item_tokens")
    tokens = None
    if meta:
        table_rows = int(meta["rows"])
        rows = {item.id: i + 1 for i, item in enumerate(catalog.items) if i + 1 < table_rows}
        tokens = ItemTokens(int(meta["offset"]), rows, table_rows, int(meta.get("trend_buckets", 0)),
                            int(meta.get("rank_rows", 0)))
    return PalrPrompt(tokenizer, settings, tokens)


def read_settings(directory: Path) -> dict:
    return json.loads((Path(directory) / SETTINGS).read_text())


# -- torch ------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def extra_rows(table, hidden: int, trend_buckets: int = 0, trend_init=None, rank_rows: int = 0, rank_init=None):
    """The ranker's extra vocabulary rows as one trainable module (layout: `ItemTokens`): forward returns
    `[table_rows + trend_buckets + rank_rows + 1, hidden]`, i.e.

      items   the frozen item-embedding table `[N, d]` through an MLP into the LLM's input space (LLaRA's
              projector: Linear-GELU-Linear)
      trend   one learned input row per trend bucket (initialised from `trend_init`, e.g. digit tokens)
      rank    one learned input row per rank bucket of each ranking the prompt shows (from `rank_init`)
      score   the score row: score mode reads `hidden · score` at each candidate (zero at the start, so
              an untrained ranker adds nothing to the retrieval order it is fused with)

    and `trend_bias` `[trend_buckets]` / `rank_bias` `[rank_rows]`, a learned additive score per trend bucket and
    per rank bucket (the ranking head's bias, applied outside the network: llm/ranker.json trend_bias,
    rank_bias; palr.ranking.head_bias)."""
    torch = _torch()

    class ExtraRows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", table.detach().clone().float())  # [N, d], frozen
            d = table.shape[1]
            self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
            init = trend_init if trend_init is not None else torch.zeros(trend_buckets, hidden)
            self.trend = torch.nn.Parameter(init.detach().clone().float().reshape(trend_buckets, hidden))  # [B, D]
            self.score = torch.nn.Parameter(torch.zeros(hidden))  # [D]
            self.trend_bias = torch.nn.Parameter(torch.zeros(trend_buckets))  # [B]
            init = rank_init if rank_init is not None else torch.zeros(rank_rows, hidden)
            self.rank = torch.nn.Parameter(init.detach().clone().float().reshape(rank_rows, hidden))  # [R, D]
            self.rank_bias = torch.nn.Parameter(torch.zeros(rank_rows))  # [R]

        @property
        def trend_buckets(self) -> int:
            return self.trend.shape[0]

        def forward(self):
            rows = [self.net(self.table), self.trend, self.rank, self.score[None]]
            return torch.cat(rows, 0)  # [N + B + R + 1, hidden]

    return ExtraRows()


def input_embeddings(model, input_ids, items=None):
    """Input embeddings `[B, T, D]` for ids that may hold soft tokens (>= the model's text vocabulary):
    text ids through the model's embedding, soft ids through `items` `[N, D]` (the projected table)."""
    torch = _torch()
    embedding = model.get_input_embeddings()
    vocab = embedding.num_embeddings
    text = embedding(input_ids.clamp(max=vocab - 1))  # [B, T, D]
    if items is None:
        return text
    soft = input_ids >= vocab  # [B, T]
    if not bool(soft.any()):
        return text
    # one-hot rows times the table, not an index: its backward is a plain matmul, so training (and a run
    # resumed from a checkpoint) is bit-for-bit reproducible, where an indexed gather's backward accumulates
    # in a thread-dependent order
    rows = torch.nn.functional.one_hot(input_ids[soft] - vocab, items.shape[0]).to(items.dtype)  # [S, N]
    out = text.clone()
    out[soft] = (rows @ items).to(text.dtype)  # [S, D]
    return out


def save_projector(directory: Path, projector, settings: dict) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(directory / WEIGHTS))
    (directory / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")


def load_projector(directory: Path, hidden: int):
    """The extra rows module saved by `save_projector`."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / WEIGHTS))
    module = extra_rows(state["table"], hidden, state["trend"].shape[0], rank_rows=state["rank"].shape[0])
    module.load_state_dict(state)
    return module.eval()


def fold_into_vocabulary(model, rows, offset: int) -> int:
    """Appends the extra rows (`extra_rows`: items, trend buckets, rank rows, score row) to the model's
    vocabulary at ids offset..; the text vocabulary and everything else unchanged. Input embeddings get every
    row. The LM head must give the score row (what score mode reads): with tied embeddings it is the same
    matrix; an untied head gets the score row and zeros elsewhere (no constraint ever allows an extra token).
    Returns the new vocabulary size."""
    torch = _torch()
    if model.get_input_embeddings().num_embeddings != offset:
        raise ValueError(f"model vocabulary {model.get_input_embeddings().num_embeddings} != item token offset "
                         f"{offset}: fold once, into the base vocabulary")
    with torch.no_grad():
        extra = rows()  # [X, D]
        size = offset + extra.shape[0]
        model.resize_token_embeddings(size, mean_resizing=False)
        weight = model.get_input_embeddings().weight
        weight[offset:size] = extra.to(weight.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != weight.data_ptr():
            head.weight[offset:size] = 0
            head.weight[size - 1] = extra[-1].to(head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[offset:size] = 0
    return size
