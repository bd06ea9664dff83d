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

PROJECTOR_DIR = "llm/projector"
WEIGHTS = "projector.safetensors"
SETTINGS = "projector.json"


@dataclass(frozen=True)
class ItemTokens:
    """Item id -> soft-token id (`offset` = the base LLM's vocabulary size, + the item's table row)."""

    offset: int
    rows: dict[str, int]

    def token(self, item_id: str) -> int | None:
        row = self.rows.get(item_id)
        return None if row is None else self.offset + row

    @classmethod
    def for_catalog(cls, offset: int, item_ids: Iterable[str]) -> "ItemTokens":
        """Rows = catalog indices (1-based, in catalog order), as the SASRec embedding table has them."""
        return cls(offset, {item_id: i + 1 for i, item_id in enumerate(item_ids)})


def ranker_prompt(tokenizer, ranker: dict, catalog):
    """The PALR prompt a ranker (`llm/ranker.json`) was trained with, for this catalog: its settings and, for
    hybrid prompts, each catalog item's soft token (items beyond the trained table: titles alone). Evaluation,
    serving and the benchmark all build prompts through here."""
    from palr.prompt import PalrPrompt, PromptSettings

    settings = PromptSettings.from_dict(ranker["prompt"])
    tokens = None
    if settings.prompt != "text":
        meta = ranker["item_tokens"]
        rows = {item.id: i + 1 for i, item in enumerate(catalog.items) if i + 1 < int(meta["rows"])}
        tokens = ItemTokens(int(meta["offset"]), rows)
    return PalrPrompt(tokenizer, settings, tokens)


def read_settings(directory: Path) -> dict:
    return json.loads((Path(directory) / SETTINGS).read_text())


# -- torch ------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def item_projector(table, hidden: int):
    """MLP from the frozen item-embedding table `[N, d]` into the LLM's input space (LLaRA's projector:
    Linear-GELU-Linear); its forward returns the projected table `[N, hidden]`."""
    torch = _torch()

    class ItemProjector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", table.detach().clone().float())  # [N, d], frozen
            d = table.shape[1]
            self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))

        def forward(self):
            return self.net(self.table)  # [N, hidden]

    return ItemProjector()


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
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / WEIGHTS))
    projector = item_projector(state["table"], hidden)
    projector.load_state_dict(state)
    return projector.eval()


def fold_into_vocabulary(model, projector, offset: int) -> int:
    """Appends the projected item table to the model's input embeddings (ids offset.. offset+N); the
    text vocabulary and everything else unchanged. With tied embeddings the LM head gains the same rows,
    which no constraint ever allows and score mode never reads. Returns the new vocabulary size."""
    torch = _torch()
    if model.get_input_embeddings().num_embeddings != offset:
        raise ValueError(f"model vocabulary {model.get_input_embeddings().num_embeddings} != item token offset "
                         f"{offset}: fold once, into the base vocabulary")
    with torch.no_grad():
        items = projector()  # [N, D]
        size = offset + items.shape[0]
        model.resize_token_embeddings(size, mean_resizing=False)
        weight = model.get_input_embeddings().weight
        weight[offset:size] = items.to(weight.dtype)
    return size
