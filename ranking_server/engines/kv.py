"""Preallocated slot KV cache for in-flight batching over a Hugging Face decoder.

Each running request owns one slot (a row) and its own length. Per layer the cache holds
`keys/values [slots, kv_heads, max_len, head_dim]`. A forward pass runs a contiguous range of slots
`[first, first + B)`; each row's new keys/values are written at that row's own positions, and
attention reads the range as a view `[B, kv_heads, kv_len, head_dim]` (no gather), masked per row by
a 4-D mask, with per-row `position_ids`. Stale entries past a row's length are never attended.
The view is `KEY_ALIGN` keys wider than needed, rounded up (masked): torch's CPU flash attention runs ~2x
slower on some odd key lengths (bf16, 350 queries: 3.9 ms at 385 keys, 1.4 ms at 416; loadtest.md). Likewise
a prompt pass's rows are right-padded to a multiple of `TOKEN_ALIGN` tokens (`pass_width`; serving.md).

It is a `transformers.Cache` passed as `past_key_values`: the decoder layers call `update()`. Because
we pass a 4-D mask and `position_ids`, the model neither builds a mask nor asks the cache for its
length (transformers 5.23: `create_causal_mask` returns a 4-D mask as is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values [kv_heads, length, head_dim]
KEY_ALIGN = 32  # attention reads a multiple of this many keys (within the cache), the extra ones masked
TOKEN_ALIGN = 16  # a pass of more new tokens a row than this runs a multiple of it (right-padded, never kept)


def pass_width(counts: Sequence[int]) -> int:
    """Tokens a row of a pass runs: the most new tokens, rounded up to `TOKEN_ALIGN` beyond it. oneDNN's bf16
    matmuls run some row counts much slower than the next multiple of 16 (bf16 build, one 184-token pass
    23.8 ms, 192 tokens 20.1; docs/serving.md); a decode pass (a few tokens a row) is left as it is."""
    most = max(counts)
    return most if most <= TOKEN_ALIGN else -(-most // TOKEN_ALIGN) * TOKEN_ALIGN


def pass_input_ids(tokens: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """The rows' new tokens `[B, pass_width]`, right-padded with token 0 (the plan of the same counts has this
    width; the padding's keys/values are never written)."""
    width = pass_width([len(t) for t in tokens])
    return torch.tensor([[*t, *[0] * (width - len(t))] for t in tokens], device=device)  # [B, T]


@dataclass(frozen=True)
class StepPlan:
    """Where one forward pass reads and writes: rows `[first, first + B)`, row i holding `starts[i]`
    tokens before the pass and adding `counts[i]` (right-padded to `width`: `pass_width`; the padding's
    keys/values are never written, and no real token attends to it)."""

    first: int
    starts: list[int]
    counts: list[int]
    width: int
    device: torch.device
    max_len: int  # the cache's positions: the attended keys never go past them

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def kv_len(self) -> int:
        """Keys the rows need: the longest row after the pass."""
        return max(s + c for s, c in zip(self.starts, self.counts))

    @property
    def key_width(self) -> int:
        """Keys attention reads: `kv_len` rounded up to `KEY_ALIGN` within the cache (the extra ones masked)."""
        return min(-(-self.kv_len // KEY_ALIGN) * KEY_ALIGN, self.max_len)

    def position_ids(self) -> torch.Tensor:
        starts = torch.tensor(self.starts, device=self.device)
        return starts[:, None] + torch.arange(self.width, device=self.device)[None, :]  # [B, T]

    def attention_mask(self) -> torch.Tensor:
        """`[B, 1, T, key_width]` bool: query t of row i sees keys 0 .. starts[i] + t (its cache + causal)."""
        keys = torch.arange(self.key_width, device=self.device)  # [K]
        return (keys[None, None, :] <= self.position_ids()[:, :, None])[:, None]  # [B, 1, T, K]


class SlotKVCache(Cache):
    """Per-slot keys/values for every layer, plus the plan of the forward pass under way."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype | Sequence[torch.dtype],
                 device: torch.device | str):
        """`dtype`: of every layer's keys/values, or one per layer (a bf16 body with fp32 last layers)."""
        super().__init__(layers=[])
        text = config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (slots, kv_heads, max_len, head_dim)
        dtypes = [dtype] * text.num_hidden_layers if isinstance(dtype, torch.dtype) else list(dtype)
        if len(dtypes) != text.num_hidden_layers:
            raise ValueError(f"{len(dtypes)} layer dtypes for {text.num_hidden_layers} layers")
        self.keys = [torch.zeros(shape, dtype=d, device=device) for d in dtypes]
        self.values = [torch.zeros(shape, dtype=d, device=device) for d in dtypes]
        self.slots, self.max_len = slots, max_len
        # memory of one token's keys and values over all layers (what a stored prompt start weighs per token)
        self.bytes_per_token = sum(2 * kv_heads * head_dim * k.element_size() for k in self.keys)
        self.device = torch.device(device)
        self._plan: StepPlan | None = None
        self._flat_index: torch.Tensor | None = None

    def plan(self, first: int, starts: Sequence[int], counts: Sequence[int]) -> StepPlan:
        """Set up the next forward pass (call before the model's forward)."""
        plan = StepPlan(first, list(starts), list(counts), pass_width(counts), self.device, self.max_len)
        if first < 0 or first + plan.rows > self.slots or plan.kv_len > self.max_len:
            raise ValueError(f"plan outside the cache: rows {first}..{first + plan.rows}, kv_len {plan.kv_len}")
        self._plan = plan
        if plan.width == 1:  # decode: one index_copy_ per layer into the flattened cache
            _, heads, max_len, _ = self.keys[0].shape
            rows = torch.arange(first, first + plan.rows, device=self.device)  # [B]
            positions = torch.tensor(plan.starts, device=self.device)  # [B]
            heads_index = torch.arange(heads, device=self.device)  # [H]
            # row r, head h, position p of [slots, H, max_len, D] is row (r * H + h) * max_len + p of [-1, D]
            self._flat_index = ((rows[:, None] * heads + heads_index[None, :]) * max_len
                                + positions[:, None]).reshape(-1)  # [B * H]
        return plan

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new keys/values `[B, kv_heads, T, head_dim]` at each row's positions; return the
        rows' keys/values `[B, kv_heads, key_width, head_dim]` (views; past each row's length: masked)."""
        plan = self._plan
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if plan.width == 1:
            head_dim = keys.shape[-1]
            keys.view(-1, head_dim).index_copy_(0, self._flat_index, key_states.reshape(-1, head_dim))
            values.view(-1, head_dim).index_copy_(0, self._flat_index, value_states.reshape(-1, head_dim))
        else:
            for i, (start, count) in enumerate(zip(plan.starts, plan.counts)):
                keys[plan.first + i, :, start:start + count] = key_states[i, :, :count]
                values[plan.first + i, :, start:start + count] = value_states[i, :, :count]
        rows = slice(plan.first, plan.first + plan.rows)
        return keys[rows, :, :plan.key_width], values[rows, :, :plan.key_width]

    # ---- slot management (whole rows, all layers) ---------------------------------------------

    def write_prefix(self, slot: int, layers: Sequence[LayerKV]) -> None:
        """Copy a stored prefix `[kv_heads, P, head_dim]` per layer into the start of `slot`."""
        for keys, values, (k, v) in zip(self.keys, self.values, layers):
            keys[slot, :, :k.shape[1]] = k
            values[slot, :, :v.shape[1]] = v

    def read_prefix(self, slot: int, length: int) -> tuple[LayerKV, ...]:
        """A copy of the first `length` positions of `slot`, per layer."""
        return tuple((k[slot, :, :length].clone(), v[slot, :, :length].clone())
                     for k, v in zip(self.keys, self.values))

    def swap(self, i: int, j: int, length: int) -> None:
        """Exchange the first `length` positions of slots i and j."""
        if i == j or length == 0:
            return
        pair, flipped = [i, j], [j, i]
        for keys, values in zip(self.keys, self.values):
            keys[pair, :, :length] = keys[flipped, :, :length]
            values[pair, :, :length] = values[flipped, :, :length]

    def clear(self, slot: int) -> None:
        """Zero every position of `slot`: what a failed request wrote there (non-finite values, from an overflowed
        precision) must not reach the slot's next user, whose passes read masked keys past their own length (a
        masked NaN is still NaN through SDPA)."""
        for keys, values in zip(self.keys, self.values):
            keys[slot].zero_()
            values[slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (src is then free)."""
        if src == dst or length == 0:
            return
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
