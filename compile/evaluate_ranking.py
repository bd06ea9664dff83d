"""`compile evaluate-ranking` (alias `compile evaluate --tier ranking`): the two-tier system on test
users → reports/eval_ranking.json; with `--split valid` on validation users → reports/eval_ranking_valid.json
(where settings are chosen: the test split is only read to report).

Protocol: each sampled test user's history is train + valid items (a validation user's: its train items,
the profile made from them, the trend counts as of its last train item); SASRec (ONNX Runtime, the
served graph) retrieves the top-K (history excluded); the LLM ranks those K with the prompt,
profile and fusion weight the server uses (`llm/ranker.json`), through the one-at-a-time reference
implementations in `palr/llm.py` (which the serving engine reproduces):

    score     one forward pass, each candidate's readout log-prob (+ the head's trend bias), fused with the
              retrieval scores
    generate  constrained greedy decoding of `generate_k` answer lines (labels or titles), the fusion
              term as per-candidate bias; the model can only name candidates, each at most once

Metrics are full-catalog HR@10 / NDCG@10 (a target SASRec did not retrieve is a miss), next to
SASRec's own order on the same users. Extra keys: LLM-only score mode (weight 0), fusion weight,
seconds per user (wall clock; only meaningful on a quiet machine). Per-user rows go to
reports/eval_ranking_users.jsonl (eval_ranking_valid_users.jsonl). On validation the fusion weight was fit on
the first `merge --fusion-users` of sft-data's validation users, so those users are in-sample for that one
number (the report says how many).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.llm_common import fingerprint_record
from compile.sft_data import profile_source
from palr import metrics
from palr.bundle import Bundle, fingerprint, write_atomically
from palr.catalog import Catalog
from palr.collab import CollabTable
from palr.corpus import Corpus
from palr.data import sample_users
from palr.profiles import Profiles
from palr.ranking import (MODES, calibrated, candidate_ranks, complete_order, fuse, generate_logit_weight,
                          generation_bias, head_bias, load_ranker, order_by_scores, ranker_k, ranker_terms,
                          stale_ranker_inputs, target_rank, uses_collab)

log = logging.getLogger(__name__)

STEP = "evaluate-ranking"
VERSION = 4  # 2: the retrieval term's EASE scores; 3: rank tokens; 4: the LLM alone split (readout, head bias)
REPORT = "eval_ranking.json"
USERS_REPORT = "eval_ranking_users.jsonl"
SPLITS = ("test", "valid")
K = 10


def report_names(split: str) -> tuple[str, str]:
    """(report, per-user report) file names of an evaluation on `split`."""
    if split == "test":
        return REPORT, USERS_REPORT
    return REPORT.replace(".json", f"_{split}.json"), USERS_REPORT.replace("_users", f"_{split}_users")


@dataclass
class EvaluateRankingConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle to evaluate"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "the dataset the bundle was built from"})
    users: int = field(default=0, metadata={
        "help": "evaluate N randomly chosen users of the split (0 = all of them)"})
    split: str = field(default="test", metadata={
        "help": "test: the report (history = train + valid, target = test); valid: where settings are chosen "
                "(history = train, target = valid; profiles made from the train items)", "choices": SPLITS})
    candidates: int = field(default=0, metadata={
        "help": "K, SASRec candidates the LLM ranks (0 = the ranker's, llm/ranker.json: what the server ranks by "
                "default)"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={
        "help": f"modes to evaluate ({', '.join(MODES)})"})
    llm: str = field(default="llm_merged", metadata={
        "help": "the LLM artifact to rank with (llm_base measures the untuned model)",
        "choices": ["llm_merged", "llm_base"]})
    seed: int = field(default=0, metadata={"help": "seed of the user sample"})
    force: bool = field(default=False, metadata={"help": "evaluate again even if the report is current"})


def stored_profiles(bundle: Bundle, users: list[str]) -> dict[str, str]:
    """profiles.json's profiles (made from each user's train + valid items: what serving reads)."""
    profiles = Profiles.load(bundle.path("profiles")).profiles
    missing = [u for u in users if u not in profiles]
    if missing:
        raise ValueError(f"profiles.json has no profile for {len(missing)} users (e.g. {missing[:3]}); "
                         f"rerun `compile profiles` for all users")
    return profiles


def collab_table(bundle: Bundle, ranker: dict, corpus: Corpus, catalog: Catalog, split: str) -> CollabTable | None:
    """The EASE table the ranker reads (None: it reads none; `palr.ranking.uses_collab`): the bundle's (train +
    valid items) for test users, as serving has it; for validation users one fit on the training items alone at
    the same l2, so no validation target is in it."""
    if not uses_collab(ranker):
        return None
    from compile.collab import training_table

    if split == "test":
        return CollabTable.load(bundle.path("collab"))
    return training_table(bundle, corpus, catalog)


def check_vocabulary(bundle: Bundle, llm: str, ranker: dict) -> None:
    """Refuses an LLM that lacks the extra tokens this ranker's prompts use (soft item, trend, rank and score tokens:
    rows the fine-tune added past the base vocabulary) before anything runs, instead of an index error mid-evaluation.
    A text-only ranker (text prompt, label readout) runs on llm_base: its ranker.json still names the extra
    vocabulary sft-data made, but its prompts use none of it."""
    from transformers import AutoConfig

    from palr.prompt import PromptSettings

    extra = ranker.get("item_tokens")
    used = PromptSettings.from_dict(ranker["prompt"]).extra_tokens_used()
    vocabulary = AutoConfig.from_pretrained(bundle.path(llm)).get_text_config().vocab_size
    if used and extra and int(extra["offset"]) >= vocabulary:
        raise ValueError(f"--llm {llm} has {vocabulary} tokens, but this ranker's prompts use tokens from "
                         f"{extra['offset']} on ({', '.join(used)}, added by the fine-tune): only llm_merged has "
                         f"them; --llm llm_base measures the untuned model with a text-only ranker (sft-data "
                         f"--prompt text --no-trend --rank-tokens --readout label)")


def run(config: EvaluateRankingConfig) -> dict:
    from transformers import AutoTokenizer

    from palr.decoding import answer_constraint
    from palr.llm import compute_prefix, generate_constrained, load_causal_lm, score_candidates
    from palr.hybrid import ranker_prompt
    from palr.trends import TrendSettings, TrendTable
    from palr.sasrec_onnx import Query, SasrecOnnx

    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise ValueError(f"--modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    if config.candidates < 0:
        raise ValueError(f"--candidates must be >= 0 (0: the ranker's K), got {config.candidates}")
    if config.users < 0:  # palr.data.sample_users reads any n <= 0 as all of them: a long run nobody asked for
        raise ValueError(f"--users must be >= 0 (0: all), got {config.users}")
    bundle = Bundle.open(config.bundle)
    if not config.candidates:  # resolved before the fingerprint: a K=20 ranker's evaluation stays current
        config = dataclasses.replace(config, candidates=ranker_k(load_ranker(bundle)))
    inputs = [config.llm, "ranker", "sasrec_onnx", "catalog", "profiles"] + \
        [name for name in ("trends", "collab") if bundle.has(name)]
    step_fp = fingerprint(STEP, VERSION, fingerprint_record(config, bundle) | {"tier": "ranking"},
                          [bundle.version(name) for name in inputs])
    report_name, users_report = report_names(config.split)
    report_path = bundle.reports_dir() / report_name
    step = STEP if config.split == "test" else f"{STEP}:{config.split}"  # each split keeps its own record
    if not config.force and bundle.step_is_current(step, step_fp, inputs) and report_path.is_file():
        log.info("evaluate ranking: skipped, %s is current", report_path)
        return json.loads(report_path.read_text())
    bundle.verify(inputs)
    started = time.perf_counter()
    corpus = Corpus.load_for(bundle, config.data)
    catalog = Catalog.load(bundle.path("catalog"))
    ranker = load_ranker(bundle)
    stale = stale_ranker_inputs(bundle, ranker)
    if stale:  # measured all the same, as the server would serve it
        log.warning("the ranker was fit on other inputs than the bundle holds (%s): this measures it on data its "
                    "weights were not fit on", "; ".join(stale))
    check_vocabulary(bundle, config.llm, ranker)
    targets = getattr(corpus.split, config.split)
    users = sample_users(sorted(targets), config.users, config.seed)
    if config.split == "test":
        histories = [corpus.split.test_history(u) for u in users]
        profiles = stored_profiles(bundle, users)
    else:
        histories = [corpus.split.train[u] for u in users]
        profiles = dict(zip(users, profile_source(bundle, catalog)([[catalog.by_id(i) for i in h] for h in histories],
                                                                   progress="profiles (valid)")))
    sasrec = SasrecOnnx.from_bundle(bundle)
    retrieved = sasrec.retrieve([Query(history=catalog.indices(h), exclude=catalog.indices(h), k=config.candidates)
                                 for h in histories])
    model, _ = load_causal_lm(bundle.path(config.llm))
    tokenizer = AutoTokenizer.from_pretrained(bundle.path(config.llm))
    prompt = ranker_prompt(tokenizer, ranker, catalog)
    prefix = compute_prefix(model, prompt.prefix_ids())
    weight = float(ranker["fusion_weight"])
    trend = TrendSettings(**ranker["trend"]) if ranker.get("trend") else None
    table = TrendTable.load(bundle.path("trends")) if trend else None
    collab = collab_table(bundle, ranker, corpus, catalog, config.split)
    candidate_readout = prompt.settings.readout == "candidate"
    generate_k = min(int(ranker["generate_k"]), config.candidates)

    rows = []
    for user, history, ranked in tqdm(list(zip(users, histories, retrieved)), desc="evaluate ranking", unit="user"):
        candidates = [catalog.item(int(i)) for i in ranked.indices]
        retrieval_scores = [float(s) for s in ranked.scores]
        target = targets[user]
        position = next((i for i, c in enumerate(candidates) if c.id == target), None)
        # the request's moment: the user's last history interaction (as the server does for stored users)
        trends = None
        if trend:
            as_of = table.as_of[user] if config.split == "test" else corpus.time_before(user, len(history))
            trends = table.buckets(as_of, [int(i) for i in ranked.indices], trend)
        collab_scores = collab.scores(catalog.indices(history), [int(i) for i in ranked.indices]) if collab else None
        ranks = candidate_ranks(prompt.settings.rank_tokens, retrieval_scores, collab_scores)
        prior, bias = ranker_terms(ranker, retrieval_scores, trends, collab_scores, ranks)
        parts = prompt.retrieval(profiles[user], [catalog.by_id(i) for i in history], candidates, trends, ranks)
        row = {"user": user, "target": target, "target_position": position, "candidates": [c.id for c in candidates],
               "retrieval_scores": retrieval_scores,
               "retrieval_rank": target_rank(range(len(candidates)), position),
               "retrieval_term_rank": target_rank(order_by_scores(prior), position),
               "trend": trends, "collab": collab_scores, "ranks": ranks}
        if "score" in config.modes:
            t0 = time.perf_counter()
            llm = score_candidates(model, parts.input_ids, parts.readout, prefix=prefix)
            row["score_seconds"] = time.perf_counter() - t0
            row["llm_scores"] = llm
            row["llm_rank"] = target_rank(order_by_scores(calibrated(llm, bias)), position)
            # its two parts apart: the readout without the head's bias, and the bias without the LLM (learned per
            # trend bucket and per bucket of the retriever's and EASE's rank: a re-ranker of its own)
            row["llm_readout_rank"] = target_rank(order_by_scores(llm), position)
            row["head_bias_rank"] = target_rank(order_by_scores(bias or [0.0] * len(llm)), position)
            row["score_rank"] = target_rank(order_by_scores(fuse(llm, prior, weight, bias)), position)
        if "generate" in config.modes:
            t0 = time.perf_counter()
            k = min(generate_k, len(candidates))  # retrieval may return fewer than asked for (as the server caps k)
            constraint = answer_constraint(ranker["generate_format"], parts.label_token_ids,
                                           parts.candidate_line_ids, k)
            decoding_bias = generation_bias(prior, weight, bias)
            emitted = generate_constrained(model, parts.input_ids, constraint, bias=decoding_bias, prefix=prefix,
                                           readout=parts.readout if candidate_readout else None,
                                           logit_weight=generate_logit_weight(ranker))
            row["generate_seconds"] = time.perf_counter() - t0
            row["emitted"] = emitted
            row["generate_invalid"] = len(set(emitted)) != len(emitted) or any(
                not 0 <= i < len(candidates) for i in emitted) or len(emitted) != k
            row["generate_rank"] = target_rank(complete_order(emitted, len(candidates), decoding_bias), position)
        rows.append(row)

    report = summarise(rows, config, ranker, weight, generate_k)
    report["split"] = config.split
    if config.split == "valid":
        report["fusion_fit_users_in_sample"] = int((ranker.get("fusion_validation") or {}).get("users", 0))
    report["seconds"] = round(time.perf_counter() - started, 1)
    # each file whole or as it was (a run stopped while writing the report left a truncated one that every later
    # run, the step being current, failed to read); the users' rows first, so a current report has its rows
    write_atomically(bundle.reports_dir() / users_report, "".join(json.dumps(row) + "\n" for row in rows))
    write_atomically(report_path, json.dumps(report, indent=2) + "\n")
    bundle.record_step(step, step_fp, time.perf_counter() - started,
                       **{k: v for k, v in report.items() if k.endswith("ndcg@10")})
    bundle.save()
    log.info("evaluate ranking (%s, %d users, K=%d): NDCG@10 retrieval %.4f | retrieval term alone (no LLM) %.4f | "
             "score %.4f, %.3fx retrieval (95%% CI %s; LLM alone %.4f = its readout alone %.4f + its head's learned "
             "bias, which alone is %.4f) | generate %s; fusion weight %.2f → %s",
             config.split, len(rows), config.candidates, report["retrieval_ndcg@10"], report["retrieval_term_ndcg@10"],
             report.get("score_ndcg@10", float("nan")),
             report.get("score_vs_retrieval_ndcg@10", float("nan")), report.get("score_vs_retrieval_ndcg@10_ci95"),
             report.get("llm_score_ndcg@10", float("nan")), report.get("llm_readout_ndcg@10", float("nan")),
             report.get("head_bias_ndcg@10", float("nan")),
             f"{report['generate_ndcg@10']:.4f} ({report.get('generate_vs_retrieval_ndcg@10', float('nan')):.3f}x, "
             f"CI {report.get('generate_vs_retrieval_ndcg@10_ci95')})" if "generate_ndcg@10" in report else "-",
             weight, report_path)
    return report


def summarise(rows: list[dict], config: EvaluateRankingConfig, ranker: dict, weight: float, generate_k: int) -> dict:
    def add(prefix: str, key: str) -> None:
        ranks = [r[key] for r in rows]
        report[f"{prefix}_hr@{K}"] = metrics.hit_rate(ranks, K)
        report[f"{prefix}_ndcg@{K}"] = metrics.ndcg(ranks, K)

    report: dict = {"users": len(rows), "k": config.candidates}
    add("retrieval", "retrieval_rank")
    add("retrieval_term", "retrieval_term_rank")  # the linear re-ranker the LLM is fused with, no LLM
    if "score" in config.modes:
        add("score", "score_rank")
        add("llm_score", "llm_rank")
        add("llm_readout", "llm_readout_rank")
        add("head_bias", "head_bias_rank")
        report["score_seconds_per_user"] = sum(r["score_seconds"] for r in rows) / len(rows)
    if "generate" in config.modes:
        add("generate", "generate_rank")
        report["generate_invalid_rate"] = sum(r["generate_invalid"] for r in rows) / len(rows)
        report["generate_seconds_per_user"] = sum(r["generate_seconds"] for r in rows) / len(rows)
    report["target_retrieved_rate"] = sum(r["target_position"] is not None for r in rows) / len(rows)
    retrieval = metrics.per_user_ndcg([r["retrieval_rank"] for r in rows], K)
    for name, key in (("retrieval_term", "retrieval_term_rank"), ("score", "score_rank"), ("llm_score", "llm_rank"),
                      ("llm_readout", "llm_readout_rank"), ("head_bias", "head_bias_rank"),
                      ("generate", "generate_rank")):
        if f"{name}_ndcg@{K}" in report and report[f"retrieval_ndcg@{K}"] > 0:
            paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg([r[key] for r in rows], K), retrieval)
            report[f"{name}_vs_retrieval_ndcg@{K}"] = paired["ratio"]
            report[f"{name}_vs_retrieval_ndcg@{K}_ci95"] = [round(paired["low"], 4), round(paired["high"], 4)]
    if "score" in config.modes and report[f"retrieval_term_ndcg@{K}"] > 0:  # what the LLM adds to the linear term
        paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg([r["score_rank"] for r in rows], K),
                                                metrics.per_user_ndcg([r["retrieval_term_rank"] for r in rows], K))
        report[f"score_vs_retrieval_term_ndcg@{K}"] = paired["ratio"]
        report[f"score_vs_retrieval_term_ndcg@{K}_ci95"] = [round(paired["low"], 4), round(paired["high"], 4)]
    if "score" in config.modes and report[f"head_bias_ndcg@{K}"] > 0:  # what the readout adds to the head's bias
        paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg([r["llm_rank"] for r in rows], K),
                                                metrics.per_user_ndcg([r["head_bias_rank"] for r in rows], K))
        report[f"llm_score_vs_head_bias_ndcg@{K}"] = paired["ratio"]
        report[f"llm_score_vs_head_bias_ndcg@{K}_ci95"] = [round(paired["low"], 4), round(paired["high"], 4)]
    if "score" in config.modes:  # position bias: where the LLM's own top-1 sits in the (retrieval-ordered) list
        for key, with_bias in (("llm_top1_by_position", True), ("llm_top1_by_position_raw", False)):
            firsts = [order_by_scores(calibrated(r["llm_scores"], head_bias(ranker.get("trend_bias"), r["trend"],
                                                                            ranker.get("rank_bias"), r.get("ranks"))
                                                 if with_bias else None))[0] for r in rows]
            report[key] = [firsts.count(p) for p in range(config.candidates)]
    report.update({"fusion_weight": weight, "generate_format": ranker["generate_format"], "generate_k": generate_k,
                   "llm": config.llm, "profile_method": ranker["profile_method"], "seed": config.seed})
    return report
