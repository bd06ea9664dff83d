"""Research script (issue 13): where should score mode READ the LLM, and does a time signal help?

    python compile/reference/readout_ablation.py --bundle bundle --readout cand --trend 1 --minutes 6 --tag x

readout label: the candidates' label-letter logits at the answer position (today's verbalizer);
readout cand:  one learned score row read at each candidate's own last prompt token (a per-candidate
               head inside the same single forward pass; no letter prior, so no label-position bias).
--trend 1: each candidate line ends with a bucket token of its interactions in the --window days before
           the user's last history interaction (all users' train+valid events, strictly earlier; a
           signal SASRec, which sees order and not time, lacks).

Training rows: the bundle's held-out SASRec (sft-data --negatives holdout) on each user's last 8 training
positions, natural top-20 only, shuffled. Validation: every user (history = train, target = valid,
candidates = the served SASRec's top-20 in retrieval order). Reports the LLM alone, retrieval + LLM fused
with the weight fit on the other half of the users (2-fold, so no weight is fit on the users it is scored
on), and the same cross-fit for a linear retrieval + trend-bucket baseline. Writes exp_<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compile.holdout import top_k
from palr import metrics
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.data import read_interactions
from palr.profiles import StatsProfiler
from palr.prompt import RETRIEVAL, PromptSettings
from palr.ranking import fit_bucket_weights, fit_fusion_weight, fuse, order_by_scores, rank_buckets, target_rank
from palr.sasrec import SASRec
from ranker_ablation import HybridPrompt  # the same folder: scripts run as `python compile/reference/...`

log = logging.getLogger("exp")
DAY = 86400.0


def bucket(count: int) -> int:
    """0, 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64+ → 0..7."""
    return min(7, int(count).bit_length())


class Events:
    """All users' train+valid interactions sorted by time: item counts in a window before a time."""

    def __init__(self, times: np.ndarray, items: np.ndarray, n: int):
        order = np.argsort(times, kind="stable")
        self.times, self.items, self.n = times[order], items[order], n

    def counts(self, before: float, days: float) -> np.ndarray:
        lo = np.searchsorted(self.times, before - days * DAY, side="left")
        hi = np.searchsorted(self.times, before, side="left")  # strictly earlier
        return np.bincount(self.items[lo:hi], minlength=self.n)


def rows_cache(bundle_dir: Path, window: float, k: int = 20) -> Path:
    """Where prepare's (train, valid) rows for one --window and k candidates are cached (paired_check.py and
    candidate_count.py read them too). "v2": validation candidates masked as serving masks them (the
    history only); v1 caches also masked the user's test item."""
    return bundle_dir / (f"exp_rows_v2_w{window:g}.pkl" if k == 20 else f"exp_rows_v2_w{window:g}_k{k}.pkl")


def prepare(bundle: Bundle, data: Path, K: int, window: float, cache: Path):
    if cache.is_file():
        return pickle.loads(cache.read_bytes())
    corpus = Corpus.load(data)
    cat, split = corpus.catalog, corpus.split
    stamp = {(x.user_id, x.item_id): x.timestamp for x in read_interactions(corpus.files.inter)}
    users = sorted(split.train)
    ev_t, ev_i = [], []
    for u in users:
        for i in split.train[u] + [split.valid[u]]:
            ev_t.append(stamp[(u, i)])
            ev_i.append(cat.index(i))
    events = Events(np.array(ev_t), np.array(ev_i), cat.num_indices)
    hold = SASRec.load(bundle.path("sasrec_holdout"))
    main = SASRec.load(bundle.path("sasrec_torch"))
    M = int(bundle.artifact("sasrec_holdout")["held_out_items"])

    def rows_for(model, cuts, natural_only):
        idx, sc = top_k(model, [cat.indices(c[1]) for c in cuts], [cat.indices(c[1] + c[3]) for c in cuts], K)
        out = []
        for (u, hist, target, _), ii, ss in zip(cuts, idx, sc):
            cands = [cat.item(int(i)).id for i in ii]
            pos = cands.index(target) if target in cands else None
            if natural_only and pos is None:
                continue
            t_ref = stamp[(u, hist[-1])]
            counts = events.counts(t_ref, window)
            out.append({"user": u, "history": hist, "candidates": cands, "scores": [float(x) for x in ss],
                        "target_position": pos, "trend": [bucket(counts[cat.index(c)]) for c in cands]})
        return out

    cuts = []
    for u in users:
        tr = split.train[u]
        cuts += [(u, tr[:t], tr[t], tr[t + 1:] + [split.valid[u], split.test[u]]) for t in range(len(tr) - M, len(tr))]
    train = rows_for(hold, cuts, True)
    vcuts = [(u, split.train[u], split.valid[u], []) for u in users]  # serving's mask: the history only
    valid = rows_for(main, vcuts, False)
    out = (train, valid)
    cache.write_bytes(pickle.dumps(out))
    return out


class Builder(HybridPrompt):
    """The hybrid prompt with optional per-candidate trend tokens; records each candidate's last position."""

    def __init__(self, tokenizer, settings, offset, trend_offset, titles, soft, trend, candidate_titles=True):
        super().__init__(tokenizer, settings, offset, titles, soft)
        self.trend_offset, self.trend, self.candidate_titles = trend_offset, trend, candidate_titles

    def _candidate(self, item, index):
        if self.candidate_titles:
            return self._item(item, index, self.settings.candidate_years)
        return [self.offset + index]  # the soft token alone: a short line, the user's context carries the text

    def build(self, profile, history, candidates, trends):
        ids = self.prefix_ids(RETRIEVAL)
        if self.settings.profile and profile.strip():
            ids += self._ids("Profile: " + profile.strip()) + self._newline
        ids += self._ids("Watched:")
        for i, (item, idx) in enumerate(history[-self.settings.history_items:]):
            ids += (self._ids(";") if i else []) + self._item(item, idx, self.settings.history_years)
        ids += self._newline + self._ids("Candidates:") + self._newline
        labels = self.label_token_ids(len(candidates))
        ends, starts = [], []
        for lab, (item, idx), toks in zip(labels, candidates, trends):
            starts.append(len(ids))
            ids += [lab] + self._candidate(item, idx)
            if self.trend:
                ids += [self.trend_offset + t for t in toks]
            ends.append(len(ids) - 1)
            ids += self._newline
        starts.append(len(ids))  # the tail
        ids += self._ids(self._tail)
        return ids, labels, ends, starts


def with_ease_buckets(bundle: Bundle, data: Path, train_rows, valid_rows):
    """The rows with "trend" replaced by each candidate's EASE rank bucket: training rows scored by a table fit
    without each user's held-out items (their targets), validation rows by one fit on training items."""
    from compile.collab import training_table

    corpus = Corpus.load(data)
    cat = corpus.catalog
    held = int(bundle.artifact("sasrec_holdout")["held_out_items"])
    tables = (training_table(bundle, corpus, cat, held), training_table(bundle, corpus, cat))

    def bucketed(rows, table):
        out = []
        for r in rows:
            scores = table.scores(cat.indices(r["history"]), cat.indices(r["candidates"]))
            out.append({**r, "trend": rank_buckets(scores)})
        return out

    return bucketed(train_rows, tables[0]), bucketed(valid_rows, tables[1])


def with_tokens(rows, features, ease_rows=None):
    """The rows with "tok": per candidate, one token index per feature (feature f's bucket b → 8 f + b):
    time (the 30-day trend bucket), ease (EASE rank bucket, from `ease_rows`' "trend"), retr (retrieval rank
    bucket), the pipeline's rank buckets (palr.ranking.rank_buckets)."""
    out = []
    for k, r in enumerate(rows):
        n = len(r["candidates"])
        per = {"time": r["trend"], "retr": rank_buckets(r["scores"])}
        if ease_rows is not None:
            per["ease"] = ease_rows[k]["trend"]
        out.append({**r, "tok": [tuple(8 * f + per[name][c] for f, name in enumerate(features)) for c in range(n)]})
    return out


def encode(rows, builder, cat, profiler, rng=None):
    out = []
    for r in rows:
        hist = [(cat.by_id(i), cat.index(i)) for i in r["history"]]
        perm = list(range(len(r["candidates"])))
        if rng is not None:
            rng.shuffle(perm)
        cands = [(cat.by_id(r["candidates"][j]), cat.index(r["candidates"][j])) for j in perm]
        toks = [r["tok"][j] for j in perm]
        ids, labels, ends, starts = builder.build(profiler([h for h, _ in hist]), hist, cands, toks)
        tp = perm.index(r["target_position"]) if r["target_position"] is not None else None
        out.append({"ids": ids, "labels": labels, "ends": ends, "starts": starts, "items": [idx for _, idx in cands],
                    "scores": [r["scores"][j] for j in perm],
                    "trend": [r["trend"][j] for j in perm], "tok": [r["tok"][j] for j in perm], "target": tp})
    return out


class Extras(torch.nn.Module):
    """Soft-token rows: projected SASRec items, trend buckets, and the score row."""

    def __init__(self, table, hidden, init_trend, init_score, features=1):
        super().__init__()
        self.register_buffer("table", table)
        d = table.shape[1]
        self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.trend = torch.nn.Parameter(init_trend.repeat(max(1, features), 1).clone())  # [8 F, D]
        self.score = torch.nn.Parameter(init_score.clone())  # [D]
        self.beta = torch.nn.Parameter(torch.zeros(8 * max(1, features)))  # per-bucket bias of the score head

    def rows(self):
        return torch.cat([self.net(self.table), self.trend], 0)  # [N + 8, D]


def embed(base, ids, rows):
    V = base.config.vocab_size
    emb = base.get_input_embeddings()(ids.clamp(max=V - 1))
    soft = ids >= V
    if not bool(soft.any()):
        return emb
    out = emb.clone()
    out[soft] = rows[ids[soft] - V].to(emb.dtype)
    return out


def block_mask(exs, width):
    """[B, 1, T, T] bool and positions [B, T]: each candidate line sees the context and itself only (not the
    other candidates), at the same positions for every line: scores independent of the candidates' order."""
    allowed = torch.zeros((len(exs), 1, width, width), dtype=torch.bool)
    pos = torch.zeros((len(exs), width), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, e in enumerate(exs):
        o, n = width - len(e["ids"]), len(e["ids"])
        s = e["starts"]
        allowed[i, 0, o:, o:] = causal[:n, :n]
        p = torch.arange(n)
        for a, b in zip(s[:-1], s[1:]):
            allowed[i, 0, o + a:o + b, o + s[0]:o + a] = False  # not the earlier candidates
            p[a:b] = s[0] + torch.arange(b - a)
        p[s[-1]:] = s[0] + max(b - a for a, b in zip(s[:-1], s[1:])) + torch.arange(n - s[-1])
        pos[i, o:] = p
        allowed[i, 0, :o, 0] = True  # padding rows: attend somewhere (their output is never read)
    return allowed, pos


def forward_scores(lm, extras, exs, pad, readout, beta=False, block=False):
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    width = max(len(e["ids"]) for e in exs)
    ids = torch.full((len(exs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(exs), width), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, width - len(e["ids"]):] = torch.tensor(e["ids"])
        mask[i, width - len(e["ids"]):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if block:
        mask, pos = block_mask(exs, width)
    h = base.model(inputs_embeds=embed(base, ids, extras.rows()), attention_mask=mask, position_ids=pos,
                   use_cache=False).last_hidden_state  # [B, T, D]
    if readout == "label":
        labels = torch.tensor([e["labels"] for e in exs])
        return torch.einsum("bd,bld->bl", h[:, -1].float(), base.lm_head.weight[labels].float())
    ends = torch.tensor([[width - len(e["ids"]) + p for p in e["ends"]] for e in exs])  # [B, L]
    hc = h[torch.arange(len(exs))[:, None], ends]  # [B, L, D]
    out = hc.float() @ extras.score.float()
    if beta:
        out = out + extras.beta[torch.tensor([e["tok"] for e in exs])].sum(-1)  # [B, L, F] → [B, L]
    return out


def title_table(tok, cat, E, max_tokens=16):
    """[N, D]: each item's title as the mean of its tokens' input embeddings (row 0, padding: zeros)."""
    rows = torch.zeros(cat.num_indices, E.shape[1])
    for i in range(1, cat.num_indices):
        ids = tok.encode(" " + cat.item(i).title, add_special_tokens=False)[:max_tokens]
        rows[i] = E[ids].float().mean(0)
    return rows


def align_loss(extras, titles, exs, tau):
    """RSLLM-style item alignment: InfoNCE between each batch item's projected SASRec embedding and its
    title's text embedding, the batch's other items as negatives, both directions."""
    idx = torch.tensor(sorted({i for e in exs for i in e["items"]}))
    p = F.normalize(extras.net(extras.table[idx]), dim=-1)  # [I, D]
    t = F.normalize(titles[idx], dim=-1)  # [I, D]
    logits = p @ t.T / tau
    target = torch.arange(len(idx))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def listwise(logits, exs, w):
    r = torch.log_softmax(torch.tensor([e["scores"] for e in exs]), -1)
    return F.cross_entropy(logits + w * r, torch.tensor([e["target"] for e in exs]))


def crossfit_ranks(llm, retr, targets):
    """2-fold: weight fit on one half of the users, the target's rank on the other; returns (ranks, weights)."""
    n = len(targets)
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    ranks, weights = [None] * n, []
    for fit_on, score_on in (halves, halves[::-1]):
        w, _ = fit_fusion_weight([llm[i] for i in fit_on], [retr[i] for i in fit_on], [targets[i] for i in fit_on])
        weights.append(w)
        for i in score_on:
            ranks[i] = target_rank(order_by_scores(fuse(llm[i], retr[i], w)), targets[i])
    return ranks, weights


def crossfit(llm, retr, targets):
    """crossfit_ranks as (NDCG@10 over all users, weights)."""
    ranks, weights = crossfit_ranks(llm, retr, targets)
    return metrics.ndcg(ranks, 10), weights


def linear_weights(retr, targets, indices, sizes, steps):
    """A listwise linear re-ranker: retrieval log-softmax [R, K] + the sum over features of w_f[index_f] ([R, K]
    each), fit by cross-entropy on targets [R]; returns each feature's weights [size_f]."""
    ws = [torch.zeros(n, requires_grad=True) for n in sizes]
    opt = torch.optim.Adam(ws, lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(retr + sum(w[i] for w, i in zip(ws, indices)), targets)
        opt.zero_grad(); loss.backward(); opt.step()
    return [w.detach() for w in ws]


def trend_weights(rows, steps=300):
    """The linear baseline's per-bucket weights [8]: retrieval log-softmax + w[trend bucket], fit listwise on
    rows (prepare's: "trend", "scores", "target_position" set)."""
    return fit_bucket_weights([r["scores"] for r in rows], [r["trend"] for r in rows],
                              [r["target_position"] for r in rows], 8, steps)


@torch.no_grad()
def evaluate(lm, extras, valid, pad, readout, beta, block=False, bs=32):
    lm.eval()
    llm = []
    for s in range(0, len(valid), bs):
        llm += forward_scores(lm, extras, valid[s:s + bs], pad, readout, beta, block).log_softmax(-1).tolist()
    lm.train()
    targets = [e["target"] for e in valid]
    retr = [e["scores"] for e in valid]
    alone = metrics.ndcg([target_rank(order_by_scores(s), t) for s, t in zip(llm, targets)], 10)
    fused, ws = crossfit(llm, retr, targets)
    top1 = np.bincount([order_by_scores(s)[0] for s in llm], minlength=20).tolist()
    return {"llm": alone, "fused_xfit": fused, "weights": ws, "top1_by_position": top1, "llm_scores": llm}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="bundle")
    p.add_argument("--data", default="data/ml-100k")
    p.add_argument("--readout", default="cand", choices=("cand", "label"))
    p.add_argument("--trend", type=int, default=1)
    p.add_argument("--window", type=float, default=30)
    p.add_argument("--trend-source", default="time", choices=("time", "ease"),
                   help="ease: each candidate's trend token (and bucket) is instead its EASE rank among the 20 "
                        "(0, 1, 2-3, 4-7, 8-15, 16+), EASE fit without the rows' targets (palr.collab)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated per-candidate tokens, in order, from time,ease,retr (retr: the candidate's "
                        "retrieval rank bucket); default: --trend/--trend-source's one token")
    p.add_argument("--titles", type=int, default=1)
    p.add_argument("--soft", type=int, default=1)
    p.add_argument("--candidate-titles", type=int, default=1, help="0: candidates are their soft token alone")
    p.add_argument("--profile", type=int, default=1)
    p.add_argument("--history", type=int, default=10)
    p.add_argument("--w", type=float, default=1.0)
    p.add_argument("--minutes", type=float, default=6)
    p.add_argument("--max-examples", type=int, default=10 ** 9)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--extras-lr", type=float, default=1e-3, help="projector")
    p.add_argument("--head-lr", type=float, default=1e-2, help="trend rows and the score row")
    p.add_argument("--score-init", default="zero", choices=("zero", "yes"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names that get LoRA adapters")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--autocast", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=0, help="evaluate every N examples (0: at the end)")
    p.add_argument("--valid-users", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="e")
    p.add_argument("--beta", type=int, default=0, help="score head: + a learned bias per trend bucket")
    p.add_argument("--stage1", type=float, default=0.0,
                   help="RSLLM's two stages: this share of --minutes on text-only prompts (no item soft tokens), "
                        "then hybrid prompts on the next examples")
    p.add_argument("--align", type=float, default=0.0,
                   help="+ this times the item alignment loss (projected SASRec embedding vs title embedding)")
    p.add_argument("--tau", type=float, default=0.07, help="temperature of the alignment loss")
    p.add_argument("--block", type=int, default=0,
                   help="1: candidate lines attend to the context and themselves only, at the same positions")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bundle = Bundle.open(a.bundle)
    train_rows, valid_rows = prepare(bundle, Path(a.data), 20, a.window, rows_cache(Path(a.bundle), a.window, 20))
    if a.valid_users:
        valid_rows = valid_rows[:a.valid_users]
    features = (a.tokens.split(",") if a.tokens is not None
                else [] if not a.trend else ["ease" if a.trend_source == "ease" else "time"])
    features = [f for f in features if f]
    if set(features) - {"time", "ease", "retr"}:
        raise SystemExit(f"--tokens: unknown {sorted(set(features) - {'time', 'ease', 'retr'})}")
    ease = with_ease_buckets(bundle, Path(a.data), train_rows, valid_rows) if "ease" in features else (None, None)
    if a.trend_source == "ease" and a.tokens is None:
        train_rows, valid_rows = ease
    train_rows, valid_rows = with_tokens(train_rows, features, ease[0]), with_tokens(valid_rows, features, ease[1])
    log.info("per-candidate tokens: %s", features or "none")
    from palr.catalog import Catalog
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palr.llm import keep_first_layers

    cat = Catalog.load(bundle.path("catalog"))
    tok = AutoTokenizer.from_pretrained(bundle.path("llm_base"))
    lm = keep_first_layers(AutoModelForCausalLM.from_pretrained(bundle.path("llm_base"), dtype=torch.float32,
                                                                attn_implementation="sdpa"), a.layers)
    V = lm.config.vocab_size
    N = cat.num_indices
    settings = PromptSettings(history_items=a.history, profile=bool(a.profile))
    profiler = StatsProfiler(cat)

    def builder_for(soft, candidate_titles):
        return Builder(tok, settings, V, V + N, bool(a.titles), soft, bool(features), candidate_titles)

    def shuffled_train(b):  # the same examples, candidate orders and example order whatever the builder
        rows = encode(train_rows, b, cat, profiler, random.Random(1))
        random.Random(2).shuffle(rows)
        return rows

    builder = builder_for(bool(a.soft), bool(a.candidate_titles))
    train = shuffled_train(builder)
    # --stage1: the text-only stage sees the same examples without item soft tokens
    train_text = shuffled_train(builder_for(False, True)) if a.stage1 else None
    valid = encode(valid_rows, builder, cat, profiler)
    lens = sorted(len(e["ids"]) for e in train)
    log.info("train %d examples (median %d tokens), valid %d users (%d retrieved)", len(train),
             lens[len(lens) // 2], len(valid), sum(e["target"] is not None for e in valid))
    E = lm.get_input_embeddings().weight.detach()
    digits = [tok.encode(f" {d}", add_special_tokens=False)[-1] for d in range(8)]
    yes = tok.encode(" yes", add_special_tokens=False)[-1]
    extras = Extras(SASRec.load(bundle.path("sasrec_holdout")).item_emb.weight.detach().clone(),
                    lm.config.hidden_size, E[digits], E[yes] * (a.score_init == "yes"), len(features))
    titles = title_table(tok, cat, E) if a.align else None
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                      target_modules=a.modules.split(","), task_type="CAUSAL_LM")
    lm = get_peft_model(lm, lora)
    params = [q for q in lm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": a.lr}, {"params": list(extras.net.parameters()), "lr": a.extras_lr},
                             {"params": [extras.trend, extras.score, extras.beta], "lr": a.head_lr, "weight_decay": 0.0}])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    retrieval = metrics.ndcg([target_rank(range(20), e["target"]) for e in valid], 10)
    # the linear baseline: retrieval log-softmax + a per-bucket weight, fit listwise on the same training rows
    bw = trend_weights(train_rows)
    lin = [[bw[b] for b in e["trend"]] for e in valid]
    lin_ranks = [target_rank(order_by_scores([x + r for x, r in zip(l, torch.log_softmax(torch.tensor(e["scores"]), -1).tolist())]), e["target"])
                 for l, e in zip(lin, valid)]
    lin_ndcg = metrics.ndcg(lin_ranks, 10)
    lin_x, _ = crossfit(lin, [e["scores"] for e in valid], [e["target"] for e in valid])
    log.info("retrieval NDCG@10 %.4f; linear retrieval+trend (w=1) %.4f (%.3fx), cross-fit %.4f; bucket weights %s",
             retrieval, lin_ndcg, lin_ndcg / retrieval, lin_x, [round(x, 2) for x in bw])
    record = {"args": vars(a), "retrieval": retrieval, "linear_trend": lin_ndcg, "linear_trend_xfit": lin_x,
              "train_examples": len(train), "evals": []}
    steps = min(len(train), a.max_examples) // a.bs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    lm.train()
    started, step, seen = time.perf_counter(), 0, 0
    next_eval = a.eval_examples or 10 ** 12
    while True:
        start = (step * a.bs) % len(train)
        text_stage = train_text is not None and time.perf_counter() - started < a.stage1 * a.minutes * 60
        batch = (train_text if text_stage else train)[start:][:a.bs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.autocast)):
            logits = forward_scores(lm, extras, batch, pad, a.readout, bool(a.beta), bool(a.block))
        loss = listwise(logits.float(), batch, a.w)
        if a.align:
            loss = loss + a.align * align_loss(extras, titles, batch, a.tau)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(extras.parameters()), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(batch)
        el = time.perf_counter() - started
        if step % 10 == 0:
            log.info("step %d loss %.4f, %.2f examples/s%s", step, loss.item(), seen / el, " (text-only)" if text_stage else "")
        done = el > a.minutes * 60 or seen >= min(a.max_examples, len(train))
        if seen >= next_eval or done:
            next_eval += a.eval_examples or 0
            ev = evaluate(lm, extras, valid, pad, a.readout, bool(a.beta), bool(a.block))
            scores = ev.pop("llm_scores")
            record["evals"].append({"seen": seen, "train_s": round(el), **ev})
            log.info("seen %d (%.0f s): LLM alone %.4f (%.3fx), fused cross-fit %.4f (%.3fx) weights %s, top1 %s",
                     seen, el, ev["llm"], ev["llm"] / retrieval, ev["fused_xfit"], ev["fused_xfit"] / retrieval,
                     ev["weights"], ev["top1_by_position"])
            Path(f"exp_{a.tag}.json").write_text(json.dumps(record, indent=1))
            Path(f"exp_{a.tag}_scores.json").write_text(json.dumps(scores))
        if done:
            break


if __name__ == "__main__":
    main()
