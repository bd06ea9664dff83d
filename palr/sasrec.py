"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) in torch.

A causal transformer over a user's item sequence; the hidden state at position t, dotted with
the (shared) item embeddings, scores every catalog item as the item after position t.

Written so that one forward exports to ONNX and runs in ONNX Runtime unchanged:
  - histories are LEFT-padded with 0 (most recent item last), and positions count back from the
    most recent item, so extra left padding never changes the result;
  - the attention mask comes from comparisons of `arange`s (no `torch.tril`, which ORT rejects);
  - every query may attend to itself, so fully padded rows (a user with no history) give finite
    numbers instead of NaN;
  - `SASRecTopK` masks excluded items (scatter of -inf) and takes the top-k inside the graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

PAD = 0


@dataclass(frozen=True)
class SASRecArch:
    """Everything needed to rebuild the network from a checkpoint."""

    num_indices: int  # catalog items + 1 (index 0 is padding)
    max_len: int = 50
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    ffn_hidden: int = 256
    dropout: float = 0.2
    activation: str = "gelu"  # gelu | relu
    norm: str = "pre"  # pre: LayerNorm before each sublayer (+ a final one); post: after (BERT/RecBole)


def attention_mask(history: torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to: earlier-or-same real items, and always itself.

    history: [B, T] item indices, 0 = padding. Returns bool [B, 1, T, T] (query, key).
    """
    positions = torch.arange(history.shape[1], device=history.device)  # [T]
    causal = positions[None, :] <= positions[:, None]  # [T, T]: key ≤ query
    itself = positions[None, :] == positions[:, None]  # [T, T]
    key_is_item = (history != PAD)[:, None, None, :]  # [B, 1, 1, T]
    return causal & (key_is_item | itself)  # [B, 1, T, T]


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim)  # [B, T, 3, nh, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, T, hd]
        weights = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # [B, nh, T, T]
        weights = weights.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = self.attn_dropout(weights) @ v  # [B, nh, T, hd]
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))  # [B, T, H]


class Block(nn.Module):
    def __init__(self, arch: SASRecArch):
        super().__init__()
        act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[arch.activation]
        self.pre_norm = arch.norm == "pre"
        self.attn = SelfAttention(arch.hidden, arch.heads, arch.dropout)
        self.ffn = nn.Sequential(nn.Linear(arch.hidden, arch.ffn_hidden), act, nn.Dropout(arch.dropout),
                                 nn.Linear(arch.ffn_hidden, arch.hidden))
        self.norm1 = nn.LayerNorm(arch.hidden)
        self.norm2 = nn.LayerNorm(arch.hidden)
        self.dropout = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:  # [B, T, H] → [B, T, H]
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.norm1(x), allowed))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x, allowed)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class SASRec(nn.Module):
    def __init__(self, arch: SASRecArch):
        super().__init__()
        if arch.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {arch.norm!r}")
        self.arch = arch
        self.item_emb = nn.Embedding(arch.num_indices, arch.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(arch.max_len, arch.hidden)
        self.emb_dropout = nn.Dropout(arch.dropout)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.blocks))
        # pre-LN normalises the output of the last block; post-LN normalises the embeddings instead.
        self.norm = nn.LayerNorm(arch.hidden)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT-style init (normal, std 0.02), as RecBole's SASRec; padding row zeroed."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """history: [B, T] left-padded item indices (T ≤ max_len) → hidden states [B, T, H]."""
        length = history.shape[1]
        recency = length - 1 - torch.arange(length, device=history.device)  # [T]: most recent → 0
        x = self.item_emb(history) + self.pos_emb(recency)[None]  # [B, T, H]
        if self.arch.norm == "post":
            x = self.norm(x)
        x = self.emb_dropout(x)
        allowed = attention_mask(history)  # [B, 1, T, T]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x) if self.arch.norm == "pre" else x

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] → a score for every item index [..., N] (index 0 included)."""
        return hidden @ self.item_emb.weight.T

    def next_item_scores(self, history: torch.Tensor) -> torch.Tensor:
        """history: [B, T] → scores of the item after the most recent one [B, N]."""
        return self.scores(self(history)[:, -1])

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: str | Path, **extra) -> None:
        torch.save({"arch": asdict(self.arch), "state_dict": self.state_dict(), **extra}, path)

    @classmethod
    def load(cls, path: str | Path) -> "SASRec":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(SASRecArch(**checkpoint["arch"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()


def mask_items(scores: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """scores: [B, N]; exclude: [B, E] item indices (0-padded) → scores with those and padding at -inf."""
    masked = torch.cat([exclude.new_zeros((exclude.shape[0], 1)), exclude], dim=1)  # [B, 1 + E]
    return scores.scatter(1, masked, float("-inf"))  # [B, N]


class SASRecTopK(nn.Module):
    """What serving runs: (history, exclude) → (scores, indices) of the top-k allowed items.

    history: int64 [B, max_len], left-padded; exclude: int64 [B, E] item indices to mask
    (0-padded). Padding (index 0) is always masked. Masked items score -inf.
    """

    def __init__(self, model: SASRec, top_k: int):
        super().__init__()
        if not 0 < top_k <= model.arch.num_indices:
            raise ValueError(f"top_k must be in 1..{model.arch.num_indices}, got {top_k}")
        self.model = model
        self.top_k = top_k

    def forward(self, history: torch.Tensor, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = mask_items(self.model.next_item_scores(history), exclude)  # [B, N]
        top = torch.topk(scores, self.top_k, dim=1)
        return top.values, top.indices  # [B, k], [B, k]
