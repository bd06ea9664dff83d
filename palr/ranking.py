"""From engine outputs to a ranking: score fusion and ordering, shared by evaluation and the server.

Fusion (LlamaRec-style two-tier): the LLM's log-probability of each candidate (log-softmax of its readout
logits over the K candidates) plus the ranking head's per-candidate bias (the learned bias of the
candidate's trend bucket and of its rank tokens' buckets, `head_bias`; 0 without them) plus `weight` times
the retrieval tier's log-probability of that candidate (log-softmax of its scores over the K candidates, so
the terms live on the same scale):

    fused_c = llm_c + bias_c + weight * log_softmax(retrieval)_c

weight 0 ranks by the LLM alone (its head's bias included); a large weight approaches the retrieval
order. In generate mode `bias_c + weight * log_softmax(retrieval)_c` is the per-candidate `bias` added to
the label logits (`generation_bias`), and a candidate-readout ranker adds its readout logits of the same
prefill (`decoding_bias`), so both modes fuse the same terms. The weight is fit on the validation split
(`fit_fusion_weight`), never on test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from palr.errors import EngineError
from palr.metrics import Rank, ndcg

# the two ranking modes, chosen per request (the one list: engines, evaluation, builds, benchmarks, the proto mapping)
MODES = ("score", "generate")

# up to 1000: there the LLM only breaks near-ties of the retrieval order, so a ranker whose LLM does not
# help on validation falls back to (about) retrieval's order instead of being made worse than it
FUSION_GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 50.0, 1000.0)


def log_softmax(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        raise ValueError("no finite score to normalise")
    top = max(finite)
    log_norm = top + math.log(sum(math.exp(v - top) for v in finite))
    return [v - log_norm if math.isfinite(v) else -math.inf for v in values]


def retrieval_prior(retrieval_scores: Sequence[float], trends: Sequence[int] | None,
                    weights_by_bucket: Sequence[float] | None, collab: Sequence[float] | None = None,
                    collab_weight: float | None = None) -> list[float]:
    """The retrieval term the LLM is fused with: SASRec's log-softmax plus a linear weight per candidate trend
    bucket (`ranker.json` "retrieval_trend_weights") plus `collab_weight` × each candidate's EASE score
    (`palr.collab`; "retrieval_collab_weight"), both fit on the training examples (`fit_prior_weights`): a
    linear re-ranker of the retriever. Without weights (or without the features they weigh) the retrieval
    scores as they are. `fuse` log-softmaxes it again, which shifts it by a constant per request and changes no
    order."""
    use_trend = bool(weights_by_bucket) and trends is not None
    use_collab = bool(collab_weight) and collab is not None
    if not (use_trend or use_collab):
        return list(retrieval_scores)
    for name, values, used in (("trend buckets", trends, use_trend), ("collab scores", collab, use_collab)):
        if used and len(values) != len(retrieval_scores):
            raise ValueError(f"{len(values)} {name} for {len(retrieval_scores)} candidates")
    prior = log_softmax(retrieval_scores)
    if use_trend:
        prior = [p + float(weights_by_bucket[b]) for p, b in zip(prior, trends)]
    if use_collab:
        prior = [p + float(collab_weight) * c for p, c in zip(prior, collab)]
    return prior


def fit_prior_weights(retrieval_scores, trends, targets, buckets: int, collab=None, steps: int = 300,
                      lr: float = 0.05) -> tuple[list[float], float | None]:
    """`retrieval_prior`'s weights: per trend bucket w [buckets] (zeros when `trends` is None) and the EASE
    score's weight c (None when `collab` is None) of the listwise linear re-ranker
    log_softmax(retrieval) + w[trend bucket] + c * collab, fit by cross-entropy on the target positions (each
    list: `[n, K]`, targets `[n]`)."""
    import torch
    import torch.nn.functional as F

    base = torch.log_softmax(torch.tensor(retrieval_scores, dtype=torch.float32), -1)  # [n, K]
    index = torch.tensor(trends) if trends is not None else torch.zeros_like(base, dtype=torch.long)  # [n, K]
    # one-hot rows times the weights, not weights[index]: an indexed gather's backward accumulates in a
    # thread-dependent order, so the fit (and ranker.json's version) differed run to run in the 6th decimal
    one_hot = F.one_hot(index, buckets).to(base.dtype)  # [n, K, buckets]
    features = torch.tensor(collab, dtype=torch.float32) if collab is not None else torch.zeros_like(base)  # [n, K]
    target = torch.tensor(targets)  # [n]
    weights = torch.zeros(buckets, requires_grad=True)
    collab_weight = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([weights, collab_weight], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(base + one_hot @ weights + collab_weight * features, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bucket_weights = [round(float(w), 6) for w in weights.detach()] if trends is not None else [0.0] * buckets
    return bucket_weights, (round(float(collab_weight.detach()), 6) if collab is not None else None)


def fit_bucket_weights(retrieval_scores, trends, targets, buckets: int, steps: int = 300, lr: float = 0.05) -> list[float]:
    """Per-bucket weights w [buckets] of the listwise linear re-ranker log_softmax(retrieval) + w[trend bucket]
    (`fit_prior_weights` without the EASE score)."""
    return fit_prior_weights(retrieval_scores, trends, targets, buckets, steps=steps, lr=lr)[0]


# a candidate's rank among the request's candidates under a ranking, as one prompt token (`rank_buckets`)
RANK_BUCKETS = 6  # ranks 0, 1, 2-3, 4-7, 8-15, 16+
RANKINGS = ("collab", "retrieval")  # collab: the candidates' EASE scores (palr.collab); retrieval: SASRec's


def rank_buckets(scores: Sequence[float]) -> list[int]:
    """Each candidate's rank under `scores` (0 the best: the number of candidates scored higher, so tied
    candidates share the best rank of their group) as a bucket 0, 1, 2-3, 4-7, 8-15, 16+ (→ 0..RANK_BUCKETS-1):
    an order-free signal, the same whatever order the candidates come in, ties included (training shuffles
    the candidates, serving lists them in retrieval order: a tie broken by position would differ)."""
    return [min(RANK_BUCKETS - 1, sum(other > score for other in scores).bit_length()) for score in scores]


def candidate_ranks(rankings: Sequence[str], retrieval_scores: Sequence[float] | None,
                    collab_scores: Sequence[float] | None) -> list[list[int]] | None:
    """Per candidate, its rank bucket under each of `rankings` (names from RANKINGS, in the prompt's order):
    `[C][R]`, what the prompt's rank tokens show and the head's rank bias reads; None without rankings."""
    if not rankings:
        return None
    sources = {"collab": collab_scores, "retrieval": retrieval_scores}
    columns = []
    for name in rankings:
        if name not in sources:
            raise ValueError(f"unknown ranking {name!r}: rank tokens come from {', '.join(RANKINGS)}")
        if sources[name] is None:
            raise ValueError(f"{name} rank tokens need the candidates' {name} scores")
        columns.append(rank_buckets(sources[name]))
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"rankings of different lengths: {[len(c) for c in columns]}")
    return [list(row) for row in zip(*columns)]


def uses_collab(ranker: dict) -> bool:
    """Whether a ranker (`llm/ranker.json`) reads the candidates' EASE scores: its retrieval term weighs them or
    its prompt shows their EASE rank."""
    rank_tokens = (ranker.get("prompt") or {}).get("rank_tokens", [])
    return bool(ranker.get("retrieval_collab_weight")) or "collab" in rank_tokens


def head_bias(trend_bias: Sequence[float] | None, trends: Sequence[int] | None,
              rank_bias: Sequence[float] | None = None, ranks: Sequence[Sequence[int]] | None = None
              ) -> list[float] | None:
    """The ranking head's bias of each candidate: the learned bias of its trend bucket plus, per rank token,
    that ranking's learned bias of its rank bucket (`rank_bias`: RANK_BUCKETS values per ranking, in the
    prompt's order); None when the ranker learned neither."""
    terms = []
    if trend_bias and trends is not None:
        terms.append([float(trend_bias[b]) for b in trends])
    if rank_bias and ranks is not None:
        terms.append([sum(float(rank_bias[r * RANK_BUCKETS + b]) for r, b in enumerate(row)) for row in ranks])
    if not terms:
        return None
    return [sum(values) for values in zip(*terms)]


def ranker_terms(ranker: dict, retrieval_scores: Sequence[float], trends: Sequence[int] | None,
                 collab: Sequence[float] | None, ranks: Sequence[Sequence[int]] | None
                 ) -> tuple[list[float], list[float] | None]:
    """(retrieval term, head bias) of a request's candidates under a ranker (`llm/ranker.json`: the weights merge
    fit and the head's learned biases): what `fuse` adds to the LLM's scores. The one place the server, the
    evaluation and the build's probes turn a ranker's weights into fusion terms."""
    prior = retrieval_prior(retrieval_scores, trends, ranker.get("retrieval_trend_weights"), collab,
                            ranker.get("retrieval_collab_weight"))
    return prior, head_bias(ranker.get("trend_bias"), trends, ranker.get("rank_bias"), ranks)


def generation_bias(retrieval_scores: Sequence[float], weight: float,
                    candidate_bias: Sequence[float] | None = None) -> list[float] | None:
    """The per-candidate additive logit that fuses retrieval (and the head's per-candidate bias) into LLM
    decoding; None when both are 0."""
    n = len(retrieval_scores)
    if weight == 0 and not candidate_bias:
        return None
    retrieval = log_softmax(retrieval_scores) if weight else [0.0] * n
    extra = list(candidate_bias) if candidate_bias else [0.0] * n
    if len(extra) != n:
        raise ValueError(f"candidate bias has {len(extra)} values for {n} candidates")
    return [weight * r + b for r, b in zip(retrieval, extra)]


def load_ranker(bundle) -> dict:
    """The bundle's `llm/ranker.json` (written by `compile merge`: prompt settings, fusion weights, generate
    format); {} for a bundle without one, where each reader's defaults apply."""
    return json.loads(bundle.path("ranker").read_text()) if bundle.has("ranker") else {}


def ranker_k(ranker: dict) -> int:
    """K, the candidates the ranker was tuned to rank (`llm/ranker.json`); 20 for a bundle without one: what
    `--candidates 0` means to the offline evaluation and the served-quality check."""
    return int(ranker.get("candidates", 20))


RANKER_INPUTS = ("sasrec_onnx", "collab", "trends", "profiles")  # what a ranker's examples and fits read


def stale_ranker_inputs(bundle, ranker: dict) -> list[str]:
    """The artifacts whose version in `bundle` is not the one the ranker was fit on (its `fit_on`, written by merge;
    none for a ranker written before): each as "name fit on A, the bundle holds B". A step rerun alone (compile
    collab with another --l2, profiles with another --method) changes what the prompts and fused terms read, and
    the ranker's weights were fit on the old."""
    fit_on = ranker.get("fit_on") or {}
    return [f"{name} fit on {version}, the bundle holds {bundle.version(name) if bundle.has(name) else 'none'}"
            for name, version in sorted(fit_on.items())
            if not bundle.has(name) or bundle.version(name) != version]


def generate_logit_weight(ranker: dict) -> float:
    """Generate mode's weight of the label logits for a ranker (`llm/ranker.json`, fit by `compile merge`);
    1.0, the model's own logits, for a ranker written before merge fit one."""
    return float(ranker.get("generate_logit_weight", 1.0))


def finite_readout(values: Sequence[float], what: str = "readout logits") -> list[float]:
    """`values` as floats, or EngineError naming the candidates whose value is NaN or infinite: a model that
    overflowed its precision (or broken weights) fails the request, which the server answers degraded by the
    linear term alone, instead of ranking by NaN (every comparison false: an arbitrary order)."""
    values = [float(v) for v in values]
    bad = [c for c, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise EngineError(f"the model's {what} are not finite for candidates {bad[:5]} ({values[bad[0]]}): its "
                          f"precision overflowed or its weights are broken")
    return values


def decoding_bias(bias: Sequence[float] | None, readout: Sequence[float]) -> list[float]:
    """Generate mode of a candidate-readout ranker: the fusion bias plus each candidate's readout logit."""
    readout = finite_readout(readout)  # floats
    if bias is None:
        return readout
    if len(bias) != len(readout):
        raise ValueError(f"bias has {len(bias)} values for {len(readout)} readouts")
    return [float(b) + r for b, r in zip(bias, readout)]


def fuse(llm_scores: Sequence[float], retrieval_scores: Sequence[float], weight: float,
         candidate_bias: Sequence[float] | None = None) -> list[float]:
    """One fused score per candidate (candidate order): LLM + head bias + weight * retrieval log-softmax."""
    if len(llm_scores) != len(retrieval_scores):
        raise ValueError(f"{len(llm_scores)} LLM scores for {len(retrieval_scores)} candidates")
    bias = generation_bias(retrieval_scores, weight, candidate_bias) or [0.0] * len(llm_scores)
    return [s + b for s, b in zip(llm_scores, bias)]


def calibrated(llm_scores: Sequence[float], candidate_bias: Sequence[float] | None) -> list[float]:
    """The LLM's own scores with its head's per-candidate bias: "the LLM alone" (fusion weight 0)."""
    if not candidate_bias:
        return list(llm_scores)
    return [s + b for s, b in zip(llm_scores, candidate_bias)]


def order_by_scores(scores: Sequence[float]) -> list[int]:
    """Candidate positions, best first; ties keep candidate (retrieval) order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def complete_order(emitted: Sequence[int], n: int, rest_scores: Sequence[float] | None = None) -> list[int]:
    """Generate mode's order over `n` candidates: the positions the model named, then the rest by `rest_scores`
    (the decoding's bias, `generation_bias`: the order decoding follows without the LLM; None: candidate order).
    The model names `generate_k` lines (ranker.json), evaluated and served alike; a longer list goes on here."""
    named = list(dict.fromkeys(emitted))
    rest, seen = order_by_scores(rest_scores) if rest_scores is not None else range(n), set(named)
    return named + [i for i in rest if i not in seen]


def target_rank(order: Sequence[int], target_position: int | None) -> Rank:
    """0-based rank of the target candidate in `order`; None when it was not retrieved."""
    return None if target_position is None else list(order).index(target_position)


def fit_fusion_weight(llm_scores: Sequence[Sequence[float]], retrieval_scores: Sequence[Sequence[float]],
                      target_positions: Sequence[int | None], k: int = 10,
                      grid: Sequence[float] = FUSION_GRID,
                      candidate_bias: Sequence[Sequence[float] | None] | None = None) -> tuple[float, dict[float, float]]:
    """The grid weight with the best NDCG@k over (validation) users; ties go to the smaller weight.
    `candidate_bias`: each user's per-candidate head bias (`head_bias`), or None.

    Returns (weight, {weight: ndcg}). A target that was not retrieved is a miss for every weight."""
    biases = candidate_bias if candidate_bias is not None else [None] * len(llm_scores)
    curve = {}
    for weight in grid:
        ranks = [target_rank(order_by_scores(fuse(s, r, weight, b)), t)
                 for s, r, t, b in zip(llm_scores, retrieval_scores, target_positions, biases)]
        curve[weight] = ndcg(ranks, k)
    best = max(grid, key=lambda w: (curve[w], -w))
    return best, curve
