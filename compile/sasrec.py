"""`compile sasrec`: train SASRec on the training split and write the retrieval half of a bundle.

Training follows the SASRec paper: each user's training sequence is one sample and the
cross-entropy over the full catalog is taken at every position (the item after each prefix),
instead of expanding every prefix into its own sample. Sequences longer than max_len are cut
into windows of max_len + 1 items, so every training target is used: the most recent window ends
at the sequence end, and the grid of earlier windows moves by a random offset every epoch, so
targets are seen with varying amounts of context. The checkpoint with the best validation
NDCG@10 (full ranking, training items masked) is kept.

Writes catalog.json, users.json (train + valid history per user), models/sasrec.pt, then
exports sasrec.onnx (the export-onnx step). Skips itself when the data and options are unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from compile import export_onnx
from palr.sasrec import PAD, SASRec, SASRecArch, mask_items
from palr import metrics
from palr.bundle import Bundle, fingerprint, write_atomically
from palr.cli import check_bounds
from palr.corpus import Corpus

log = logging.getLogger(__name__)

STEP = "sasrec"
OUTPUTS = ["catalog", "users", "sasrec_torch"]
# How the model was optimised (beside its architecture, SASRecArch): recorded with the checkpoint, so the held-out
# SASRec (compile/holdout.py) trains as this one did.
TRAINING_OPTIONS = ("batch_size", "lr", "weight_decay", "window_stride", "random_windows", "seed")
VERSION = 2  # bump when training code changes what a given config produces


@dataclass
class SASRecConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory to write into"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory (RecBole atomic files)"})
    max_len: int = field(default=50, metadata={"help": "most recent items the model sees"})
    hidden: int = field(default=64, metadata={"help": "embedding and hidden size"})
    blocks: int = field(default=2, metadata={"help": "transformer blocks"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    ffn_hidden: int = field(default=256, metadata={"help": "feed-forward inner size"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on embeddings, attention and sublayer outputs"})
    activation: str = field(default="gelu", metadata={"help": "feed-forward activation", "choices": ["gelu", "relu"]})
    norm: str = field(default="pre", metadata={"help": "LayerNorm placement: pre (before sublayers) or post (after)",
                                               "choices": ["pre", "post"]})
    window_stride: int = field(default=0, metadata={
        "help": "items between the ends of consecutive training windows of a long sequence; 0 = max_len "
                "(windows do not overlap, every target once)"})
    random_windows: bool = field(default=True, metadata={
        "help": "shift the window grid of long sequences by a random offset every epoch (the most recent "
                "window always ends at the sequence end), so targets are seen with varying context"})
    epochs: int = field(default=200, metadata={"help": "maximum training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps in all (0 = no limit; "
                                                        "the tiny preset's few-step model for tests)"})
    batch_size: int = field(default=64, metadata={"help": "training sequences (windows) per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam L2 penalty"})
    patience: int = field(default=10, metadata={"help": "stop after this many evaluations without a better valid NDCG@10"})
    eval_every: int = field(default=1, metadata={"help": "epochs between validation evaluations"})
    seed: int = field(default=0, metadata={"help": "random seed (init, shuffling, dropout)"})
    threads: int = field(default=0, metadata={
        "help": "torch threads for training (0 = torch's default, one per core); on a machine shared with "
                "other jobs, 1 is often several times faster than oversubscribed cores"})
    top_k: int = field(default=100, metadata={"help": "candidates the exported ONNX model returns"})

    def __post_init__(self) -> None:
        check_bounds(self, at_least_1=("epochs", "batch_size", "eval_every", "patience", "max_len", "top_k", "hidden",
                                       "blocks", "heads", "ffn_hidden"),
                     at_least_0=("max_steps", "window_stride", "threads"), positive=("lr",),
                     non_negative=("weight_decay",), fractions=("dropout",))
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")


# -- data ------------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], length: int) -> np.ndarray:
    """The last `length` items of each row, left-padded with 0 → int64 [len(rows), length]."""
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        tail = row[-length:]
        if tail:
            out[i, length - len(tail):] = tail
    return out


def window_ends(length: int, max_len: int, stride: int, shift: int) -> list[int]:
    """Where the training windows of a sequence end (exclusive): at the sequence end, then `shift`
    items earlier, then every `stride` items, until a window reaches the sequence start."""
    ends, end = [], length
    while end >= 2:
        ends.append(end)
        if end - max_len - 1 <= 0:
            break
        end -= shift if len(ends) == 1 else stride
    return ends


def training_windows(sequences: list[list[int]], max_len: int, stride: int,
                     rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Input/target windows covering every (prefix → next item) pair of every sequence.

    A window is max_len + 1 consecutive items: input = the first max_len, target = the last max_len
    (the next item at each position). The most recent window ends at the sequence end; with `rng`,
    the grid of earlier windows is shifted by a random 1..stride items per sequence, so targets
    are seen with different context lengths from epoch to epoch. Returns int64 [W, max_len] twice,
    left-padded with 0 (padding targets are ignored by the loss).
    """
    if not 0 < stride <= max_len:
        raise ValueError(f"window stride must be in 1..max_len ({max_len}), got {stride}")
    inputs, targets = [], []
    for seq in sequences:
        shift = int(rng.integers(1, stride + 1)) if rng is not None else stride
        for end in window_ends(len(seq), max_len, stride, shift):
            chunk = seq[max(0, end - max_len - 1):end]
            inputs.append(chunk[:-1])
            targets.append(chunk[1:])
    return left_pad(inputs, max_len), left_pad(targets, max_len)


@dataclass
class EncodedSplit:
    """What training sees of the split, as catalog indices, users in a fixed order (no test items)."""

    users: list[str]
    train: list[list[int]]
    valid: list[int]

    @classmethod
    def build(cls, corpus: Corpus) -> "EncodedSplit":
        split, catalog = corpus.split, corpus.catalog
        users = sorted(split.train)
        return cls(users, [catalog.indices(split.train[u]) for u in users], [catalog.index(split.valid[u]) for u in users])


# -- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def target_ranks(model: SASRec, histories: list[list[int]], targets: list[int], batch_size: int = 512) -> list[int | None]:
    """0-based rank of each target among all items, the history's items masked (None: target masked)."""
    model.eval()
    ranks: list[int | None] = []
    for start in range(0, len(histories), batch_size):
        rows = histories[start:start + batch_size]
        history = torch.from_numpy(left_pad(rows, model.arch.max_len))  # [B, T]
        exclude = torch.from_numpy(left_pad(rows, max(len(r) for r in rows)))  # [B, E]
        scores = mask_items(model.next_item_scores(history), exclude)  # [B, N]
        target = torch.tensor(targets[start:start + batch_size])[:, None]  # [B, 1]
        target_score = scores.gather(1, target)  # [B, 1]
        above = (scores > target_score).sum(dim=1)  # [B]
        ranks += [None if not torch.isfinite(s) else int(r) for s, r in zip(target_score[:, 0], above)]
    return ranks


def validation_metrics(model: SASRec, data: EncodedSplit) -> dict[str, float]:
    ranks = target_ranks(model, data.train, data.valid)
    return {"ndcg@10": metrics.ndcg(ranks, 10), "hr@10": metrics.hit_rate(ranks, 10)}


# -- training ----------------------------------------------------------------------------------------


def train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, inputs: np.ndarray, targets: np.ndarray,
                batch_size: int, rng: np.random.Generator, max_steps: int = 0) -> tuple[float, int]:
    """One pass over the windows in random order (at most max_steps batches if > 0);
    returns (mean loss per target, steps taken)."""
    model.train()
    total, count = 0.0, 0
    batches = np.array_split(rng.permutation(len(inputs)), max(1, round(len(inputs) / batch_size)))
    for batch in batches[:max_steps or None]:
        # Columns that are padding in every row are dropped: positions count back from the most
        # recent item, so this changes nothing but the work done.
        first = int((inputs[batch] != PAD).any(axis=0).argmax())
        history = torch.from_numpy(inputs[batch, first:])  # [B, T']
        target = torch.from_numpy(targets[batch, first:])  # [B, T']
        real = target != PAD  # [B, T]
        logits = model.scores(model(history)[real])  # [P, N]
        logits[:, PAD] = float("-inf")
        loss = F.cross_entropy(logits, target[real])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * int(real.sum())
        count += int(real.sum())
    return total / count, len(batches[:max_steps or None])


def train(config: SASRecConfig, data: EncodedSplit, num_indices: int) -> tuple[SASRec, dict]:
    """Trains with early stopping on valid NDCG@10; returns the best model and its record."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    arch = SASRecArch(num_indices=num_indices, max_len=config.max_len, hidden=config.hidden, blocks=config.blocks,
                      heads=config.heads, ffn_hidden=config.ffn_hidden, dropout=config.dropout,
                      activation=config.activation, norm=config.norm)
    model = SASRec(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stride = config.window_stride or config.max_len
    inputs, targets = training_windows(data.train, config.max_len, stride)
    log.info("training on %d windows (%d targets) from %d users; %d parameters", len(inputs),
             int((targets != PAD).sum()), len(data.users), sum(p.numel() for p in model.parameters()))
    best = {"epoch": 0, "valid": {"ndcg@10": -1.0}}
    best_state, stale, steps = copy.deepcopy(model.state_dict()), 0, 0
    with logging_redirect_tqdm(), tqdm(range(1, config.epochs + 1), desc="sasrec", unit="epoch") as bar:
        for epoch in bar:
            started = time.perf_counter()
            steps_left = config.max_steps - steps if config.max_steps else 0
            if config.random_windows:
                inputs, targets = training_windows(data.train, config.max_len, stride, rng)
            loss, taken = train_epoch(model, optimizer, inputs, targets, config.batch_size, rng, steps_left)
            steps += taken
            last = epoch == config.epochs or steps == config.max_steps
            if epoch % config.eval_every and not last:
                continue
            valid = validation_metrics(model, data)
            improved = valid["ndcg@10"] > best["valid"]["ndcg@10"]
            log.info("epoch %d: loss %.4f, valid ndcg@10 %.4f hr@10 %.4f, %.1fs%s", epoch, loss, valid["ndcg@10"],
                     valid["hr@10"], time.perf_counter() - started, " (best)" if improved else "")
            bar.set_postfix(loss=f"{loss:.3f}", ndcg10=f"{valid['ndcg@10']:.4f}")
            if improved:
                best, best_state, stale = {"epoch": epoch, "loss": loss, "valid": valid}, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("early stop at epoch %d: no better valid ndcg@10 for %d evaluations", epoch, stale)
                    break
            if last:
                break
    model.load_state_dict(best_state)
    log.info("best epoch %d: valid ndcg@10 %.4f hr@10 %.4f", best["epoch"], best["valid"]["ndcg@10"],
             best["valid"]["hr@10"])
    return model.eval(), best


# -- the step ----------------------------------------------------------------------------------------


def training_fingerprint(config: SASRecConfig, corpus: Corpus) -> str:
    """What the trained model depends on: options (not paths or export settings) and the data."""
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("bundle", "data", "top_k", "threads")}
    return fingerprint(STEP, VERSION, options, corpus.files.checksum(), corpus.split.checksum())


def write_data_artifacts(bundle: Bundle, corpus: Corpus) -> None:
    """catalog.json and users.json: what the servers need besides the model."""
    corpus.catalog.save(bundle.root / "catalog.json")
    bundle.add_artifact("catalog", "catalog.json", items=len(corpus.catalog))
    users = {u: {"history": corpus.split.test_history(u)} for u in sorted(corpus.split.train)}
    write_atomically(bundle.root / "users.json", json.dumps({"users": users}))
    bundle.add_artifact("users", "users.json", users=len(users), history="train + valid items, oldest first")


def training_record(config: SASRecConfig) -> dict:
    return {name: getattr(config, name) for name in TRAINING_OPTIONS}


def run(config: SASRecConfig) -> None:
    corpus = Corpus.load(config.data)
    bundle = Bundle.open_or_create(config.bundle)
    step_fp = training_fingerprint(config, corpus)
    if bundle.step_is_current(STEP, step_fp, OUTPUTS):
        log.info("sasrec: skipped, data and options unchanged since %s", bundle.manifest.steps[STEP]["finished_at"])
        record = bundle.artifact("sasrec_torch")
        if "training" not in record:  # made before options were recorded: current means these options trained it
            record["training"] = training_record(config)
            bundle.save()
    else:
        started = time.perf_counter()
        data = EncodedSplit.build(corpus)
        model, best = train(config, data, corpus.catalog.num_indices)
        bundle.manifest.dataset = corpus.dataset_info()
        write_data_artifacts(bundle, corpus)
        (bundle.root / "models").mkdir(exist_ok=True)
        model.save(bundle.root / "models" / "sasrec.pt", best_epoch=best["epoch"], valid=best["valid"])
        bundle.add_artifact("sasrec_torch", "models/sasrec.pt", **dataclasses.asdict(model.arch),
                            best_epoch=best["epoch"], valid=best["valid"],
                            training=training_record(config))
        seconds = time.perf_counter() - started
        bundle.record_step(STEP, step_fp, seconds, best_epoch=best["epoch"], valid=best["valid"])
        bundle.save()
        log.info("sasrec: trained in %.1fs, wrote %s", seconds, ", ".join(bundle.path(n).name for n in OUTPUTS))
    export_onnx.run(export_onnx.ExportConfig(bundle=config.bundle, top_k=config.top_k))
