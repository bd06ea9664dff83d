"""`compile merge`: fold the LoRA adapter into the base weights → `llm/merged/` + `llm/ranker.json`.

`merge_and_unload` gives a plain checkpoint the servers load without peft. The merged model's
logits are checked against the adapter model's on a validation prompt (max |diff| logged and
recorded; above --tolerance the step fails).

`llm/ranker.json` is everything serving needs besides weights, so it builds prompts and rankings
exactly as training and evaluation did:

    prompt            PromptSettings (palr/prompt.py) the SFT data was built with
    candidates        K, and the label strings and token ids for up to K candidates
    fusion_weight     weight of the retrieval term in the fused score (palr/ranking.py), fit here on
                      validation users (valid.jsonl) by grid search over NDCG@10
    retrieval_trend_weights  the retrieval term's weight per candidate trend bucket (`retrieval_prior`:
                      retrieval log-softmax + w[bucket], a linear re-ranker fit listwise on the training
                      examples; null: the retrieval scores alone, `--no-retrieval-trend`)
    retrieval_collab_weight  the retrieval term's weight of each candidate's EASE score (palr/collab.py), fit
                      with the bucket weights on the training examples that carry the scores (null: none)
    item_tokens       the extra vocabulary folded into the merged checkpoint (palr/hybrid.py: item soft
                      tokens, trend tokens, rank tokens, the score row)
    trend, trend_bias how candidates' trend tokens are counted (palr/trends.py) and the ranking head's
                      learned bias per trend bucket
    rank_bias         the head's learned bias per rank-token row (`prompt.rank_tokens`; palr.ranking.head_bias)
    generate_format   "titles" (each answer line: a label, then its title; `TitleConstraint`) or
                      "labels" (`LabelConstraint`); generate_k: lines written
    generate_logit_weight  generate mode decodes labels by this weight times their logits plus the fused
                      score-mode terms as bias; fit on validation (0: generate follows the score order)
    profile_method    how profiles.json was made
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.llm_common import check_sft_data, config_record, fingerprint_record, preset_flag
from compile.sft_data import candidate_readout, example_readout, read_jsonl
from compile.steps import StepFailed
from palr.bundle import Bundle, file_checksums, fingerprint, write_atomically, write_directory
from palr.ranking import FUSION_GRID, RANKER_INPUTS

log = logging.getLogger(__name__)

MERGED_DIR = "llm/merged"
RANKER_FILE = "llm/ranker.json"
GENERATE_FORMATS = ("titles", "labels")
VERSION = 7  # 2: fusion grid up to 1000; 3: item projector folded; 4: trend and score rows; 5: generate logit weight;
# 6: the EASE score's weight in the retrieval term; 7: rank-token bias


@dataclass
class MergeConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs llm_base, lora, sft_data)"})
    tolerance: float = field(default=1e-3, metadata={
        "help": "max |logit difference| allowed between the merged and the adapter model"})
    fusion_users: int = field(default=100_000, metadata={
        "help": "validation users the fusion weight is fit on, at most (all of valid.jsonl by default; 0 = no "
                "fusion: weight 0)"})
    generate_format: str = field(default="labels", metadata={
        "help": "what generate mode writes per line: labels (one label token per candidate: the listwise ranker "
                "was trained at the label) or titles (a label, then that candidate's title, PALR-style)",
        "choices": GENERATE_FORMATS})
    generate_k: int = field(default=10, metadata={"help": "lines generate mode writes (items it ranks)"})
    retrieval_trend: bool = field(default=True, metadata={
        "help": "fuse the LLM with retrieval + a per-trend-bucket weight (trend rankers) + a weight of the EASE "
                "score (examples that carry it: sft-data --collab), fit listwise on the training examples (a linear "
                "re-ranker of the retriever; ranker.json retrieval_trend_weights, retrieval_collab_weight) instead "
                "of the retrieval scores alone"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})

    def __post_init__(self) -> None:
        if self.fusion_users < 0:  # valid[:-n] would silently leave out the last n users
            raise ValueError(f"--fusion-users must be >= 0, got {self.fusion_users}")
        if self.generate_k < 1:
            raise ValueError(f"--generate-k must be >= 1, got {self.generate_k}")


def merge(base_dir: Path, lora_dir: Path, out: Path, probe: dict, tolerance: float, layers: int = 0) -> float:
    """Merges, saves model + tokenizer to `out`; returns max |merged - adapter| over the probe's text logits
    and its readout logits.

    The extra rows in `lora_dir` (item projector, trend rows, score row; palr/hybrid.py) are folded into the
    merged model's vocabulary, so the merged checkpoint takes the ranker's prompts as plain token ids and its
    LM head holds the score row; the check runs the adapter model on the extra rows computed on the fly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palr.hybrid import fold_into_vocabulary, input_embeddings, load_projector, read_settings
    from palr.llm import keep_first_layers

    base = keep_first_layers(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), layers)
    vocab = base.get_input_embeddings().num_embeddings
    extra = load_projector(lora_dir, base.config.get_text_config().hidden_size)
    model = PeftModel.from_pretrained(base, lora_dir).eval()
    ids = torch.tensor([probe["input_ids"]])  # [1, T]
    positions = probe.get("readout_positions") or []
    with torch.inference_mode():
        rows = extra()  # [X, D]
        hidden = model.get_base_model().model(inputs_embeds=input_embeddings(base, ids, rows)).last_hidden_state
        adapter_logits = base.lm_head(hidden)[..., :vocab]  # [1, T, V]
        adapter_read = hidden[0, positions] @ rows[-1] if positions else None  # the score row at each candidate
    merged = model.merge_and_unload().eval()
    size = fold_into_vocabulary(merged, extra, int(read_settings(lora_dir)["offset"]))
    log.info("folded %d extra rows (items, trend and rank tokens, score row) into the vocabulary (%d -> %d ids)",
             size - vocab, vocab, size)
    with torch.inference_mode():
        logits = merged(input_ids=ids).logits  # [1, T, V + X]
        diff = float((logits[..., :vocab] - adapter_logits).abs().max())
        if adapter_read is not None:
            diff = max(diff, float((logits[0, positions, size - 1] - adapter_read).abs().max()))
    log.info("merged vs adapter logits (text vocabulary and readouts) over %d tokens: max |diff| = %.3g "
             "(tolerance %.3g)", ids.shape[1], diff, tolerance)
    if diff > tolerance:
        raise StepFailed(f"merged model's logits differ from the adapter model's by {diff:.3g} (> {tolerance:.3g})")
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return diff


def fit_retrieval_term_weights(train: list[dict], buckets: int) -> tuple[list[float] | None, float | None]:
    """`palr.ranking.retrieval_prior`'s weights (per trend bucket; of the EASE score), fit on the training
    examples that carry their retriever's scores (the held-out SASRec's: as the served one ranks unseen
    positions) and the features: (None, None) when none carries trend buckets or EASE scores."""
    from palr.ranking import fit_prior_weights

    rows = [x for x in train if x.get("retrieval_scores") and x.get("target_position") is not None]
    trend = bool(rows) and all(x.get("trend") for x in rows)
    collab = bool(rows) and all(x.get("collab") for x in rows)
    if not (trend or collab):
        return None, None
    weights, collab_weight = fit_prior_weights([x["retrieval_scores"] for x in rows],
                                               [x["trend"] for x in rows] if trend else None,
                                               [x["target_position"] for x in rows], buckets,
                                               [x["collab"] for x in rows] if collab else None)
    log.info("retrieval term fit on %d training examples: trend weights %s, EASE weight %s", len(rows),
             weights if trend else None, collab_weight)
    return (weights if trend else None), collab_weight


def fit_fusion(model_dir: Path, valid: list[dict], bias_by_bucket: list[float] | None = None,
               retrieval_trend_weights: list[float] | None = None,
               retrieval_collab_weight: float | None = None,
               rank_bias: list[float] | None = None) -> tuple[float, float, dict]:
    """Score-mode readouts on validation users → the NDCG@10-best retrieval weight, and for a candidate-readout
    ranker the weight of the label logits in generate mode (`fit_generate_logit_weight`); what the validation
    users say about them (retrieval order, LLM alone, fused, by weight)."""
    import torch

    from palr.llm import compute_prefix, label_log_probs, load_causal_lm, read_prompt
    from palr.metrics import ndcg
    from palr.prompt import Readout
    from palr.ranking import fit_fusion_weight, head_bias, retrieval_prior, target_rank

    model, _ = load_causal_lm(model_dir)
    prefix = compute_prefix(model, valid[0]["input_ids"][: valid[0]["prefix_len"]])
    reads = [read_prompt(model, x["input_ids"], [example_readout(x), Readout.after_prompt(len(x["input_ids"]),
                                                                                          x["label_token_ids"])],
                         prefix=prefix) for x in tqdm(valid, desc="fusion (validation)", unit="user")]
    llm = [label_log_probs(torch.tensor(read)) for read, _ in reads]
    targets = [x["target_position"] for x in valid]
    retrieval_scores = [retrieval_prior(x["retrieval_scores"], x.get("trend"), retrieval_trend_weights,
                                        x.get("collab"), retrieval_collab_weight) for x in valid]
    biases = [head_bias(bias_by_bucket, x.get("trend"), rank_bias, x.get("ranks")) for x in valid]
    weight, curve = fit_fusion_weight(llm, retrieval_scores, targets, candidate_bias=biases)
    retrieval = ndcg([target_rank(range(len(x["candidates"])), t) for x, t in zip(valid, targets)], 10)
    log.info("fusion weight %.2f fit on %d validation users: NDCG@10 retrieval %.4f, LLM alone %.4f, fused %.4f; "
             "by weight: %s", weight, len(valid), retrieval, curve[0.0], curve[weight],
             ", ".join(f"{w:g}: {v:.4f}" for w, v in curve.items()))
    validation = {"users": len(valid), "retrieval_ndcg@10": retrieval, "llm_ndcg@10": curve[0.0],
                  "fused_ndcg@10": curve[weight], "ndcg@10_by_weight": {str(w): v for w, v in curve.items()}}
    logit_weight = 1.0
    if candidate_readout(valid[0]) is not None:
        logit_weight, generate_curve = fit_generate_logit_weight(reads, retrieval_scores, biases, targets, weight)
        validation["generate_first_step_ndcg@10_by_logit_weight"] = {str(g): v for g, v in generate_curve.items()}
        log.info("generate mode: label-logit weight %.2f (first-step order NDCG@10 by weight: %s)", logit_weight,
                 ", ".join(f"{g:g}: {v:.4f}" for g, v in generate_curve.items()))
    return weight, logit_weight, validation


GENERATE_LOGIT_GRID = (0.0, 0.1, 0.25, 0.5, 1.0)
# A weight > 0 makes every generate request decode (k more passes); it is kept only for a validation gain of at
# least this much over weight 0 (the score-mode order, no decode pass): a smaller one is noise on ~1k users.
GENERATE_DECODE_MIN_GAIN = 0.01


def fit_grids() -> dict:
    """The code-level choices of the fits: part of merge's fingerprint, so changing one refits existing bundles."""
    return {"fusion_grid": FUSION_GRID, "generate_logit_grid": GENERATE_LOGIT_GRID,
            "generate_decode_min_gain": GENERATE_DECODE_MIN_GAIN}


def fit_generate_logit_weight(reads, retrieval_scores, biases, targets, weight: float) -> tuple[float, dict]:
    """Generate mode of a candidate-readout ranker decodes labels by `g * label logit + bias`, the bias being
    the fused score-mode terms (readout, trend bias, weight * retrieval). The grid `g` whose first decoding
    step orders the validation users' candidates best (NDCG@10 of that order: the emitted list follows it up
    to what later steps change; ties go to the larger `g`), if it beats `g` = 0 by `GENERATE_DECODE_MIN_GAIN`
    (relative); else 0, which makes generate mode the score-mode order at score mode's cost (no decode pass)."""
    from palr.metrics import ndcg
    from palr.ranking import decoding_bias, generation_bias, order_by_scores, target_rank

    curve = {}
    for g in GENERATE_LOGIT_GRID:
        ranks = []
        for (read, labels), scores, bias, target in zip(reads, retrieval_scores, biases, targets):
            fused = decoding_bias(generation_bias(scores, weight, bias), read)
            ranks.append(target_rank(order_by_scores([g * label + f for label, f in zip(labels, fused)]), target))
        curve[g] = ndcg(ranks, 10)
    best = max(GENERATE_LOGIT_GRID, key=lambda g: (round(curve[g], 6), g))
    if curve[best] < curve[0.0] * (1 + GENERATE_DECODE_MIN_GAIN):
        best = 0.0
    return best, curve


def keep_projector(bundle: Bundle) -> None:
    """The trained item projector (hybrid prompts) as its own artifact, llm/projector/: its weights, the
    frozen SASRec table they read and that table's version; the merged model already holds its output."""
    from palr.hybrid import PROJECTOR_DIR, SETTINGS, WEIGHTS, read_settings

    lora = bundle.path("lora")
    target = bundle.root / PROJECTOR_DIR
    shutil.rmtree(target, ignore_errors=True)
    if not (lora / WEIGHTS).is_file():
        bundle.remove_artifact("projector")
        return
    target.mkdir(parents=True)
    for name in (WEIGHTS, SETTINGS):
        shutil.copy2(lora / name, target / name)
    bundle.add_artifact("projector", PROJECTOR_DIR, **read_settings(target))


def learned_head_bias(bundle: Bundle) -> tuple[list[float] | None, list[float] | None]:
    """The ranking head's bias per trend bucket and per rank-token row, as fine-tuned (None without them)."""
    from safetensors.torch import load_file

    from palr.hybrid import WEIGHTS

    weights = load_file(str(bundle.path("lora") / WEIGHTS))
    def as_list(bias):
        return [round(float(b), 6) for b in bias] if bias is not None and bias.numel() else None

    return as_list(weights.get("trend_bias")), as_list(weights.get("rank_bias"))


def ranker_record(bundle: Bundle, config: MergeConfig, meta: dict, weight: float, validation: dict,
                  trend_bias: list[float] | None, retrieval_trend_weights: list[float] | None = None,
                  retrieval_collab_weight: float | None = None, rank_bias: list[float] | None = None) -> dict:
    """llm/ranker.json; `meta`: the SFT data's meta.json."""
    from transformers import AutoTokenizer

    from palr.prompt import PalrPrompt, PromptSettings

    settings = PromptSettings.from_dict(meta["prompt"])
    # labels are text tokens whatever the prompt: a text prompt of the same settings gives their ids
    prompt = PalrPrompt(AutoTokenizer.from_pretrained(bundle.path("llm_base")),
                        PromptSettings.from_dict({**meta["prompt"], "prompt": "text", "trend": False,
                                                  "rank_tokens": [], "readout": "label"}))
    k = meta["candidates"]
    return {
        "prompt": settings.to_dict(),
        "candidates": k,
        "labels": [settings.label_prefix + c for c in settings.label_alphabet[:k]],
        "label_token_ids": prompt.label_token_ids(k),
        "fusion_weight": weight,
        "fusion_validation": validation,
        "generate_format": config.generate_format,
        "generate_k": config.generate_k,
        "profile_method": meta["profile_method"],
        "item_tokens": meta["item_tokens"],
        "trend": meta.get("trend"),
        "trend_bias": trend_bias,
        "rank_bias": rank_bias,
        "retrieval_trend_weights": retrieval_trend_weights,
        "retrieval_collab_weight": retrieval_collab_weight,
        "lora": bundle.version("lora"),
        # what the training data, and so the fits above, were built from: a server warns when the bundle holds
        # other versions (one step rerun alone: palr.ranking.stale_ranker_inputs)
        "fit_on": {name: bundle.version(name) for name in RANKER_INPUTS if bundle.has(name)},
    }


def check_adapter_inputs(bundle: Bundle) -> None:
    """Refuses an adapter trained on other SFT data or another base model than the bundle holds now (`sft-data`
    rerun since): merging it would pair its weights and item rows with the new data's candidate count, item tokens
    and fits. Adapters from before this was recorded pass. (While a finetune run is unfinished the bundle names no
    adapter at all: `run` refuses first.)"""
    lora = bundle.artifact("lora")
    for name in ("sft_data", "llm_base"):
        trained_on, now = lora.get(name), bundle.version(name)
        if trained_on is not None and trained_on != now:
            raise ValueError(f"the LoRA adapter ({bundle.path('lora')}) was trained on {name} version {trained_on}, "
                             f"and the bundle's {name} is now {now}: train it again first with the options it "
                             f"was built with (python -m compile finetune --bundle {bundle.root} {preset_flag(bundle)})")


def run(config: MergeConfig) -> Path:
    bundle = Bundle.open(config.bundle)
    if not bundle.has("lora"):
        raise ValueError(f"{bundle.root} has no finished LoRA adapter to merge (a finetune run that was stopped, "
                         f"killed or failed sets the earlier one aside): run `python -m compile finetune --bundle "
                         f"{bundle.root}` with that run's options (its --preset and the rest) to its end first")
    inputs = ["llm_base", "lora", "sft_data"]
    step_fp = fingerprint("merge", VERSION, fingerprint_record(config, bundle), fit_grids(),
                          [bundle.version(name) for name in inputs])
    out = bundle.root / MERGED_DIR
    if not config.force and bundle.step_is_current("merge", step_fp, ["llm_merged", "ranker"]):
        log.info("merged model is current (%s); skipping", out)
        return out
    started = time.perf_counter()
    check_adapter_inputs(bundle)
    check_sft_data(bundle, "merge")
    meta = json.loads((bundle.path("sft_data") / "meta.json").read_text())
    if not 1 <= config.generate_k <= meta["candidates"]:  # refused before the merged model is rewritten, not after
        raise ValueError(f"--generate-k {config.generate_k} must be between 1 and the candidate count "
                         f"{meta['candidates']}")
    # merged and fitted beside llm/merged, which keeps the weights the manifest names until the ranker fit over them
    # is saved with them (a merge stopped during the fit left new weights under the old version, and a build then
    # made an engine of them under that version)
    # (checksums taken before the swap: the manifest names the new files milliseconds after it)
    diff, ranker, files = write_directory(out, lambda part: (*merge_and_fit(bundle, config, meta, part),
                                                             file_checksums(part)))
    bundle.add_artifact("llm_merged", MERGED_DIR, files=files, dtype="float32", merge_max_abs_diff=diff)
    keep_projector(bundle)
    ranker_path = bundle.root / RANKER_FILE
    write_atomically(ranker_path, json.dumps(ranker, indent=2) + "\n")
    bundle.add_artifact("ranker", RANKER_FILE, fusion_weight=ranker["fusion_weight"],
                        generate_format=config.generate_format)
    bundle.record_step("merge", step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("merged model → %s, ranker → %s (fusion weight %.2f) in %.1f s", out, ranker_path,
             ranker["fusion_weight"], time.perf_counter() - started)
    return out


def merge_and_fit(bundle: Bundle, config: MergeConfig, meta: dict, out: Path) -> tuple[float, dict]:
    """The merged model written to `out` and the ranker record fit over it: (merged vs adapter max |diff|, record)."""
    valid = read_jsonl(bundle.path("sft_data") / "valid.jsonl")
    diff = merge(bundle.path("llm_base"), bundle.path("lora"), out, valid[0], config.tolerance,
                 int(bundle.artifact("lora").get("layers") or 0))
    fusion_valid = valid[: config.fusion_users]
    bias, rank_bias = learned_head_bias(bundle)
    bias = bias if meta.get("trend") else None
    prior_weights, collab_weight = None, None
    if config.retrieval_trend:
        prior_weights, collab_weight = fit_retrieval_term_weights(
            read_jsonl(bundle.path("sft_data") / "train.jsonl"), int((meta.get("trend") or {}).get("buckets", 1)))
    weight, logit_weight, validation = fit_fusion(out, fusion_valid, bias, prior_weights, collab_weight, rank_bias) \
        if fusion_valid else (0.0, 1.0, {})
    ranker = ranker_record(bundle, config, meta, weight, validation, bias, prior_weights, collab_weight,
                           rank_bias) | {"generate_logit_weight": logit_weight}
    return diff, ranker
