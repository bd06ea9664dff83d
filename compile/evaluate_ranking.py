"""`compile evaluate-ranking` (alias `compile evaluate --tier ranking`): the two-tier system on test
users → reports/eval_ranking.json.

Protocol: each sampled test user's history is train + valid items; SASRec (ONNX Runtime, the
served graph) retrieves the top-K (history excluded); the LLM ranks those K with the prompt,
profile and fusion weight the server uses (`llm/ranker.json`), through the one-at-a-time reference
implementations in `palr/llm.py` (which the serving engine reproduces):

    score     one forward pass, label log-probs, fused with the retrieval scores
    generate  constrained greedy decoding of `generate_k` answer lines (labels or titles), the fusion
              term as per-candidate bias; the model can only name candidates, each at most once

Metrics are full-catalog HR@10 / NDCG@10 (a target SASRec did not retrieve is a miss), next to
SASRec's own order on the same users. Extra keys: LLM-only score mode (weight 0), fusion weight,
seconds per user (wall clock; only meaningful on a quiet machine). Per-user rows go to
reports/eval_ranking_users.jsonl.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.llm_common import config_record
from compile.sft_data import load_corpus
from palr import metrics
from palr.bundle import Bundle, fingerprint
from palr.catalog import Catalog
from palr.profiles import Profiles
from palr.ranking import MODES, complete_order, fuse, generation_bias, order_by_scores, target_rank

log = logging.getLogger(__name__)

STEP = "evaluate-ranking"
VERSION = 1
REPORT = "eval_ranking.json"
USERS_REPORT = "eval_ranking_users.jsonl"
K = 10


@dataclass
class EvaluateRankingConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle to evaluate"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "the dataset the bundle was built from"})
    users: int = field(default=200, metadata={
        "help": "evaluate N randomly chosen test users (0 = all; generate mode costs ~8 s a user on "
                "2 cores with the 135M model)"})
    candidates: int = field(default=20, metadata={"help": "K, SASRec candidates the LLM ranks"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={
        "help": f"modes to evaluate ({', '.join(MODES)})"})
    llm: str = field(default="llm_merged", metadata={
        "help": "the LLM artifact to rank with (llm_base measures the untuned model)",
        "choices": ["llm_merged", "llm_base"]})
    seed: int = field(default=0, metadata={"help": "seed of the user sample"})


def load_ranker(bundle: Bundle) -> dict:
    return json.loads(bundle.path("ranker").read_text())


def sample_users(users: list[str], n: int, seed: int) -> list[str]:
    return sorted(random.Random(seed).sample(users, n)) if 0 < n < len(users) else users


def run(config: EvaluateRankingConfig) -> dict:
    from transformers import AutoTokenizer

    from palr.decoding import answer_constraint
    from palr.llm import compute_prefix, generate_constrained, load_causal_lm, score_labels
    from palr.prompt import PalrPrompt, PromptSettings
    from palr.sasrec_onnx import Query, SasrecOnnx

    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise ValueError(f"--modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    bundle = Bundle.open(config.bundle)
    inputs = [config.llm, "ranker", "sasrec_onnx", "catalog", "profiles"]
    step_fp = fingerprint(STEP, VERSION, config_record(config) | {"tier": "ranking", "bundle": None, "batch_size": None},
                          [bundle.version(name) for name in inputs])
    report_path = bundle.reports_dir() / REPORT
    if bundle.step_is_current(STEP, step_fp, inputs) and report_path.is_file():
        log.info("evaluate ranking: skipped, %s is current", report_path)
        return json.loads(report_path.read_text())
    bundle.verify(inputs)
    started = time.perf_counter()
    corpus = load_corpus(bundle, config.data)
    catalog = Catalog.load(bundle.path("catalog"))
    profiles = Profiles.load(bundle.path("profiles")).profiles
    ranker = load_ranker(bundle)
    users = sample_users(sorted(corpus.split.test), config.users, config.seed)
    missing = [u for u in users if u not in profiles]
    if missing:
        raise ValueError(f"profiles.json has no profile for {len(missing)} users (e.g. {missing[:3]}); "
                         f"rerun `compile profiles` for all users")

    histories = [corpus.split.test_history(u) for u in users]
    sasrec = SasrecOnnx.from_bundle(bundle)
    retrieved = sasrec.retrieve([Query(history=catalog.indices(h), exclude=catalog.indices(h), k=config.candidates)
                                 for h in histories])
    model, _ = load_causal_lm(bundle.path(config.llm))
    tokenizer = AutoTokenizer.from_pretrained(bundle.path(config.llm))
    prompt = PalrPrompt(tokenizer, PromptSettings.from_dict(ranker["prompt"]))
    prefix = compute_prefix(model, prompt.prefix_ids())
    weight = float(ranker["fusion_weight"])
    generate_k = min(int(ranker["generate_k"]), config.candidates)

    rows = []
    for user, history, ranked in tqdm(list(zip(users, histories, retrieved)), desc="evaluate ranking", unit="user"):
        candidates = [catalog.item(int(i)) for i in ranked.indices]
        retrieval_scores = [float(s) for s in ranked.scores]
        target = corpus.split.test[user]
        position = next((i for i, c in enumerate(candidates) if c.id == target), None)
        parts = prompt.retrieval(profiles[user], [catalog.by_id(i) for i in history], candidates)
        row = {"user": user, "target_position": position, "retrieval_rank": target_rank(range(len(candidates)), position)}
        if "score" in config.modes:
            t0 = time.perf_counter()
            llm = score_labels(model, parts.input_ids, parts.label_token_ids, prefix=prefix)
            row["score_seconds"] = time.perf_counter() - t0
            row["llm_scores"] = llm
            row["llm_rank"] = target_rank(order_by_scores(llm), position)
            row["score_rank"] = target_rank(order_by_scores(fuse(llm, retrieval_scores, weight)), position)
        if "generate" in config.modes:
            t0 = time.perf_counter()
            constraint = answer_constraint(ranker["generate_format"], parts.label_token_ids,
                                           parts.candidate_line_ids, generate_k)
            emitted = generate_constrained(model, parts.input_ids, constraint,
                                           bias=generation_bias(retrieval_scores, weight), prefix=prefix)
            row["generate_seconds"] = time.perf_counter() - t0
            row["emitted"] = emitted
            row["generate_invalid"] = len(set(emitted)) != len(emitted) or any(
                not 0 <= i < len(candidates) for i in emitted) or len(emitted) != generate_k
            row["generate_rank"] = target_rank(complete_order(emitted, len(candidates)), position)
        rows.append(row)

    report = summarise(rows, config, ranker, weight, generate_k)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    with (bundle.reports_dir() / USERS_REPORT).open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    bundle.record_step(STEP, step_fp, time.perf_counter() - started,
                       **{k: v for k, v in report.items() if k.endswith("ndcg@10")})
    bundle.save()
    log.info("evaluate ranking (%d users, K=%d): NDCG@10 retrieval %.4f | score %.4f (LLM alone %.4f) | "
             "generate %s; fusion weight %.2f → %s", len(rows), config.candidates, report["retrieval_ndcg@10"],
             report.get("score_ndcg@10", float("nan")), report.get("llm_score_ndcg@10", float("nan")),
             f"{report['generate_ndcg@10']:.4f}" if "generate_ndcg@10" in report else "-", weight, report_path)
    return report


def summarise(rows: list[dict], config: EvaluateRankingConfig, ranker: dict, weight: float, generate_k: int) -> dict:
    def add(prefix: str, key: str) -> None:
        ranks = [r[key] for r in rows]
        report[f"{prefix}_hr@{K}"] = metrics.hit_rate(ranks, K)
        report[f"{prefix}_ndcg@{K}"] = metrics.ndcg(ranks, K)

    report: dict = {"users": len(rows), "k": config.candidates}
    add("retrieval", "retrieval_rank")
    if "score" in config.modes:
        add("score", "score_rank")
        add("llm_score", "llm_rank")
        report["score_seconds_per_user"] = sum(r["score_seconds"] for r in rows) / len(rows)
    if "generate" in config.modes:
        add("generate", "generate_rank")
        report["generate_invalid_rate"] = sum(r["generate_invalid"] for r in rows) / len(rows)
        report["generate_seconds_per_user"] = sum(r["generate_seconds"] for r in rows) / len(rows)
    report["target_retrieved_rate"] = sum(r["target_position"] is not None for r in rows) / len(rows)
    for mode in ("score", "generate"):
        if f"{mode}_ndcg@{K}" in report and report[f"retrieval_ndcg@{K}"] > 0:
            report[f"{mode}_vs_retrieval_ndcg@{K}"] = report[f"{mode}_ndcg@{K}"] / report[f"retrieval_ndcg@{K}"]
    report.update({"fusion_weight": weight, "generate_format": ranker["generate_format"], "generate_k": generate_k,
                   "llm": config.llm, "profile_method": ranker["profile_method"], "seed": config.seed})
    return report
