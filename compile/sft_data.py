"""`compile sft-data`: PALR instruction-tuning examples from the TRAIN split, and a validation file.

    train.jsonl  from each user's training items only (no valid or test item as history or target):
      Recommend_Retrieval  history prefix + a SASRec's top-K for that prefix (order shuffled) → the
                           true item's label and title. --negatives holdout (the default): a SASRec
                           trained without each user's last --holdout-items training items ranks
                           those positions, and only examples whose target it retrieved are kept
                           (compile/holdout.py); --negatives sasrec: the bundle's SASRec on sampled
                           training prefixes, the true item put in when missing
      Recommend            history prefix → the titles of the next items (--recommend-per-user,
                           0 by default)
    valid.jsonl  one Recommend_Retrieval example per sampled user from the valid split: history =
                 training items, candidates = SASRec's top-K in retrieval order with its scores, the
                 valid item as target (absent when not retrieved, as at test time). For model
                 selection and for fitting the fusion weight. The candidates are what serving (and
                 `evaluate-ranking --split valid`) retrieves for that history: only the history is
                 excluded. Masking the user's test item too would choose the fusion weight on lists
                 that know the test label (it moved the quick bundle's weight from 0.75 to 5).

Each candidate line ends with the candidate's trend token (palr/trends.py: its interactions in the 30
days before the example's moment, the time of its history's last item), and score mode reads the
score row at that token (`--readout candidate`): examples store the readout positions and the buckets.

Training candidates never include the user's later training items (negatives are items the user did not
interact with up to the training split's end, as a model trained at that moment would know them), but may
include the user's valid and test items: a model trained before those interactions could not leave them out,
and leaving them out would shield exactly the items the evaluation asks for from ever being a negative.
Every example stores item ids (for the leakage test) and the exact token ids `palr.prompt` built
(what finetune trains on); `meta.json` keeps the prompt settings that serving must reuse.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from compile.llm_common import config_record, fingerprint_record
from compile.profiles import ProfilesConfig, profiler
from palr.bundle import Bundle, BundleError, fingerprint, write_atomically
from palr.catalog import Catalog
from palr.collab import CollabTable
from palr.corpus import Corpus
from palr.profiles import VERSION as PROFILES_VERSION, Profiles
from palr.prompt import READOUTS, RECOMMEND, RETRIEVAL, PalrPrompt, PromptSettings, Readout
from palr.ranking import RANK_BUCKETS, RANKINGS, candidate_ranks
from palr.trends import TrendSettings, TrendTable

log = logging.getLogger(__name__)

SFT_DIR = "llm/sft"
VERSION = 9  # 3: held-out SASRec negatives, hybrid prompts, retrieval scores; 4: trend tokens, candidate readout;
# 5: validation candidates exactly as serving retrieves them (history masked, not the test item); 6: EASE scores
# 7: rank tokens; 8: tied candidates share their best rank bucket (palr.ranking.rank_buckets), as serving now shows them
# 9: training candidates no longer leave out the user's valid and test items (only history and later training items)


@dataclass
class SftDataConfig(PromptSettings):
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory"})
    data: Path = field(default=Path("data/ml-100k"), metadata={"help": "dataset directory the bundle was built from"})
    candidates: int = field(default=20, metadata={"help": "K: SASRec candidates per Recommend_Retrieval prompt"})
    # the pipeline's choice (PromptSettings, the library, defaults to text): validation NDCG@10 fused 1.049x
    # retrieval with hybrid prompts vs 1.036x with text (300 users, 8-layer listwise ranker; docs/ranking.md)
    prompt: str = field(default="hybrid", metadata={
        "help": "how items appear: text (title), hybrid (title + a soft token carrying its SASRec embedding, "
                "RSLLM) or ids (the soft token alone); see palr/hybrid.py", "choices": ("text", "hybrid", "ids")})
    trend: bool = field(default=True, metadata={
        "help": "end each candidate line with its trend token (interactions in the --trend-window-days before the "
                "request, bucketed; palr/trends.py): the time signal SASRec lacks"})
    trend_window_days: float = field(default=30.0, metadata={"help": "trend tokens: the counting window"})
    trend_buckets: int = field(default=8, metadata={"help": "trend tokens: buckets 0, 1, 2-3, 4-7, ... (the last open)"})
    collab: bool = field(default=True, metadata={
        "help": "store each candidate's EASE score (palr/collab.py) in the examples, for the retrieval term merge "
                "fits: training examples scored by a table fit without the held-out items (holdout negatives "
                "only), validation ones by a table fit on training items; needs `compile collab`"})
    rank_tokens: list[str] = field(default_factory=lambda: ["collab", "retrieval"], metadata={
        "help": "after the trend token, one token per named ranking (collab: the candidates' EASE scores, "
                "retrieval: SASRec's): the candidate's rank bucket among the candidates under it "
                "(palr.ranking.rank_buckets); needs --negatives holdout (and --collab for collab); the option "
                "alone: none", "nargs": "*"})
    readout: str = field(default="candidate", metadata={
        "help": "what score mode reads: candidate (a score row at each candidate's last token: no label-letter "
                "position bias) or label (each label's logit after the prompt)", "choices": READOUTS})
    negatives: str = field(default="holdout", metadata={
        "help": "where training candidates come from: holdout (a SASRec trained without each user's last "
                "--holdout-items training items ranks those positions as the served one ranks test users; only "
                "examples whose target it retrieved, in its top-K; see compile/holdout.py) or sasrec (the bundle's "
                "SASRec on training prefixes it was trained on, the target put in when missing)",
        "choices": ("holdout", "sasrec")})
    holdout_items: int = field(default=16, metadata={
        "help": "holdout: training items held out per user, at most (each one a cut point; a user keeps at least "
                "2 training items; 16: ~5,800 examples on ML-100k, 8: ~2,700; docs/results.md measures both)"})
    holdout_epochs: int = field(default=0, metadata={
        "help": "holdout: epochs of the held-out SASRec (0 = the bundle SASRec's best epoch)"})
    threads: int = field(default=0, metadata={"help": "torch threads for the held-out SASRec (0 = torch's default)"})
    retrieval_per_user: int = field(default=2, metadata={
        "help": "sasrec negatives: Recommend_Retrieval examples per user (sampled cut points)"})
    orders_per_example: int = field(default=1, metadata={
        "help": "shuffled candidate orders per Recommend_Retrieval example (order augmentation)"})
    recommend_per_user: int = field(default=0, metadata={"help": "Recommend examples per user"})
    recommend_next: int = field(default=3, metadata={"help": "titles in a Recommend answer"})
    min_history: int = field(default=5, metadata={
        "help": "sasrec negatives and Recommend examples: shortest history prefix of an example (holdout cuts "
                "are every held-out position: see --holdout-items)"})
    recent_window: int = field(default=20, metadata={
        "help": "sasrec negatives and Recommend examples: they predict one of each user's last N training items "
                "(closest to test time)"})
    users: int = field(default=0, metadata={"help": "use only N randomly chosen users (0 = all)"})
    valid_users: int = field(default=0, metadata={
        "help": "users in valid.jsonl (0 = all 943: the fusion weight fit on them has flat curves, so fewer users "
                "make its choice noisy)"})
    seed: int = field(default=0, metadata={"help": "random seed (users, cut points, candidate orders)"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})

    def prompt_settings(self) -> PromptSettings:
        return PromptSettings.from_dict(self.to_dict())

    def trend_settings(self) -> TrendSettings:
        return TrendSettings(self.trend_window_days, self.trend_buckets)


@dataclass
class Cut:
    """One example before prompting: a user's history prefix and what follows it."""

    user: str
    history: list[str]  # item ids, oldest first
    target: str  # the next item
    following: list[str]  # the user's training items after the target
    moment: float = 0.0  # when the history ends (its last interaction): what trends are counted before


def training_cuts(corpus: Corpus, users: list[str], per_user: int, config: SftDataConfig,
                  rng: random.Random) -> list[Cut]:
    """Cut points inside each user's TRAINING items only."""
    cuts = []
    for user in users:
        train = corpus.split.train[user]
        first = max(config.min_history, len(train) - config.recent_window, 1)
        points = list(range(first, len(train)))
        for t in sorted(rng.sample(points, min(per_user, len(points)))):
            cuts.append(Cut(user, train[:t], train[t], train[t + 1:], corpus.time_before(user, t)))
    return cuts


def retrieve(sasrec, catalog: Catalog, cuts: list[Cut], k: int) -> list[tuple[list[str], list[float]]]:
    """SASRec top-k (item ids, scores) for each cut, excluding its history and the user's later training items."""
    from palr.sasrec_onnx import Query

    queries = [Query(history=catalog.indices(c.history), exclude=catalog.indices(c.history + c.following), k=k)
               for c in cuts]
    out = []
    for start in range(0, len(queries), 256):
        for ranked in sasrec.retrieve(queries[start:start + 256]):
            out.append(([catalog.item(int(i)).id for i in ranked.indices], [float(s) for s in ranked.scores]))
    return out


@dataclass
class Trends:
    """Each candidate's trend bucket as of a cut's moment (None: trend tokens off)."""

    table: TrendTable | None
    settings: TrendSettings
    catalog: Catalog

    def __call__(self, cut: Cut, candidates: list[str]) -> list[int] | None:
        if self.table is None:
            return None
        return self.table.buckets(cut.moment, self.catalog.indices(candidates), self.settings)


@dataclass
class Collab:
    """Each candidate's EASE score from a cut's history (None: no table)."""

    table: CollabTable | None
    catalog: Catalog

    def __call__(self, cut: Cut, candidates: list[str]) -> list[float] | None:
        if self.table is None:
            return None
        return self.table.scores(self.catalog.indices(cut.history), self.catalog.indices(candidates))


def collab_tables(bundle: Bundle, corpus: Corpus, catalog: Catalog, config: SftDataConfig) -> tuple[Collab, Collab]:
    """The training examples' scorer (a table fit on each user's training items minus the held-out ones, as the
    held-out SASRec saw them: no example is scored by a table that knew its target) and the validation
    examples' (fit on every user's training items: no validation item), at the bundle table's l2."""
    from compile.collab import training_table

    none = Collab(None, catalog)
    if not config.collab:
        return none, none
    valid = Collab(training_table(bundle, corpus, catalog), catalog)
    if config.negatives != "holdout":
        log.warning("--collab: training examples carry no EASE score with --negatives %s (their targets are "
                    "training items every table has seen); merge then fits no collab weight", config.negatives)
        return none, valid
    return Collab(training_table(bundle, corpus, catalog, config.holdout_items), catalog), valid


def retrieval_examples(prompt: PalrPrompt, catalog: Catalog, cuts: list[Cut], retrieved, profiles: list[str],
                       orders: int, rng: random.Random, trends: Trends, collab: Collab) -> list[dict]:
    """Training Recommend_Retrieval: the target put in (replacing the last candidate) if missing, order shuffled."""
    examples = []
    for cut, (ids, _), profile in zip(cuts, retrieved, profiles):
        pool = ids if cut.target in ids else ids[:-1] + [cut.target]
        for _ in range(orders):
            candidates = rng.sample(pool, len(pool))
            examples.append(_retrieval_example(prompt, catalog, cut, candidates, None, profile, trends, collab))
    return examples


def holdout_cuts(corpus: Corpus, users: list[str], items: int) -> list[Cut]:
    """Every held-out position: each user's last `items` training items (fewer for a user with fewer:
    `compile.holdout.held_out_count`), each with its prefix."""
    from compile.holdout import held_out_count

    cuts = []
    for user in users:
        train = corpus.split.train[user]
        cuts += [Cut(user, train[:t], train[t], train[t + 1:], corpus.time_before(user, t))
                 for t in range(len(train) - held_out_count(len(train), items), len(train))]
    return cuts


def holdout_retrieve(model, catalog: Catalog, cuts: list[Cut], k: int) -> list[tuple[list[str], list[float]]]:
    """The held-out SASRec's top-k (item ids, scores) per cut, its history and later training items excluded."""
    from compile.holdout import top_k

    indices, scores = top_k(model, [catalog.indices(c.history) for c in cuts],
                            [catalog.indices(c.history + c.following) for c in cuts], k)
    return [([catalog.item(int(i)).id for i in row], [float(s) for s in row_scores])
            for row, row_scores in zip(indices, scores)]


def natural_examples(prompt: PalrPrompt, catalog: Catalog, cuts: list[Cut], retrieved, profiles: list[str],
                     orders: int, rng: random.Random, trends: Trends, collab: Collab) -> list[dict]:
    """Training Recommend_Retrieval from the held-out SASRec: only cuts whose target it retrieved, its
    candidates as they are (none put in: an inserted target would be the one the retriever scored lowest,
    which a ranker would learn), order shuffled with the retrieval scores kept alongside (for the fused loss)."""
    examples = []
    for cut, (ids, scores), profile in zip(cuts, retrieved, profiles):
        if cut.target not in ids:
            continue
        for _ in range(orders):
            order = rng.sample(range(len(ids)), len(ids))
            examples.append(_retrieval_example(prompt, catalog, cut, [ids[j] for j in order],
                                               [scores[j] for j in order], profile, trends, collab))
    return examples


def _retrieval_example(prompt: PalrPrompt, catalog: Catalog, cut: Cut, candidates: list[str],
                       scores: list[float] | None, profile: str, trends: Trends, collab: Collab) -> dict:
    position = candidates.index(cut.target) if cut.target in candidates else None
    buckets = trends(cut, candidates)
    collab_scores = collab(cut, candidates)
    ranks = candidate_ranks(prompt.settings.rank_tokens, scores, collab_scores)
    parts = prompt.retrieval(profile, [catalog.by_id(i) for i in cut.history], [catalog.by_id(i) for i in candidates],
                             buckets, ranks)
    candidate_readout = prompt.settings.readout == "candidate"
    return {
        "task": RETRIEVAL, "user": cut.user, "history": cut.history, "candidates": candidates,
        "retrieval_scores": scores, "target": cut.target, "target_position": position, "profile": profile,
        "moment": cut.moment, "trend": buckets, "collab": collab_scores, "ranks": ranks,
        "prefix_len": len(parts.prefix_ids), "input_ids": parts.input_ids, "label_token_ids": parts.label_token_ids,
        "readout_positions": list(parts.readout.positions) if candidate_readout else None,
        "readout_tokens": list(parts.readout.tokens) if candidate_readout else None,
        "answer_ids": prompt.retrieval_answer(parts, position) if position is not None else [],
    }


def candidate_readout(row: dict) -> Readout | None:
    """The candidate readout a retrieval example was built with (None: a label-readout ranker's example)."""
    if not row.get("readout_positions"):
        return None
    return Readout(tuple(row["readout_positions"]), tuple(row["readout_tokens"]))


def example_readout(row: dict) -> Readout:
    """What score mode reads on a retrieval example: its candidate readout, else its labels after the prompt."""
    readout = candidate_readout(row)
    return readout if readout is not None else Readout.after_prompt(len(row["input_ids"]), row["label_token_ids"])


def recommend_examples(prompt: PalrPrompt, catalog: Catalog, cuts: list[Cut], profiles: list[str],
                       n_next: int) -> list[dict]:
    examples = []
    for cut, profile in zip(cuts, profiles):
        targets = ([cut.target] + cut.following)[:n_next]
        parts = prompt.recommend(profile, [catalog.by_id(i) for i in cut.history])
        examples.append({
            "task": RECOMMEND, "user": cut.user, "history": cut.history, "targets": targets, "profile": profile,
            "prefix_len": len(parts.prefix_ids), "input_ids": parts.input_ids,
            "answer_ids": prompt.recommend_answer([catalog.by_id(i) for i in targets]),
        })
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a bundle's example file; an empty or malformed one is a BundleError naming it (a step reading
    it cannot do anything useful, and an IndexError or a ZeroDivisionError further on would not say why)."""
    rows = []
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise BundleError(f"{path}, line {number}: not JSON ({e}); re-run the step that wrote it") from None
    if not rows:
        raise BundleError(f"{path}: no examples; re-run the step that wrote it (for llm/sft: compile sft-data --force)")
    return rows


def profile_source(bundle: Bundle, catalog: Catalog):
    """The profile method chosen by `compile profiles`, with its settings, for arbitrary histories."""
    chosen = Profiles.load(bundle.path("profiles"))
    return profiler(bundle, catalog, ProfilesConfig(bundle=bundle.root, method=chosen.method, **chosen.settings))


def item_table_artifact(config: SftDataConfig) -> str:
    """The SASRec checkpoint whose item embeddings hybrid prompts carry (and training candidates come from)."""
    return "sasrec_holdout" if config.negatives == "holdout" else "sasrec_torch"


def check_options(config: SftDataConfig) -> None:
    """Options that cannot work together, refused before any work: rank tokens need their scores in every example
    (SASRec's: held-out negatives keep them; EASE's), held-out negatives an item to hold out."""
    unknown = sorted(set(config.rank_tokens) - set(RANKINGS))
    if unknown:
        raise ValueError(f"--rank-tokens: unknown {unknown}; choose from {', '.join(RANKINGS)}")
    for flag, n in (("--users", config.users), ("--valid-users", config.valid_users)):
        if n < 0:  # read as "all" by the sampling below, silently
            raise ValueError(f"{flag} must be >= 0 (0: all), got {n}")
    if config.rank_tokens and config.negatives != "holdout":
        raise ValueError(f"--rank-tokens {' '.join(config.rank_tokens)} needs --negatives holdout (training "
                         f"examples with their retrieval scores and EASE scores); --rank-tokens alone for none")
    if "collab" in config.rank_tokens and not config.collab:
        raise ValueError("--rank-tokens collab needs --collab (the candidates' EASE scores)")
    if config.negatives == "holdout" and config.holdout_items < 1:
        raise ValueError(f"--holdout-items must be >= 1 with --negatives holdout (each held-out item is a cut point), "
                         f"got {config.holdout_items}")


def step_fingerprint(config: SftDataConfig, bundle: Bundle, inputs: list[str]) -> str:
    """What makes the step's output current: its options, its inputs' versions and the code that writes it, the
    held-out SASRec's and the profilers' included (it trains the one and runs the other on the cuts' histories)."""
    from compile import holdout, sasrec  # torch: imported when the step runs

    return fingerprint("sft-data", VERSION, holdout.VERSION, sasrec.VERSION, PROFILES_VERSION,
                       fingerprint_record(config, bundle, "threads"), [bundle.version(name) for name in inputs])


def run(config: SftDataConfig) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    from palr.hybrid import ItemTokens
    from palr.sasrec_onnx import SasrecOnnx

    bundle = Bundle.open(config.bundle)
    check_options(config)
    inputs = ["catalog", "users", "sasrec_onnx", "sasrec_torch", "profiles", "llm_base"] + \
        (["trends"] if config.trend else []) + (["collab"] if config.collab else [])
    step_fp = step_fingerprint(config, bundle, inputs)
    out = bundle.root / SFT_DIR
    if not config.force and bundle.step_is_current("sft-data", step_fp, ["sft_data"]):
        log.info("SFT data is current (%s); skipping", out)
        return out
    started = time.perf_counter()
    # changed since recorded: named, not an error from inside them (the base model: transformers says what it lacks)
    bundle.verify([name for name in inputs if name != "llm_base"])
    corpus = Corpus.load_for(bundle, config.data)
    catalog = Catalog.load(bundle.path("catalog"))
    vocab = AutoConfig.from_pretrained(bundle.path("llm_base")).get_text_config().vocab_size
    item_tokens = ItemTokens.for_catalog(vocab, [item.id for item in catalog.items],
                                         config.trend_buckets if config.trend else 0,
                                         RANK_BUCKETS * len(config.rank_tokens))
    prompt = PalrPrompt(AutoTokenizer.from_pretrained(bundle.path("llm_base")), config.prompt_settings(), item_tokens)
    prompt.label_token_ids(config.candidates)  # fails clearly now (not after the held-out SASRec's minutes)
    holdout = None
    if config.negatives == "holdout":
        from compile.holdout import train_holdout

        holdout = train_holdout(bundle, corpus, config.holdout_items, config.holdout_epochs, config.threads)
    trends = Trends(TrendTable.load(bundle.path("trends")) if config.trend else None, config.trend_settings(), catalog)
    train_collab, valid_collab = collab_tables(bundle, corpus, catalog, config)
    sasrec = SasrecOnnx.from_bundle(bundle)
    profile = profile_source(bundle, catalog)
    rng = random.Random(config.seed)

    users = sorted(corpus.split.train)
    users = sorted(rng.sample(users, config.users)) if 0 < config.users < len(users) else users
    if holdout is not None:
        cuts = holdout_cuts(corpus, users, config.holdout_items)
    else:
        cuts = training_cuts(corpus, users, config.retrieval_per_user, config, rng)
    rec_cuts = training_cuts(corpus, users, config.recommend_per_user, config, rng)
    profiles = profile([[catalog.by_id(i) for i in c.history] for c in cuts + rec_cuts], progress="profiles (train)")
    if holdout is not None:
        train = natural_examples(prompt, catalog, cuts, holdout_retrieve(holdout, catalog, cuts, config.candidates),
                                 profiles[:len(cuts)], config.orders_per_example, rng, trends, train_collab)
    else:
        train = retrieval_examples(prompt, catalog, cuts, retrieve(sasrec, catalog, cuts, config.candidates),
                                   profiles[:len(cuts)], config.orders_per_example, rng, trends, train_collab)
    retrieval_cuts = len(cuts)
    train += recommend_examples(prompt, catalog, rec_cuts, profiles[len(cuts):], config.recommend_next)
    rng.shuffle(train)

    valid_users = sorted(corpus.split.valid)
    if 0 < config.valid_users < len(valid_users):  # its own generator: the same users whatever the training options
        valid_users = sorted(random.Random(config.seed + 1).sample(valid_users, config.valid_users))
    valid_cuts = [Cut(u, corpus.split.train[u], corpus.split.valid[u], [],  # serving's mask: the history only
                      corpus.time_before(u, len(corpus.split.train[u]))) for u in valid_users]
    valid_profiles = profile([[catalog.by_id(i) for i in c.history] for c in valid_cuts], progress="profiles (valid)")
    valid = [_retrieval_example(prompt, catalog, cut, ids, scores, p, trends, valid_collab)
             for cut, (ids, scores), p in
             zip(valid_cuts, retrieve(sasrec, catalog, valid_cuts, config.candidates), valid_profiles)]

    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    lengths = sorted(len(x["input_ids"]) + len(x["answer_ids"]) for x in train)
    tasks = {task: sum(x["task"] == task for x in train) for task in (RETRIEVAL, RECOMMEND)}
    meta = {"prompt": prompt.settings.to_dict(), "candidates": config.candidates,
            "profile_method": Profiles.load(bundle.path("profiles")).method,
            "negatives": config.negatives, "retrieval_cuts": retrieval_cuts,
            "target_retrieved_rate": round(tasks[RETRIEVAL] / max(1, retrieval_cuts * config.orders_per_example), 4),
            "item_tokens": {**item_tokens.to_dict(), "table": item_table_artifact(config),
                            "table_version": bundle.version(item_table_artifact(config))},
            "trend": config.trend_settings().to_dict() if config.trend else None,
            "train_examples": len(train), "valid_examples": len(valid), "tasks": tasks,
            "train_tokens": sum(lengths), "median_tokens": lengths[len(lengths) // 2] if lengths else 0,
            "valid_target_retrieved": sum(x["target_position"] is not None for x in valid)}
    write_atomically(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    bundle.add_artifact("sft_data", SFT_DIR, **{k: v for k, v in meta.items() if k != "prompt"})
    bundle.record_step("sft-data", step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("SFT data (%s negatives, %s prompt): %d train examples (%s; %d of %d cuts had the target retrieved; "
             "%d tokens, median %d), %d valid (%d with the target retrieved) in %.1f s → %s", config.negatives,
             config.prompt, len(train), tasks, tasks[RETRIEVAL], retrieval_cuts, meta["train_tokens"],
             meta["median_tokens"], len(valid), meta["valid_target_retrieved"], time.perf_counter() - started, out)
    return out
