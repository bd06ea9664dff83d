"""The causal LM on token ids: loading, and the ONE-AT-A-TIME REFERENCE for both ranking modes.

`score_candidates` and `generate_constrained` define what a correct answer is: compile's evaluation
uses them, the benchmark's one-at-a-time baseline is them, and every batching engine is tested to
reproduce them. They run one prompt at a time, plainly, with the model's own KV cache.

`PrefixKV` is the shared-prefix reuse: the instruction preamble is identical for every request, so
its keys/values are computed once and each prompt runs only its own suffix on top of a copy.

torch and transformers are imported here (not in `palr/__init__`), so only callers that run the
model pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from palr.decoding import DRAFT_TOKENS, DecodingConstraint, LabelConstraint
from palr.errors import EngineError
from palr.prompt import Readout
from palr.ranking import decoding_bias, finite_readout


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 is ~5x slower on CPUs without bf16 instructions), bf16 on CUDA."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a Hugging Face directory or a `.gguf` file (dequantized on load).

    The model is in eval mode with gradients off and SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    source, extra = path, {}
    if path.suffix == ".gguf":
        from transformers import GgufConfig

        source, extra = path.parent, {"gguf_file": path.name}
    quantization = {"quantization_config": GgufConfig(dequantize=True)} if extra else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype or default_dtype(device), attn_implementation="sdpa", **extra, **quantization)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    return model, tokenizer


def keep_first_layers(model, layers: int):
    """The model with only its first `layers` decoder layers (0 or all: unchanged), in place; the final
    norm and the LM head stay. A ranker read at the label logits need not run all of a chat model's
    layers (each layer is ~1/30 of SmolLM2's compute): `compile finetune --layers N` measures it."""
    if layers < 0:  # layers[:-1] would keep all but one while the config said -1: a model with none once saved
        raise ValueError(f"layers must be >= 0 (0 = all), got {layers}")
    text = model.config.get_text_config()
    if not layers or layers >= text.num_hidden_layers:
        return model
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[:layers]
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    return model


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class PrefixKV:
    """Keys/values of a prompt prefix, per layer `[1, kv_heads, prefix_len, head_dim]`; read-only."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.ids)

    def cache(self):
        """A fresh DynamicCache holding the prefix. DynamicCache grows by concatenation, so running
        a suffix on it never writes into these tensors."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.layers)


def compute_prefix(model, prefix_ids: Sequence[int], base: PrefixKV | None = None) -> PrefixKV:
    """Run the prefix once and keep its KV; with `base` (a start of `prefix_ids` already computed), only
    the rest is run."""
    if not prefix_ids:
        raise ValueError("prefix_ids is empty")
    _, cache, _ = _prefill(model, prefix_ids, base)  # the decoder alone: no LM head over every prefix position
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return PrefixKV(tuple(int(t) for t in prefix_ids), layers)


@torch.inference_mode()
def _prefill(model, input_ids: Sequence[int], prefix: PrefixKV | None):
    """Hidden states of the prompt's run part `[T, D]` (after the final norm), the KV cache holding the
    whole prompt, and the position of the first row (the prefix length, or 0).

    With `prefix`, `input_ids` must start with `prefix.ids`; only the rest is run."""
    ids = [int(t) for t in input_ids]
    cache, start = None, 0
    if prefix is not None:
        if tuple(ids[: len(prefix)]) != prefix.ids or len(ids) == len(prefix):
            raise ValueError("input_ids must be the prefix followed by at least one more token")
        ids, cache, start = ids[len(prefix):], prefix.cache(), len(prefix)
    if not ids:
        raise ValueError("input_ids is empty")
    tokens = torch.tensor([ids], device=model_device(model))  # [1, T]
    out = model.get_decoder()(input_ids=tokens, past_key_values=cache, use_cache=True)
    return out.last_hidden_state[0], out.past_key_values, start  # [T, D]


def token_logits(lm_head, hidden: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """LM-head logits of only these tokens: `[..., D] -> [..., len(token_ids)]` (fp32). Shared by the
    reference and the engines so they agree exactly."""
    index = torch.as_tensor(list(token_ids), device=hidden.device)
    logits = hidden @ lm_head.weight[index].T
    if getattr(lm_head, "bias", None) is not None:
        logits = logits + lm_head.bias[index]
    return logits.float()


def readout_logits(lm_head, hidden: torch.Tensor, start: int, readout: Readout) -> torch.Tensor:
    """Each candidate's readout logit `[C]`: token `readout.tokens[c]` at prompt position
    `readout.positions[c]`, from hidden states `[T, D]` of positions start.. start + T."""
    rows = torch.as_tensor([p - start for p in readout.positions], device=hidden.device)
    if bool((rows < 0).any()) or bool((rows >= hidden.shape[0]).any()):
        raise ValueError(f"readout positions {list(readout.positions)} outside the run part "
                         f"[{start}, {start + hidden.shape[0]}) of the prompt")
    picked = hidden[rows]  # [C, D]
    index = torch.as_tensor(list(readout.tokens), device=hidden.device)
    logits = (picked * lm_head.weight[index]).sum(-1)  # [C]
    if getattr(lm_head, "bias", None) is not None:
        logits = logits + lm_head.bias[index]
    return logits.float()


def _check_tokens(model, token_ids: Sequence[int]) -> list[int]:
    tokens = [int(t) for t in token_ids]
    vocab = model.config.get_text_config().vocab_size
    if not tokens:
        raise ValueError("the readout is empty: there is no candidate to rank")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary (size {vocab})")
    return tokens


def label_log_probs(label_logits: torch.Tensor) -> list[float]:
    """Log-softmax over the label tokens only (a distribution over the candidates).

    label_logits: `[L]` next-token logits of the labels, in candidate order. Shared by the reference
    and the engines so they agree exactly. Non-finite logits raise EngineError (`palr.ranking.finite_readout`)."""
    logits = label_logits.float()  # [L]
    finite_readout(logits.tolist())
    return torch.log_softmax(logits, dim=-1).tolist()


def pick_allowed(allowed: Sequence[int], allowed_logits: torch.Tensor, constraint: DecodingConstraint,
                 bias: Sequence[float] | None = None, logit_weight: float = 1.0) -> int:
    """Greedy choice under the constraint: argmax of logit_weight * logit + bias over `allowed` (first on
    ties). `logit_weight`: how much the model's own next-token logits count against the bias (the ranker's
    `generate_logit_weight`, fit on validation).

    allowed_logits: `[A]`, the logits of `allowed` (= `constraint.allowed_tokens()`). Shared by the
    reference and the engines so they agree exactly."""
    if not allowed:
        raise ValueError("the constraint allows no token (it is done)")
    if not bool(torch.isfinite(allowed_logits).all()):  # argmax would pick a NaN: an answer no model chose
        bad = (~torch.isfinite(allowed_logits)).nonzero().flatten().tolist()
        raise EngineError(f"the model's next-token logits are not finite for {len(bad)} of the {len(allowed)} "
                          f"allowed tokens (e.g. token {allowed[bad[0]]}): its precision overflowed or its weights "
                          f"are broken")
    scores = allowed_logits.float() * logit_weight  # [A]
    if bias is not None:
        scores = scores + torch.tensor(constraint.token_bias(bias), device=scores.device)
    return int(allowed[int(torch.argmax(scores))])


def emit_by_bias(constraint: DecodingConstraint, bias: Sequence[float] | None) -> int:
    """Generate mode when the model's logits count zero (`logit_weight` 0, a weight the rankers' fit may
    choose): every pick is the argmax of the bias alone, so the constrained answer is written without a
    decode pass, exactly as `pick_allowed` would pick from any logits. Returns the tokens written; the
    answer is `constraint.emitted()`."""
    return sum(1 for _ in _bias_picks(constraint, bias, None))


def draft_by_bias(constraint: DecodingConstraint, bias: Sequence[float] | None, limit: int) -> list[int]:
    """The next (at most `limit`) tokens the bias alone would pick: generate mode's draft. The bias (the
    fused scores) decides most picks when the logit weight is small, so one forward pass over the draft
    checks several tokens at once (`accept_draft`); `constraint` is not changed."""
    return list(_bias_picks(constraint.fork(), bias, limit))


def _bias_picks(constraint: DecodingConstraint, bias: Sequence[float] | None, limit: int | None):
    """Advance `constraint` by the bias's picks (`pick_allowed` at logit weight 0), yielding each token."""
    written = 0
    while not constraint.done and (limit is None or written < limit):
        allowed = constraint.allowed_tokens()
        token = pick_allowed(allowed, torch.zeros(len(allowed)), constraint, bias, 0.0)
        constraint.advance(token)
        written += 1
        yield token


def accept_draft(constraint: DecodingConstraint, draft: Sequence[int],
                 allowed_logits_at: Callable[[int, list[int]], torch.Tensor],
                 bias: Sequence[float] | None, logit_weight: float) -> tuple[int, int]:
    """Speculative decoding's check, exact for greedy picks: after a pass that fed the last picked token and
    `draft[:-1]`, pick position j's token from its logits (`allowed_logits_at(j, allowed)`: `[A]`) under the
    constraint (advancing it), as plain decoding would, while the picks equal the draft. Returns (tokens
    picked, the last pick): the pass's first `picked` fed tokens are right (keep their KV, drop the rest) and
    the last pick is the next token to feed. One pick per pass when the draft is wrong from its first token."""
    picked, token = 0, -1
    for j, drafted in enumerate(draft):
        allowed = constraint.allowed_tokens()
        token = pick_allowed(allowed, allowed_logits_at(j, allowed), constraint, bias, logit_weight)
        constraint.advance(token)
        picked += 1
        if token != drafted or constraint.done:
            break
    return picked, token


def next_draft_limit(limit: int, most: int, picked: int, drafted: int, last_matched: bool) -> int:
    """How many tokens to draft next: twice as many after a wholly accepted draft (up to `most`), else as many
    as were right. A draft that keeps missing falls back to one token a pass: plain decoding."""
    if picked == drafted and last_matched:
        return min(most, 2 * limit)
    return max(1, picked - 1)


def pick_token(logits: torch.Tensor, constraint: DecodingConstraint,
               bias: Sequence[float] | None = None, logit_weight: float = 1.0) -> int:
    """`pick_allowed` on full next-token logits `[V]`."""
    allowed = constraint.allowed_tokens()
    index = torch.as_tensor(allowed, dtype=torch.long, device=logits.device)
    return pick_allowed(allowed, logits[index], constraint, bias, logit_weight)


def score_candidates(model, input_ids: Sequence[int], readout: Readout,
                     prefix: PrefixKV | None = None) -> list[float]:
    """Score mode: one forward pass; each candidate's readout logit (a label after the prompt, or the score
    row at the candidate's own last token), log-softmax over the candidates. Candidate order."""
    return label_log_probs(torch.tensor(read_prompt(model, input_ids, [readout], prefix)[0]))


def read_prompt(model, input_ids: Sequence[int], readouts: Sequence[Readout],
                prefix: PrefixKV | None = None) -> list[list[float]]:
    """One forward pass over the prompt, as far as the readouts need it (`Readout.end`); the raw logits of
    each readout (e.g. the candidate readout and the labels after the prompt, which generate mode decodes from)."""
    for readout in readouts:
        _check_tokens(model, readout.tokens)
    hidden, _, start = _prefill(model, list(input_ids)[:max(r.end for r in readouts)], prefix)
    head = model.get_output_embeddings()
    return [readout_logits(head, hidden, start, readout).tolist() for readout in readouts]


def score_labels(model, input_ids: Sequence[int], label_token_ids: Sequence[int],
                 prefix: PrefixKV | None = None) -> list[float]:
    """`score_candidates` with the label readout: each label's log-probability as the next token."""
    return score_candidates(model, input_ids, Readout.after_prompt(len(input_ids), label_token_ids), prefix)


@torch.inference_mode()
def generate_constrained(model, input_ids: Sequence[int], constraint: DecodingConstraint,
                         bias: Sequence[float] | None = None, prefix: PrefixKV | None = None,
                         readout: Readout | None = None, logit_weight: float = 1.0,
                         draft_tokens: int = DRAFT_TOKENS) -> list[int]:
    """Generate mode: greedy decoding under `constraint` with the KV cache, until it is done. With a
    `readout` (candidate-readout rankers), each candidate's readout logit from the same prefill joins its
    bias (`palr.ranking.decoding_bias`), as the ranker was trained. With `logit_weight` 0 the prompt's pass
    is the only one (`emit_by_bias`). Otherwise each pass after the prompt checks a draft of up to
    `draft_tokens` tokens, the bias's own picks (`draft_by_bias`, `accept_draft`): the same answer as one
    token a pass (`draft_tokens` 1), in fewer passes when the bias decides most picks.

    Returns the emitted candidate positions in order (`constraint.emitted()`)."""
    hidden, cache, start = _prefill(model, input_ids, prefix)
    head = model.get_output_embeddings()
    if readout is not None:
        bias = decoding_bias(bias, readout_logits(head, hidden, start, readout).tolist())
    if logit_weight == 0:
        emit_by_bias(constraint, bias)
        return constraint.emitted()
    token = pick_token(head(hidden[-1]).float(), constraint, bias, logit_weight)
    constraint.advance(token)
    device, decoder = model_device(model), model.get_decoder()
    most = limit = max(1, draft_tokens)
    while not constraint.done:
        draft = draft_by_bias(constraint, bias, limit)
        fed = [token, *draft[:-1]]
        rows = decoder(input_ids=torch.tensor([fed], device=device), past_key_values=cache,
                       use_cache=True).last_hidden_state[0]  # [n, D]
        picked, token = accept_draft(constraint, draft,
                                     lambda j, allowed: token_logits(head, rows[j], allowed), bias, logit_weight)
        if picked < len(fed):
            cache.crop(picked - len(fed))  # drop the KV of the fed tokens after the first wrong pick
        limit = next_draft_limit(limit, most, picked, len(draft), token == draft[picked - 1])
    return constraint.emitted()


def generate_labels(model, input_ids: Sequence[int], label_token_ids: Sequence[int], k: int,
                    bias: Sequence[float] | None = None, prefix: PrefixKV | None = None) -> list[int]:
    """Generate mode with single-token labels: exactly k distinct candidates, in the model's order."""
    labels = _check_tokens(model, label_token_ids)
    return generate_constrained(model, input_ids, LabelConstraint(labels, k), bias, prefix)
