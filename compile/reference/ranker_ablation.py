"""The ranker ablation on VALIDATION users behind docs/ranking.md's table (issue 13): the held-out SASRec's
natural top-K as training data, text vs hybrid (soft-token) prompts, the listwise fused label-logit loss,
a learned label bias, the number of decoder layers, under a wall-clock training budget; every eval reports
retrieval, the LLM alone and the best fused NDCG@10 over the fusion grid, with post-hoc label calibration.

    python compile/reference/ranker_ablation.py --bundle BUNDLE --layers 8 --soft 0 --minutes 12 --tag text

BUNDLE needs catalog, users, sasrec (models/sasrec.pt), llm/base and profiles (compile sasrec, base-model,
profiles). Writes exp_<tag>.json in the current directory. A research script, not a pipeline step: the
pipeline's own options are sft-data --negatives/--prompt and finetune --loss/--layers/--label-bias."""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compile.sasrec import EncodedSplit, SASRecConfig, left_pad
from compile.sasrec import train as train_sasrec
from palr.sasrec import SASRec, mask_items
from palr import metrics
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr.profiles import StatsProfiler
from palr.prompt import RETRIEVAL, PalrPrompt, PromptSettings
from palr.ranking import FUSION_GRID, fit_fusion_weight, order_by_scores, target_rank

log = logging.getLogger("exp")


class HybridPrompt(PalrPrompt):
    def __init__(self, tokenizer, settings, offset, titles=True, soft=True):
        super().__init__(tokenizer, settings)
        self.offset, self.titles, self.soft = offset, titles, soft

    def _item(self, item, index, with_year):
        ids = list(self._title_ids(item.title, item.year, with_year)) if self.titles else []
        return ids + ([self.offset + index] if self.soft else [])

    def build(self, profile, history, candidates):
        ids = []
        if self.settings.profile and profile.strip():
            ids += self._ids("Profile: " + profile.strip()) + self._newline
        ids += self._ids("Watched:")
        for i, (item, idx) in enumerate(history[-self.settings.history_items:]):
            ids += (self._ids(";") if i else []) + self._item(item, idx, self.settings.history_years)
        ids += self._newline + self._ids("Candidates:") + self._newline
        labels = self.label_token_ids(len(candidates))
        for lab, (item, idx) in zip(labels, candidates):
            ids += [lab] + self._item(item, idx, self.settings.candidate_years) + self._newline
        ids += self._ids(self._tail)
        return self.prefix_ids(RETRIEVAL) + ids, labels


@torch.no_grad()
def sasrec_topk(model, histories, excludes, k, batch=512):
    """(indices [n, k], scores [n, k]) per row, excluded items masked."""
    model.eval()
    out_i, out_s = [], []
    for s in range(0, len(histories), batch):
        h = torch.from_numpy(left_pad(histories[s:s + batch], model.arch.max_len))
        e = torch.from_numpy(left_pad(excludes[s:s + batch], max(1, max(len(x) for x in excludes[s:s + batch]))))
        scores = mask_items(model.next_item_scores(h), e)
        top = torch.topk(scores, k, dim=1)
        out_i.append(top.indices.numpy())
        out_s.append(top.values.numpy())
    return np.concatenate(out_i), np.concatenate(out_s)


def holdout_sasrec(corpus, M, epochs, seed):
    """SASRec trained on each user's training items minus the last M; early stop on the first held-out one."""
    cat, split = corpus.catalog, corpus.split
    users = sorted(split.train)
    train = [cat.indices(split.train[u][:-M]) for u in users]
    valid = [cat.index(split.train[u][-M]) for u in users]
    data = EncodedSplit(users, train, valid)
    cfg = SASRecConfig(epochs=epochs, patience=5, seed=seed)
    model, best = train_sasrec(cfg, data, cat.num_indices)
    log.info("holdout SASRec (M=%d): best %s", M, best)
    return model


def make_examples(corpus, model, cuts, K, natural_only=True):
    """cuts: (user, prefix item ids, target id, excluded later ids). Returns dicts with candidates + retrieval scores."""
    cat = corpus.catalog
    hist = [cat.indices(p) for _, p, _, _ in cuts]
    excl = [cat.indices(p + later) for _, p, _, later in cuts]
    idx, sc = sasrec_topk(model, hist, excl, K)
    rows = []
    for (user, prefix, target, _), ii, ss in zip(cuts, idx, sc):
        cands = [cat.item(int(i)).id for i in ii]
        pos = cands.index(target) if target in cands else None
        if natural_only and pos is None:
            continue
        rows.append({"user": user, "history": prefix, "candidates": cands, "scores": [float(x) for x in ss],
                     "target_position": pos})
    return rows


def encode(rows, prompt, corpus, profiler, order_rng=None):
    cat = corpus.catalog
    out = []
    for r in rows:
        hist = [(cat.by_id(i), cat.index(i)) for i in r["history"]]
        perm = list(range(len(r["candidates"])))
        if order_rng is not None:
            order_rng.shuffle(perm)
        cands = [(cat.by_id(r["candidates"][j]), cat.index(r["candidates"][j])) for j in perm]
        ids, labels = prompt.build(profiler([h for h, _ in hist]), hist, cands)
        scores = [r["scores"][j] for j in perm]
        tp = perm.index(r["target_position"]) if r["target_position"] is not None else None
        out.append({"ids": ids, "labels": labels, "scores": scores, "target": tp})
    return out


class Projector(torch.nn.Module):
    def __init__(self, table, hidden):
        super().__init__()
        self.register_buffer("table", table)  # [N, d] frozen SASRec item embeddings
        d = table.shape[1]
        self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))

    def forward(self):
        return self.net(self.table)  # [N, hidden]


def embed(model, ids, items):
    V = model.config.vocab_size
    emb = model.get_input_embeddings()(ids.clamp(max=V - 1))
    if items is None:
        return emb
    soft = (ids >= V)[..., None]
    return torch.where(soft, items[(ids - V).clamp(min=0)].to(emb.dtype), emb)


def batch_tensors(exs, pad):
    width = max(len(e["ids"]) for e in exs)
    ids = torch.full((len(exs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(exs), width), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, width - len(e["ids"]):] = torch.tensor(e["ids"])
        mask[i, width - len(e["ids"]):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def label_logits(lm, projector, exs, pad, autocast):
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    ids, mask, pos = batch_tensors(exs, pad)
    items = projector() if projector is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        emb = embed(base, ids, items)
        h = base.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state[:, -1]
    h = h.float()
    W = base.lm_head.weight
    labels = torch.tensor([e["labels"] for e in exs])  # [B, L]
    return torch.einsum("bd,bld->bl", h, W[labels].float())


def fused_loss(logits, exs, w, bias=None):
    if bias is not None:
        logits = logits + bias[:logits.shape[1]]
    r = torch.log_softmax(torch.tensor([e["scores"] for e in exs]), dim=-1)
    target = torch.tensor([e["target"] for e in exs])
    return F.cross_entropy(logits + w * r, target)


@torch.no_grad()
def evaluate(lm, projector, valid, pad, autocast, bs=16, bias=None):
    lm.eval()
    llm = []
    for s in range(0, len(valid), bs):
        lg = label_logits(lm, projector, valid[s:s + bs], pad, autocast)
        if bias is not None:
            lg = lg + bias[:lg.shape[1]]
        llm += lg.log_softmax(-1).tolist()
    lm.train()
    targets = [e["target"] for e in valid]
    w, curve = fit_fusion_weight(llm, [e["scores"] for e in valid], targets)
    retrieval = metrics.ndcg([target_rank(range(len(e["scores"])), e["target"]) for e in valid], 10)
    top1 = np.bincount([order_by_scores(s)[0] for s in llm], minlength=20).tolist()
    arr = np.array(llm)
    cal = (arr - arr.mean(axis=0, keepdims=True)).tolist()
    wc, cc = fit_fusion_weight(cal, [e["scores"] for e in valid], targets)
    return {"retrieval": retrieval, "llm": curve[0.0], "fused": curve[w], "w": w,
            "llm_cal": cc[0.0], "fused_cal": cc[wc], "w_cal": wc,
            "curve": {str(k): round(v, 4) for k, v in curve.items()}, "top1_by_position": top1}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="bundle")
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--titles", type=int, default=1)
    p.add_argument("--soft", type=int, default=1)
    p.add_argument("--w", type=float, default=1.0, help="fixed retrieval weight inside the training loss")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--max-examples", type=int, default=100000)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--valid-users", type=int, default=300)
    p.add_argument("--autocast", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--history", type=int, default=10)
    p.add_argument("--tag", default="e")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-only", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--label-bias", type=int, default=0)
    p.add_argument("--clip", type=float, default=1.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bundle = Bundle.open(a.bundle)
    corpus = Corpus.load("data/ml-100k")
    cat, split = corpus.catalog, corpus.split
    cache = Path(a.bundle) / f"exp_holdout_M{a.M}.pt"
    main_model = SASRec.load(bundle.path("sasrec_torch"))
    if cache.is_file():
        hold = SASRec.load(cache)
    else:
        hold = holdout_sasrec(corpus, a.M, 200, 0)
        hold.save(cache)
    users = sorted(split.train)
    cuts = []
    for u in users:
        tr = split.train[u]
        for t in range(len(tr) - a.M, len(tr)):
            cuts.append((u, tr[:t], tr[t], tr[t + 1:] + [split.valid[u], split.test[u]]))
    train_rows = make_examples(corpus, hold, cuts, a.K)
    # gap check: main SASRec on the same training cuts (it trained on them) vs the held-out model
    main_rows = make_examples(corpus, main_model, cuts, a.K)
    log.info("train cuts %d: target in top-%d: holdout %.3f, main %.3f", len(cuts), a.K, len(train_rows) / len(cuts),
             len(main_rows) / len(cuts))
    rng = random.Random(0)
    vusers = sorted(rng.sample(users, a.valid_users)) if a.valid_users < len(users) else users
    vcuts = [(u, split.train[u], split.valid[u], []) for u in vusers]  # serving's mask: the history only
    valid_rows = make_examples(corpus, main_model, vcuts, a.K, natural_only=False)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle.path("llm_base"))
    lm = AutoModelForCausalLM.from_pretrained(bundle.path("llm_base"), dtype=torch.float32, attn_implementation="sdpa")
    V = lm.config.vocab_size
    if a.layers:
        lm.model.layers = lm.model.layers[:a.layers]
        lm.config.num_hidden_layers = a.layers
        if hasattr(lm.config, "layer_types") and lm.config.layer_types:
            lm.config.layer_types = lm.config.layer_types[:a.layers]
    settings = PromptSettings(history_items=a.history)
    prompt = HybridPrompt(tok, settings, V, titles=bool(a.titles), soft=bool(a.soft))
    profiler = StatsProfiler(cat)
    train = encode(train_rows, prompt, corpus, profiler, order_rng=random.Random(1))
    random.Random(2).shuffle(train)
    valid = encode(valid_rows, prompt, corpus, profiler)
    lens = sorted(len(e["ids"]) for e in train)
    log.info("train examples %d (median %d tokens), valid %d (target retrieved %d)", len(train), lens[len(lens) // 2],
             len(valid), sum(e["target"] is not None for e in valid))
    projector = None
    if a.soft:
        emb = hold.item_emb.weight.detach().clone()
        projector = Projector(emb, lm.config.hidden_size)
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    lm = get_peft_model(lm, lora)
    params = [q for q in lm.parameters() if q.requires_grad] + (list(projector.parameters()) if projector else [])
    groups = [{"params": params, "lr": a.lr}]
    bias = None
    if a.label_bias:
        bias = torch.nn.Parameter(torch.zeros(26))
        groups.append({"params": [bias], "lr": 3e-2})
    opt = torch.optim.AdamW(groups, lr=a.lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    budget = a.minutes * 60
    est_steps = max(10, min(len(train), a.max_examples) // a.bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / est_steps))))
    lm.train()
    history = {"args": vars(a), "evals": []}
    history["evals"].append({"step": 0, **evaluate(lm, projector, valid, pad, bool(a.autocast), bias=bias)})
    log.info("step 0: %s", history["evals"][-1])
    started = time.perf_counter()
    step = 0
    seen = 0
    while True:
        batch = train[(step * a.bs) % len(train):(step * a.bs) % len(train) + a.bs]
        if len(batch) < a.bs:
            batch = train[:a.bs]
        t0 = time.perf_counter()
        loss = fused_loss(label_logits(lm, projector, batch, pad, bool(a.autocast)), batch, a.w, bias)
        loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(batch)
        if step % 10 == 0:
            el = time.perf_counter() - started
            log.info("step %d loss %.4f, %.2f s/step, %.2f examples/s", step, loss.item(), time.perf_counter() - t0,
                     seen / el)
        if a.speed_only and step >= a.speed_only:
            log.info("speed: %.2f examples/s", seen / (time.perf_counter() - started))
            return
        done = time.perf_counter() - started > budget or seen >= min(a.max_examples, 10 ** 9)
        if step % a.eval_every == 0 or done:
            ev = evaluate(lm, projector, valid, pad, bool(a.autocast), bias=bias)
            history["evals"].append({"step": step, "seen": seen, "train_s": round(time.perf_counter() - started), **ev})
            log.info("step %d: %s", step, {k: v for k, v in ev.items() if k != "curve"})
            Path(f"exp_{a.tag}.json").write_text(json.dumps(history, indent=1))
        if done:
            break


if __name__ == "__main__":
    main()
