"""`compile finetune`: LoRA instruction tuning of the base LLM on `llm/sft/train.jsonl` → `llm/lora/`.

peft LoRA (rank, alpha, dropout, target modules and the number of top layers configurable),
AdamW with warmup + cosine decay. The loss (`--loss`): listwise by default, the cross-entropy of the
target among the candidates over the scores score mode reads (one forward over left-padded prompts);
lm, on the answer tokens only (prompts are context), batches left-padded so every answer ends at the
last position and the vocabulary projection runs only over the answer span (`logits_to_keep`).

Seeded (data order, LoRA init, dropout). Every `--save-every` steps the adapter, optimizer, schedule
and RNG states go to `llm/checkpoints/<run>/step-N/` (one folder per set of inputs); a rerun with the
same inputs resumes from the latest one and, RNG included, continues exactly as if it had not stopped.
With `--eval-every`, the adapter is scored on validation examples (score-mode NDCG@10 of the LLM alone,
the target's rank among the SASRec candidates) and the best one is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.llm_common import check_sft_data, config_record, fingerprint_record
from compile.sft_data import candidate_readout, example_readout, read_jsonl
from compile.steps import StepFailed
from palr.bundle import Bundle, BundleError, fingerprint, write_directory
from palr.cli import check_bounds

log = logging.getLogger(__name__)

LORA_DIR = "llm/lora"
CHECKPOINT_DIR = "llm/checkpoints"
VERSION = 4  # 2: listwise label-logit loss, item projector; 3: candidate readout, trend rows and bias, generate loss;
# 4: rank-token rows and bias


@dataclass
class FinetuneConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs llm_base, sft_data)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      metadata={"help": "module names that get LoRA adapters"})
    layers: int = field(default=4, metadata={
        "help": "keep only the base model's first N decoder layers (0 = all): the ranker is the shortened model "
                "(training and serving cost ~N/30 of SmolLM2's 30 layers); merge shortens the base the same way. "
                "4: on validation, 2, 4 and 8 layers ranked alike for the same training minutes (docs/results.md)"})
    top_layers: int = field(default=0, metadata={
        "help": "adapt only the last N decoder layers (0 = all); backward then stops there, so steps are faster"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training examples"})
    max_steps: int = field(default=0, metadata={
        "help": "stop after this many optimizer steps (0 = from --epochs: one pass over the training examples)"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    warmup_steps: int = field(default=10, metadata={
        "help": "linear warmup steps before the cosine decay (at most a quarter of the run's steps)"})
    max_tokens: int = field(default=1024, metadata={"help": "examples longer than this are left out"})
    save_every: int = field(default=25, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    eval_every: int = field(default=0, metadata={
        "help": "validate every N steps and keep the best adapter (0 = keep the last)"})
    valid_examples: int = field(default=100, metadata={"help": "validation examples scored per evaluation"})
    stop_after: int = field(default=0, metadata={
        "help": "leave after N steps of this run, checkpoint kept (train in pieces on a shared machine)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda", "choices": ("cpu", "cuda")})
    seed: int = field(default=0, metadata={"help": "random seed"})
    force: bool = field(default=False, metadata={"help": "retrain from scratch even if inputs are unchanged"})
    loss: str = field(default="listwise", metadata={
        "help": "listwise: cross-entropy of the target over the candidates' readout logits, what score mode reads "
                "(the score row at each candidate's last token with --readout candidate, sft-data's default; the "
                "label logits at the answer position with --readout label, a FIRST/LlamaRec-style verbalizer); lm: next-token cross-entropy over the answer (label + title "
                "tokens); both: their sum", "choices": ("listwise", "lm", "both")})
    # 0: on all 943 validation users (readout_ablation.py --tokens time,ease,retr, docs/results.md) the LLM alone
    # ranked 1.105x retrieval trained at 0 against 1.012x at 1 (paired 1.092x, 1.032-1.153), fused with the
    # shipped retrieval term alike (0.999x): with rank tokens the LLM sees retrieval's order and learns it
    fusion_in_loss: float = field(default=0.0, metadata={
        "help": "listwise loss: the readout logits plus this times the retrieval log-softmax of the candidates' "
                "SASRec scores, so the LLM learns only what the retriever misses (needs retrieval scores in the "
                "examples: sft-data --negatives holdout); 0: the LLM learns to rank on its own, from a prompt "
                "that shows each candidate's retrieval and EASE rank (sft-data --rank-tokens)"})
    retrieval_trend: bool = field(default=False, metadata={
        "help": "trend rankers: the fused training score uses the retrieval term merge fuses with when its "
                "--retrieval-trend is on (retrieval log-softmax + per-trend-bucket weights fit on these training "
                "examples, palr.ranking.retrieval_prior), so the LLM learns what that linear re-ranker misses"})
    projector_lr: float = field(default=1e-3, metadata={"help": "hybrid prompts: peak learning rate of the item projector"})
    head_lr: float = field(default=1e-2, metadata={
        "help": "peak learning rate of the ranking head's own rows: the score row (zero at the start, so the ranker "
                "starts as the retrieval order), the trend- and rank-token rows and their per-bucket biases"})
    generate_loss: float = field(default=0.5, metadata={
        "help": "candidate readout: weight of the listwise loss on the label logits after the prompt plus the "
                "(fixed) fused scores, what generate mode decodes (0: generate mode gets untrained labels)"})

    def __post_init__(self) -> None:
        """Refused here, before the run drops the bundle's adapter or a checkpoint: a negative --max-steps trained
        nothing and replaced the adapter with an untrained one, --batch-size 0 deleted the checkpoints and then
        crashed, and --layers -1 saved a model with no decoder layers."""
        check_bounds(self, at_least_1=("rank", "batch_size", "valid_examples", "max_tokens"),
                     at_least_0=("layers", "top_layers", "max_steps", "warmup_steps", "save_every", "eval_every",
                                 "stop_after", "threads"),
                     positive=("epochs", "lr", "alpha"),
                     non_negative=("weight_decay", "max_grad_norm", "fusion_in_loss", "projector_lr", "head_lr",
                                   "generate_loss"),
                     fractions=("dropout",))


# -- data -----------------------------------------------------------------------------------------

def load_rows(path: Path, max_tokens: int, loss: str) -> list[dict]:
    """The examples the loss trains on: with a listwise part, Recommend_Retrieval rows whose target is among
    the candidates; with the lm loss alone, every row with an answer. Longer than `max_tokens`: left out."""
    rows = [x for x in read_jsonl(path) if (x.get("target_position") is not None if loss != "lm" else x["answer_ids"])]
    kept = [r for r in rows if len(r["input_ids"]) + len(r["answer_ids"]) <= max_tokens]
    if len(kept) < len(rows):
        log.warning("left out %d of %d examples longer than %d tokens", len(rows) - len(kept), len(rows), max_tokens)
    if not kept:
        raise ValueError(f"{path}: no training example for the {loss} loss")
    return kept


def with_retrieval_prior(train: list[dict], buckets: int, *row_lists: list[dict]) -> tuple[list[dict], ...]:
    """Each row list with its retrieval scores replaced by the retrieval term merge will fuse with
    (`palr.ranking.retrieval_prior`, the weights fit on all of `train` exactly as merge fits them)."""
    from compile.merge import fit_retrieval_term_weights
    from palr.ranking import retrieval_prior

    weights, collab_weight = fit_retrieval_term_weights(train, buckets)
    return tuple([{**r, "retrieval_scores": retrieval_prior(r["retrieval_scores"], r.get("trend"), weights,
                                                            r.get("collab"), collab_weight)}
                  if r.get("retrieval_scores") else r for r in rows] for rows in row_lists)


def batch_loss(model, rows: list[dict], config: "FinetuneConfig", pad_id: int, extra=None):
    """The configured loss on one batch of rows (see FinetuneConfig.loss)."""
    import torch

    total = torch.zeros(())
    if config.loss in ("lm", "both"):
        answered = [(r["input_ids"], r["answer_ids"]) for r in rows if r["answer_ids"]]
        rows_out = extra() if extra is not None else None
        total = total + answer_loss(model, [t.to(config.device) for t in collate(answered, pad_id)], rows_out)
    if config.loss in ("listwise", "both"):
        ranked = [r for r in rows if r.get("target_position") is not None]
        if ranked:
            weight = config.fusion_in_loss if all(r.get("retrieval_scores") for r in ranked) else 0.0
            scores, labels = readout_scores(model, ranked, pad_id, extra, with_labels=config.generate_loss > 0)
            fused = fused_scores(scores, ranked, weight, extra)
            total = total + listwise_loss(fused, ranked)
            if labels is not None:  # generate mode decodes labels with the fused scores as bias: train it so
                total = total + config.generate_loss * listwise_loss(labels + fused.detach(), ranked)
    return total


def load_examples(path: Path, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of every example that has an answer and fits `max_tokens`."""
    rows = [(x["input_ids"], x["answer_ids"]) for x in read_jsonl(path) if x["answer_ids"]]
    kept = [r for r in rows if len(r[0]) + len(r[1]) <= max_tokens]
    if len(kept) < len(rows):
        log.warning("left out %d of %d examples longer than %d tokens", len(rows) - len(kept), len(rows), max_tokens)
    if not kept:
        raise ValueError(f"{path}: no training example with an answer")
    return kept


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Left-padded batch of prompt + answer[:-1], and the answers right-aligned as targets.

    Returns input_ids, attention_mask, position_ids `[B, T]` and targets `[B, A]` (-100 = no loss),
    where A is the longest answer: the targets of the last A positions."""
    import torch

    sequences = [prompt + answer[:-1] for prompt, answer in rows]
    width = max(map(len, sequences))
    answer_width = max(len(answer) for _, answer in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    targets = torch.full((len(rows), answer_width), -100, dtype=torch.long)  # [B, A]
    for row, (sequence, (_, answer)) in enumerate(zip(sequences, rows)):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
        targets[row, answer_width - len(answer):] = torch.tensor(answer)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: each sequence starts at 0
    return input_ids, mask, position_ids, targets


def answer_loss(model, batch, items=None) -> "torch.Tensor":
    """Mean cross-entropy over answer tokens; logits only for the last A positions. `items`: the projected
    item table of hybrid prompts (soft-token ids >= the vocabulary), None for text prompts."""
    import torch

    from palr.hybrid import input_embeddings

    input_ids, mask, position_ids, targets = batch
    embeds = input_embeddings(_causal_lm(model), input_ids, items)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=targets.shape[1]).logits  # [B, A, V]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _causal_lm(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_pad(sequences: list[list[int]], pad_id: int):
    """input_ids, attention_mask, position_ids `[B, T]`, left-padded so every row ends at the last column."""
    import torch

    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def readout_scores(model, rows: list[dict], pad_id: int, extra=None, with_labels: bool = False):
    """Each row's candidate readout logits `[B, C]` (fp32): the score row at each candidate's last token for
    candidate-readout examples (`readout_positions`), else each label's logit after the prompt; one forward
    over the left-padded prompts. With `with_labels` (candidate readout), also the label logits after the
    prompt `[B, C]` (what generate mode decodes), else None."""
    import torch

    from palr.hybrid import input_embeddings

    lm = _causal_lm(model)
    head = lm.get_output_embeddings().weight
    device = head.device  # the batch is built on the CPU; the model may be on cuda (--device)
    input_ids, mask, position_ids = (t.to(device) for t in left_pad([r["input_ids"] for r in rows], pad_id))
    rows_out = extra() if extra is not None else None  # [X, D]
    hidden = lm.model(inputs_embeds=input_embeddings(lm, input_ids, rows_out), attention_mask=mask,
                      position_ids=position_ids, use_cache=False).last_hidden_state  # [B, T, D]
    width = input_ids.shape[1]
    vocab = head.shape[0]
    positions, tokens = [], []
    for r in rows:
        readout, pad = example_readout(r), width - len(r["input_ids"])
        positions.append([pad + p for p in readout.positions])
        tokens.append(list(readout.tokens))
    positions, tokens = torch.tensor(positions, device=device), torch.tensor(tokens, device=device)  # [B, C]
    picked = hidden[torch.arange(len(rows), device=device)[:, None], positions].float()  # [B, C, D]
    weights = output_rows(head, tokens, rows_out, vocab).float()  # [B, C, D]
    scores = (picked * weights).sum(-1)  # [B, C]
    labels = None
    if with_labels and any(candidate_readout(r) is not None for r in rows):
        label_ids = torch.tensor([r["label_token_ids"] for r in rows], device=device)  # [B, C]
        labels = torch.einsum("bd,bcd->bc", hidden[:, -1].float(), head[label_ids].float())
    return scores, labels


def output_rows(head, tokens, extra_rows, vocab: int):
    """LM-head rows of `tokens` `[..., D]`: text tokens from the head, extra tokens (the score row) from the
    trained extra rows (the merge folds them into the head)."""
    import torch

    text = head[tokens.clamp(max=vocab - 1)]
    if extra_rows is None:
        return text
    extra = extra_rows[(tokens - vocab).clamp(min=0)]
    return torch.where((tokens >= vocab)[..., None], extra.to(text.dtype), text)


def fused_scores(scores, rows: list[dict], fusion_weight: float, extra=None):
    """The served score `[B, C]`: readout logits + the head's trend and rank bias + weight * log_softmax(retrieval)."""
    import torch

    from palr.ranking import RANK_BUCKETS

    fused, device = scores, scores.device
    if extra is not None and extra.trend_buckets and rows[0].get("trend") is not None:
        fused = fused + extra.trend_bias[torch.tensor([r["trend"] for r in rows], device=device)]
    if extra is not None and extra.rank.shape[0] and rows[0].get("ranks") is not None:
        ranks = torch.tensor([r["ranks"] for r in rows], device=device)  # [B, C, R]: each ranking's bucket
        rows_of = ranks + RANK_BUCKETS * torch.arange(ranks.shape[-1], device=device)  # [B, C, R]: rank-bias rows
        fused = fused + extra.rank_bias[rows_of].sum(-1)
    if fusion_weight:
        retrieval = torch.tensor([r["retrieval_scores"] for r in rows], device=device)  # [B, C]
        fused = fused + fusion_weight * torch.log_softmax(retrieval, -1)
    return fused


def listwise_loss(fused, rows: list[dict]):
    """Cross-entropy of the target among the candidates over the fused scores `[B, C]`."""
    import torch

    targets = torch.tensor([r["target_position"] for r in rows], device=fused.device)  # [B]
    return torch.nn.functional.cross_entropy(fused, targets)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a fixed function of the seed, so a resumed
    run sees exactly the batches it would have seen."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    return epoch_order(n, epoch, seed)[within * batch_size:(within + 1) * batch_size]


# -- model ----------------------------------------------------------------------------------------

def lora_model(base_dir: Path, config: FinetuneConfig, base_name: str | None = None):
    """The base model at `base_dir` (its first `config.layers`) with fresh LoRA adapters. `base_name`: what the
    saved adapter names as its base (default: `base_dir`); the bundle's relative path, so that the same training in
    two places writes the same adapter files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from palr.llm import keep_first_layers

    model = keep_first_layers(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                                   attn_implementation="sdpa"), config.layers)
    model.name_or_path = model.config.name_or_path = base_name or str(base_dir)  # what the saved adapter names
    layers = model.config.get_text_config().num_hidden_layers
    top = min(config.top_layers, layers) if config.top_layers > 0 else layers
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=list(range(layers - top, layers)) if top < layers else None)
    model = get_peft_model(model, lora).to(config.device)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s of the last %d/%d layers: %.2fM trainable of %.1fM parameters (%.2f%%)",
             config.rank, config.alpha, ",".join(config.target_modules), top, layers, trainable / 1e6, total / 1e6,
             100 * trainable / total)
    return model


def validation_ndcg(model, valid: list[dict], pad_id: int = 0, extra=None, k: int = 10, batch: int = 8) -> float:
    """Score-mode NDCG@k of the LLM alone (its head's trend and rank bias included) over validation users (a target
    not retrieved is a miss)."""
    import torch

    from palr.metrics import ndcg
    from palr.ranking import order_by_scores, target_rank

    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(valid), batch):
            rows = valid[start:start + batch]
            scores += fused_scores(readout_scores(model, rows, pad_id, extra)[0], rows, 0.0, extra).tolist()
    ranks = [target_rank(order_by_scores(s), x["target_position"]) for s, x in zip(scores, valid)]
    model.train(was_training)
    return ndcg(ranks, k)


# -- checkpoints ----------------------------------------------------------------------------------

def run_checkpoints(bundle_root: Path, run_fingerprint: str) -> Path:
    """This run's checkpoint folder (its steps and its best adapters): one per set of inputs, so a run never
    rotates away, resumes from or keeps the best adapter of a run with other inputs."""
    return bundle_root / CHECKPOINT_DIR / run_fingerprint[:16]


def log_other_runs(bundle_root: Path, own: Path) -> None:
    """Says which other runs' checkpoint folders are kept beside this run's, and their size (removed by hand)."""
    others = [d for d in sorted((bundle_root / CHECKPOINT_DIR).glob("*")) if d.is_dir() and d != own]
    if others:
        size = sum(f.stat().st_size for d in others for f in d.rglob("*") if f.is_file())
        log.info("kept the checkpoints of %d other run(s) with other inputs (%.1f MB: %s): rerun with their options to "
                 "resume one; delete a folder when it is no longer wanted", len(others), size / 2**20,
                 ", ".join(str(d.relative_to(bundle_root)) for d in others))


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict,
                    extras: Callable[[Path], None] = lambda _: None) -> Path:
    """`root/step-NNNNNN` (adapter, `extras` written into it, trainer state), complete before it appears; older
    steps of `root` removed."""
    import torch

    def write(part: Path) -> None:
        save_lora(model, part)
        extras(part)
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None  # LoRA dropout on cuda
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng, **state}, part / "trainer_state.pt")

    path = root / f"step-{step:06d}"
    write_directory(path, write)
    for old in sorted(root.glob("step-*"))[:-1]:  # keep the newest only
        shutil.rmtree(old)
    return path


def save_best(root: Path, step: int, save: Callable[[Path], None]) -> Path:
    """`root/best-NNNNNN`: the adapter of step `step`, the run's best so far, complete before it appears. One folder
    a step, so a run killed after a new best but before its next checkpoint resumes with the best its checkpoint
    names still there (it overwrote the one `best/` before, even half-written)."""
    path = root / f"best-{step:06d}"
    write_directory(path, save)
    return path


def best_adapter(root: Path, step: int) -> Path:
    """The saved best adapter of step `step` (a run begun before one folder a step: its one `best/`)."""
    for path in (root / f"best-{step:06d}", root / "best"):
        if (path / "adapter_model.safetensors").is_file():
            return path
    raise StepFailed(f"{root}: no saved adapter of the best step {step}; rerun with --force")


def forget_bests(root: Path, keep_step: int | None) -> None:
    """Removes the best adapters but `keep_step`'s: after a checkpoint, which names it, no resume needs them."""
    keep = f"best-{keep_step:06d}" if keep_step is not None else None
    for path in root.glob("best-*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def save_lora(model, directory: Path) -> None:
    """The adapter's files, the same bytes for the same training: peft writes its config's set-valued fields
    (target_modules) in hash order, which PYTHONHASHSEED changes from run to run (two identical trainings gave two
    adapter_config.json files, so two lora versions); here sorted. The base's embeddings are never resized (the
    extra rows live in the projector): save_embedding_layers False, else peft's "auto" looks for the base's
    config.json at the adapter's bundle-relative base path, then on the Hub."""
    model.save_pretrained(directory, save_embedding_layers=False)
    sets = [name for name, value in vars(model.peft_config["default"]).items() if isinstance(value, set)]
    path = Path(directory) / "adapter_config.json"
    record = json.loads(path.read_text())
    for name in sets:
        record[name] = sorted(record[name])
    path.write_text(json.dumps(record, indent=2, sort_keys=True))  # as peft writes it


def latest_checkpoint(root: Path, run_fingerprint: str):
    """(path, state) of the newest complete checkpoint in `root` written by a run with these inputs, or None."""
    import torch

    for path in sorted(root.glob("step-*"), reverse=True):
        if not (path / "trainer_state.pt").is_file():
            continue
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        if state.get("fingerprint") == run_fingerprint:
            return path, state
    return None


def restore(path: Path, state: dict, model, optimizer, scheduler) -> None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # checkpoints of runs on cuda
        torch.cuda.set_rng_state(state["cuda_rng"])


# -- the step -------------------------------------------------------------------------------------

def _run_fingerprint(bundle: Bundle, config: FinetuneConfig) -> str:
    """What the adapter depends on. Not: where a run stops or resumes (`stop_after`, `save_every`), its threads,
    nor how many validation examples an evaluation scores when there is none (`eval_every` 0); a change of
    these keeps the checkpoints and the finished adapter. A run finished or begun under the earlier fingerprint
    (which held `save_every` and `valid_examples`) keeps it, so this change retrains nothing and drops no
    checkpoint."""
    unused = ("stop_after", "threads", "save_every") + (() if config.eval_every else ("valid_examples",))
    current = _fingerprint(bundle, config, unused)
    earlier = _fingerprint(bundle, config, ("stop_after", "threads"))
    recorded = bundle.manifest.steps.get("finetune", {}).get("fingerprint")
    # which run the bundle holds is in the manifest and in the checkpoint folder's name; whether its adapter or
    # checkpoint is intact, run() and train() check once, under the fingerprint returned here
    if earlier != current and (recorded == earlier or any(run_checkpoints(bundle.root, earlier).glob("step-*"))):
        return earlier
    return current


def _fingerprint(bundle: Bundle, config: FinetuneConfig, unused: tuple[str, ...]) -> str:
    settings = fingerprint_record(config, bundle, *unused)
    return fingerprint("finetune", VERSION, settings, bundle.version("llm_base"), bundle.version("sft_data"))


def make_extra_rows(bundle: Bundle, meta: dict, model, tokenizer):
    """The ranker's extra vocabulary rows (palr.hybrid.extra_rows): the frozen SASRec item embeddings of the
    checkpoint sft-data built the prompts against (`meta["item_tokens"]["table"]`) through a projector, the
    trend rows and each ranking's rank rows (initialised from the digit tokens " 0", " 1", ...), the score row and
    the trend and rank biases."""
    from palr.hybrid import extra_rows
    from palr.ranking import RANK_BUCKETS
    from palr.sasrec import SASRec

    tokens = meta["item_tokens"]
    buckets, rank_rows = int(tokens.get("trend_buckets") or 0), int(tokens.get("rank_rows") or 0)
    embedding = model.get_input_embeddings().weight.detach()
    digit = lambda b: tokenizer.encode(f" {b}", add_special_tokens=False)[-1]  # noqa: E731
    trend_init = embedding[[digit(b) for b in range(buckets)]] if buckets else None
    rank_init = embedding[[digit(r % RANK_BUCKETS) for r in range(rank_rows)]] if rank_rows else None
    table = SASRec.load(bundle.path(tokens["table"])).item_emb.weight
    return extra_rows(table, embedding.shape[1], buckets, trend_init, rank_rows, rank_init)


def check_item_table(bundle: Bundle, tokens: dict) -> None:
    """The SASRec checkpoint the soft tokens carry must be the one sft-data built the prompts (and drew the
    candidates) with: a SASRec retrained since would train the projector on other embeddings than the examples
    were made for, and projector.json would record the new version as if nothing had changed."""
    recorded, current = tokens.get("table_version"), bundle.version(tokens["table"])
    if recorded and recorded != current:
        raise BundleError(f"{tokens['table']} is version {current}, but llm/sft was built against {recorded}: "
                          f"re-run compile sft-data (SASRec changed since)")


def projector_settings(bundle: Bundle, meta: dict) -> dict:
    tokens = meta["item_tokens"]
    return {"table": tokens["table"], "table_version": bundle.version(tokens["table"]), "offset": tokens["offset"],
            "rows": tokens["rows"], "trend_buckets": tokens.get("trend_buckets", 0),
            "rank_rows": tokens.get("rank_rows", 0),
            "score_token": tokens.get("score_token"), "prompt": meta["prompt"]["prompt"]}


def train(bundle: Bundle, config: FinetuneConfig, run_fp: str) -> dict:
    """Trains (or resumes) and writes the chosen adapter (and item projector) to llm/lora/; returns the
    training record."""
    import torch
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from palr.hybrid import WEIGHTS, save_projector

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    sft = bundle.path("sft_data")
    meta = json.loads((sft / "meta.json").read_text())
    examples = load_rows(sft / "train.jsonl", config.max_tokens, config.loss)
    valid = [x for x in read_jsonl(sft / "valid.jsonl")][: config.valid_examples] if config.eval_every else []
    if config.retrieval_trend and meta.get("trend"):
        examples, valid = with_retrieval_prior(read_jsonl(sft / "train.jsonl"), int(meta["trend"]["buckets"]),
                                               examples, valid)
    tokenizer = AutoTokenizer.from_pretrained(bundle.path("llm_base"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = config.max_steps or max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
    model = lora_model(bundle.path("llm_base"), config, bundle.artifact("llm_base")["path"])
    model.train()
    extra = make_extra_rows(bundle, meta, model, tokenizer).to(config.device).train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr},
              {"params": list(extra.net.parameters()), "lr": config.projector_lr},
              {"params": [extra.score, extra.trend, extra.trend_bias, extra.rank, extra.rank_bias],
               "lr": config.head_lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, steps // 4), steps)

    checkpoints = run_checkpoints(bundle.root, run_fp)
    record = {"fingerprint": run_fp, "steps": steps, "examples": len(examples), "batch_size": config.batch_size,
              "loss": config.loss,
              "layers": model.config.get_text_config().num_hidden_layers,
              "fusion_in_loss": config.fusion_in_loss, "prompt": meta["prompt"]["prompt"],
              "readout": meta["prompt"].get("readout", "label"), "losses": [],
              "valid_ndcg@10": {}, "best_step": None, "seconds": 0.0}
    start = 0
    if not config.force and (found := latest_checkpoint(checkpoints, run_fp)):
        path, state = found
        restore(path, state, model, optimizer, scheduler)
        from safetensors.torch import load_file

        extra.load_state_dict(load_file(str(path / WEIGHTS)))
        start, record = state["step"], state["record"]
        log.info("resuming from %s (step %d of %d)", path, start, steps)
    else:  # a fresh start (no checkpoint of these inputs, or --force): this run's folder only. Another run's stay
        shutil.rmtree(checkpoints, ignore_errors=True)  # (a run trained in pieces, paused to try other options,
        log_other_runs(bundle.root, checkpoints)  # resumes when rerun with its own; they were all deleted)
    settings = projector_settings(bundle, meta)

    def save_extras(directory: Path) -> None:
        save_projector(directory, extra, settings)

    def save_adapter(directory: Path) -> None:
        save_lora(model, directory)
        save_extras(directory)

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoints, step, model, optimizer, scheduler,
                        {"step": step, "record": record, "fingerprint": run_fp}, save_extras)

    end = min(steps, start + config.stop_after) if config.stop_after else steps
    began = time.perf_counter()
    progress = tqdm(range(start, end), initial=start, total=steps, desc="finetune", unit="step")
    for step in progress:
        rows = [examples[i] for i in batch_indices(len(examples), config.batch_size, step, config.seed)]
        loss = batch_loss(model, rows, config, pad_id, extra)
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record["losses"].append(round(loss.item(), 5))
        progress.set_postfix(loss=f"{record['losses'][-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if config.eval_every and (done % config.eval_every == 0 or done == steps):
            score = validation_ndcg(model, valid, pad_id, extra)
            record["valid_ndcg@10"][str(done)] = score
            log.info("step %d: loss %.4f, validation NDCG@10 (LLM alone, %d users) %.4f", done,
                     record["losses"][-1], len(valid), score)
            if record["best_step"] is None or score > record["valid_ndcg@10"][str(record["best_step"])]:
                record["best_step"] = done
                save_best(checkpoints, done, save_adapter)
        if (config.save_every and done % config.save_every == 0) or done == end:
            record["seconds"] += time.perf_counter() - began
            began = time.perf_counter()
            checkpoint(done)
            forget_bests(checkpoints, record["best_step"])
    progress.close()
    if end < steps:
        log.info("stopped after step %d of %d as asked (--stop-after); rerun to continue", end, steps)
        return record

    out = bundle.root / LORA_DIR
    shutil.rmtree(out, ignore_errors=True)
    if record["best_step"] is not None:
        shutil.copytree(best_adapter(checkpoints, record["best_step"]), out)
    else:
        record["best_step"] = steps
        save_adapter(out)
    timeless = {name: value for name, value in record.items() if name != "seconds"}  # the step record keeps the time
    (out / "training.json").write_text(json.dumps(timeless, indent=1) + "\n")  # same run, same bytes, same version
    first, last = record["losses"][:10], record["losses"][-10:]
    log.info("trained %d steps (%s loss%s) in %.0f s; loss %.3f (first 10) → %.3f (last 10); kept step %d → %s",
             steps, config.loss, f", {record['prompt']} prompts, {record['readout']} readout", record["seconds"],
             sum(first) / len(first), sum(last) / len(last), record["best_step"], out)
    return record


def run(config: FinetuneConfig) -> Path | None:
    bundle = Bundle.open(config.bundle)
    run_fp = _run_fingerprint(bundle, config)
    out = bundle.root / LORA_DIR
    if not config.force and bundle.step_is_current("finetune", run_fp, ["lora"]):
        log.info("LoRA adapter is current (%s); skipping", out)
        return out
    check_sft_data(bundle, "finetune")
    check_device(config.device)
    tokens = json.loads((bundle.path("sft_data") / "meta.json").read_text()).get("item_tokens")
    if tokens:  # before the earlier adapter is set aside and the model loads
        check_item_table(bundle, tokens)
    finished = finished_run(out, run_fp)
    if finished is not None and not config.force:  # this run's adapter, set aside while another run was tried
        log.info("the LoRA adapter in %s is this run's, finished (step %d): the bundle's again", out,
                 finished["best_step"])
        return keep_adapter(bundle, config, run_fp, finished, 0.0)
    if bundle.has("lora"):  # an earlier run's adapter: merge would take it for this run's (its inputs may match)
        bundle.remove_artifact("lora")  # until this run finishes; stopped, killed or crashed alike
        bundle.save()
        log.info("the bundle names no LoRA adapter until this run finishes (merge refuses the earlier one, %s)", out)
    started = time.perf_counter()
    with reproducible():
        record = train(bundle, config, run_fp)
    if not (out / "training.json").is_file() or len(record["losses"]) < record["steps"]:
        return None
    return keep_adapter(bundle, config, run_fp, record, time.perf_counter() - started)


def check_device(device: str) -> None:
    """Refuses a device this torch cannot train on, before the bundle's adapter is set aside for the run."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise StepFailed(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; train with --device cpu "
                         f"or on the GPU machine")


@contextlib.contextmanager
def reproducible():
    """Deterministic torch kernels while training: without them two runs on the same data and seed drifted apart
    from step 4 on this CPU (some kernel's parallel accumulation; which one was not traced), and a flat validation
    curve then fit fusion weight 1000 in one build and 2 in the next. Same speed here (1.4-1.6 s a quick step either
    way); on CUDA an op without a deterministic kernel warns instead of failing."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def finished_run(out: Path, run_fp: str) -> dict | None:
    """The training record in `out` when it is a finished run with this fingerprint (its adapter beside it)."""
    try:
        record = json.loads((out / "training.json").read_text())
    except (OSError, ValueError):
        return None
    done = record.get("fingerprint") == run_fp and len(record.get("losses", [])) >= record.get("steps", 1)
    return record if done else None


def keep_adapter(bundle: Bundle, config: FinetuneConfig, run_fp: str, record: dict, seconds: float) -> Path:
    """Names the finished adapter in `llm/lora` the bundle's, with what it was trained on (merge checks them)."""
    bundle.add_artifact("lora", LORA_DIR, steps=record["steps"], best_step=record["best_step"],
                        rank=config.rank, alpha=config.alpha, target_modules=list(config.target_modules),
                        top_layers=config.top_layers, layers=config.layers, loss=config.loss,
                        fusion_in_loss=config.fusion_in_loss, sft_data=bundle.version("sft_data"),
                        llm_base=bundle.version("llm_base"))
    bundle.record_step("finetune", run_fp, seconds, config=config_record(config),
                       train_seconds=round(record.get("seconds", 0.0), 1))
    bundle.save()
    return bundle.root / LORA_DIR
