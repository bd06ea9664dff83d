"""`compile compare-profiles`: which profile method ranks better, measured on validation users only.

For the first `--users` examples of `llm/sft/valid.jsonl` (validation users; their histories hold
training items only), the PALR prompt is rebuilt with each profile method (`stats`: genre/year
statistics; `llm`: the base LLM's hierarchical summary; `none`: no profile line) and each model
(`--models`, bundle artifacts such as llm_base and llm_merged) scores the candidates in score mode.
Reported per (model, method): the LLM-alone NDCG@10, the best fused NDCG@10 over the fusion grid and
its weight, next to the retrieval order's NDCG@10 on the same users → `reports/compare_profiles.json`.
The test split is never read, so the winner can be made the default without tuning on test.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.profiles import ProfilesConfig, profiler
from compile.sft_data import profile_source, read_jsonl
from palr import metrics
from palr.bundle import Bundle, write_atomically
from palr.catalog import Catalog
from palr.profiles import METHODS as PROFILE_METHODS, Profiles

log = logging.getLogger(__name__)

METHODS = (*PROFILE_METHODS, "none")
REPORT = "compare_profiles.json"


@dataclass
class CompareProfilesConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle with llm/sft/valid.jsonl and the models"})
    users: int = field(default=100, metadata={"help": "validation examples compared (first N of valid.jsonl)"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={
        "help": f"profile methods to compare ({', '.join(METHODS)})"})
    models: list[str] = field(default_factory=lambda: ["llm_base", "llm_merged"], metadata={
        "help": "bundle artifacts to score with (llm_base: untuned, llm_merged: fine-tuned with the bundle's profiles)"})


def profiles_for(method: str, bundle: Bundle, catalog: Catalog, histories) -> list[str]:
    """`method`'s profiles of `histories`: for the bundle's own method with the settings it recorded (what the
    merged model was tuned on), else that method's defaults."""
    if method == "none":
        return [""] * len(histories)
    if Profiles.load(bundle.path("profiles")).method == method:
        make = profile_source(bundle, catalog)  # as sft-data made the training prompts' profiles
    else:
        make = profiler(bundle, catalog, ProfilesConfig(bundle=bundle.root, method=method))
    return make(histories, progress=f"{method} profiles")


def readout(model, prompt, prefix, examples, histories, profiles, catalog) -> dict:
    """LLM-alone and best-fused NDCG@10 of one (model, profiles) pair in score mode."""
    from palr.llm import score_candidates
    from palr.ranking import fit_fusion_weight

    started = time.perf_counter()
    llm = []
    for x, history, profile in zip(examples, histories, profiles):
        trends = x.get("trend") if prompt.settings.trend else None
        ranks = x.get("ranks") if prompt.settings.rank_tokens else None
        parts = prompt.retrieval(profile, history, [catalog.by_id(i) for i in x["candidates"]], trends, ranks)
        llm.append(score_candidates(model, parts.input_ids, parts.readout, prefix=prefix))
    weight, curve = fit_fusion_weight(llm, [x["retrieval_scores"] for x in examples],
                                      [x["target_position"] for x in examples])
    return {"llm_ndcg@10": curve[0.0], "fused_ndcg@10": curve[weight], "fusion_weight": weight,
            "seconds_per_user": (time.perf_counter() - started) / len(examples)}


def model_prompt(model, tokenizer, settings, meta: dict, catalog):
    """The bundle's prompt for a model: as trained where the model's vocabulary holds the extra rows (the
    merged ranker), else the plain text variant of the same settings (the untuned base model: titles, no
    trend tokens, the label readout)."""
    from palr.hybrid import ItemTokens
    from palr.prompt import PalrPrompt, PromptSettings

    tokens = meta["item_tokens"]
    vocabulary = ItemTokens.for_catalog(int(tokens["offset"]), [item.id for item in catalog.items],
                                        int(tokens.get("trend_buckets") or 0), int(tokens.get("rank_rows") or 0))
    if model.get_input_embeddings().num_embeddings < vocabulary.offset + vocabulary.size:
        log.info("%s has no extra rows in its vocabulary: plain text prompts for it", model.name_or_path)
        plain = {**settings.to_dict(), "prompt": "text", "trend": False, "rank_tokens": [],
                 "readout": "label"}
        return PalrPrompt(tokenizer, PromptSettings.from_dict(plain))
    return PalrPrompt(tokenizer, settings, vocabulary)


def run(config: CompareProfilesConfig) -> dict:
    from transformers import AutoTokenizer

    from palr.llm import compute_prefix, load_causal_lm
    from palr.prompt import PromptSettings
    from palr.ranking import target_rank

    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"--methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    bundle = Bundle.open(config.bundle)
    bundle.verify(["catalog", "sft_data", *config.models])
    catalog = Catalog.load(bundle.path("catalog"))
    sft = bundle.path("sft_data")
    examples = read_jsonl(sft / "valid.jsonl")[: config.users or None]
    meta = json.loads((sft / "meta.json").read_text())
    settings = PromptSettings.from_dict(meta["prompt"])
    histories = [[catalog.by_id(i) for i in x["history"]] for x in examples]
    retrieval = metrics.ndcg([target_rank(range(len(x["candidates"])), x["target_position"]) for x in examples], 10)
    profiles = {m: profiles_for(m, bundle, catalog, histories) for m in config.methods}
    report = {"users": len(examples), "split": "validation", "retrieval_ndcg@10": retrieval,
              "examples": {m: p[:3] for m, p in profiles.items()}, "results": {}}
    for name in config.models:
        model, _ = load_causal_lm(bundle.path(name))
        prompt = model_prompt(model, AutoTokenizer.from_pretrained(bundle.path(name)), settings, meta, catalog)
        prefix = compute_prefix(model, prompt.prefix_ids())  # the same for every profile method
        for method in tqdm(config.methods, desc=f"profiles ({name})", unit="method"):
            result = readout(model, prompt, prefix, examples, histories, profiles[method], catalog)
            report["results"][f"{name}/{method}"] = result
            log.info("%s with %s profiles: LLM alone NDCG@10 %.4f, fused %.4f (weight %g); retrieval %.4f",
                     name, method, result["llm_ndcg@10"], result["fused_ndcg@10"], result["fusion_weight"], retrieval)
    path = bundle.reports_dir() / REPORT
    write_atomically(path, json.dumps(report, indent=2))
    log.info("→ %s", path)
    return report
