"""`compile profiles`: each user's profile keywords → `profiles.json` (see `palr/profiles.py`).

    --method stats   keywords from genre, year and popularity statistics (deterministic, instant)
    --method llm     the base LLM summarises the history into keywords (PALR). A history longer
                     than one block (--block-items titles) is summarised block by block and the
                     block summaries are folded together, again by the LLM, until one remains
                     (the hierarchical summarisation of LLM-TRSR), so any length fits the context.

Each user's profile comes from train + valid items (the history a test-time request sees; never
the test item). LLM summaries are cached by history in `profiles/llm_cache_<model and prompts>.json`, so `sft-data`
reuses them for its examples' own (shorter) histories and a rerun only computes what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compile.llm_common import config_record
from palr.bundle import Bundle, BundleError, fingerprint, write_atomically
from palr.catalog import Catalog, Item, natural_key
from palr.profiles import METHODS, VERSION, Profiles, StatsProfiler
from palr.prompt import chat_frame
from palr.users import load_histories

log = logging.getLogger(__name__)

PROFILES_FILE = "profiles.json"
CACHE_DIR = "profiles"

# The small model lists genres when asked for them and its reply is started for it ("Keywords:");
# asked for "a description of the taste" it writes chatty sentences instead (measured on SmolLM2-135M).
SUMMARISE = "Movies this person watched: {titles}\nWhich genres and themes does this person like? Answer with keywords."
FOLD = ("Keywords describing one person's movie taste at different times:\n{summaries}\n"
        "Which genres and themes does this person like overall? Answer with keywords.")
REPLY_START = "Keywords:"


@dataclass
class ProfilesConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (needs catalog, users, llm_base)"})
    method: str = field(default="stats", metadata={"help": "how profiles are made", "choices": METHODS})
    max_items: int = field(default=40, metadata={"help": "llm: most recent history items summarised"})
    block_items: int = field(default=20, metadata={"help": "llm: titles per summarisation block"})
    keywords: int = field(default=8, metadata={"help": "llm: at most this many keywords"})
    max_new_tokens: int = field(default=32, metadata={"help": "llm: tokens generated per summary"})
    batch_size: int = field(default=8, metadata={"help": "llm: prompts generated together (decode batches well)"})
    users: int = field(default=0, metadata={"help": "profile only the first N users (0 = all); for experiments"})
    force: bool = field(default=False, metadata={"help": "redo the step even if its inputs are unchanged"})

    def __post_init__(self) -> None:
        if self.block_items < 2:  # summaries are folded block_items at a time: 1 never gets down to one
            raise ValueError(f"--block-items must be >= 2, got {self.block_items}")
        for name in ("max_items", "keywords", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.users < 0:
            raise ValueError(f"--users must be >= 0 (0 = all), got {self.users}")


def _history_key(items: Sequence[Item], config: ProfilesConfig) -> str:
    ids = ",".join(item.id for item in items[-config.max_items:])
    settings = f"{config.block_items}|{config.keywords}|{config.max_new_tokens}"
    return hashlib.sha1(f"{settings}|{ids}".encode()).hexdigest()


def _clean_keywords(text: str, n: int) -> str:
    """First line of the reply, split on commas, de-duplicated, at most n keywords."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    words: list[str] = []
    for word in line.replace(";", ",").split(","):
        word = word.strip(" .*-\"'").strip()
        if word and word.lower() not in {w.lower() for w in words}:
            words.append(word)
    return ", ".join(words[:n])


class LlmSummariser:
    """Hierarchical keyword summaries of histories with a causal LM, batched, cached by history."""

    def __init__(self, model_dir: Path, config: ProfilesConfig, cache_path: Path):
        from palr.llm import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.config = config
        self.cache_path = cache_path
        self.cache: dict[str, str] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        self.stop_ids = [self.tokenizer.eos_token_id] + newline[-1:]
        self._head, self._tail = chat_frame(self.tokenizer, [])

    def _chat_ids(self, text: str) -> list[int]:
        """The chat prompt's ids for one user message. The message holds data (titles, summaries), so it is
        tokenized with special-token text split: "<|im_end|>" in a title is those characters, not the control
        token that would close the turn (as `palr.prompt.PalrPrompt.data_ids` does for the ranking prompt)."""
        encode = self.tokenizer.encode
        return (encode(self._head, add_special_tokens=False)
                + encode(text, add_special_tokens=False, split_special_tokens=True)
                + encode(self._tail + REPLY_START, add_special_tokens=False))

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy replies to user messages, `batch_size` at a time (left-padded)."""
        import torch

        replies = []
        for start in range(0, len(prompts), self.config.batch_size):
            ids = [self._chat_ids(p) for p in prompts[start:start + self.config.batch_size]]
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = self.model.generate(**batch, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                          eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, batch.input_ids.shape[1]:]  # [B, new tokens]
            replies += [_clean_keywords(t, self.config.keywords)
                        for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return replies

    def _summarise_blocks(self, histories: list[list[Item]]) -> list[str]:
        """Level 0: one summary per block of each history; then fold summaries until one per history."""
        size = self.config.block_items
        blocks = [[h[i:i + size] for i in range(0, len(h), size)] or [[]] for h in histories]
        prompts = [SUMMARISE.format(titles="; ".join(item.label for item in block))
                   for bs in blocks for block in bs]
        flat = iter(self._generate(prompts))
        levels = [[next(flat) for _ in bs] for bs in blocks]  # per history: its current summaries
        while any(len(summaries) > 1 for summaries in levels):
            groups = [[s[i:i + size] for i in range(0, len(s), size)] if len(s) > 1 else [] for s in levels]
            prompts = [FOLD.format(summaries="\n".join(f"{j + 1}. {x}" for j, x in enumerate(g)))
                       for gs in groups for g in gs]
            flat = iter(self._generate(prompts))
            levels = [[next(flat) for _ in gs] if gs else s for gs, s in zip(groups, levels)]
        return [s[0] for s in levels]

    def __call__(self, histories: Sequence[Sequence[Item]], progress: str = "profiles") -> list[str]:
        """One keyword string per history (its most recent `max_items` items)."""
        keys = [_history_key(h, self.config) for h in histories]
        todo = sorted({k: list(h[-self.config.max_items:]) for k, h in zip(keys, histories)
                       if k not in self.cache}.items())
        chunk = self.config.batch_size * 4
        for start in tqdm(range(0, len(todo), chunk), desc=progress, unit=f"x{chunk}", disable=not todo):
            part = todo[start:start + chunk]
            for (key, _), summary in zip(part, self._summarise_blocks([h for _, h in part])):
                self.cache[key] = summary
            self.save_cache()
        return [self.cache[k] for k in keys]

    def save_cache(self) -> None:
        write_atomically(self.cache_path, json.dumps(self.cache, ensure_ascii=False, indent=0, sort_keys=True))


def profiler(bundle: Bundle, catalog: Catalog, config: ProfilesConfig):
    """A callable: list of histories (Items) → list of keyword strings, for `config.method`."""
    if config.method == "stats":
        stats = StatsProfiler(catalog)
        return lambda histories, progress="profiles": [stats(h) for h in histories]
    return LlmSummariser(bundle.path("llm_base"), config, llm_cache_path(bundle))


def llm_cache_path(bundle: Bundle) -> Path:
    """The summaries' cache of the bundle's base model and these prompts: another model (`--base-model`) or
    another prompt text starts a cache of its own instead of reusing summaries it did not write."""
    key = fingerprint(bundle.version("llm_base"), SUMMARISE, FOLD, REPLY_START)[:12]
    return bundle.root / CACHE_DIR / f"llm_cache_{key}.json"


def method_settings(config: ProfilesConfig) -> dict:
    """What defines a profile besides the history: recorded in profiles.json for sft-data to reuse."""
    if config.method == "stats":
        return {}
    return {k: getattr(config, k) for k in ("max_items", "block_items", "keywords", "max_new_tokens")}


def run(config: ProfilesConfig) -> Path:
    bundle = Bundle.open(config.bundle)
    inputs = ["catalog", "users"] + (["llm_base"] if config.method == "llm" else [])
    step_fp = fingerprint("profiles", VERSION, config.method, method_settings(config), config.users,
                          [bundle.version(name) for name in inputs])  # VERSION: the profilers' code
    out = bundle.root / PROFILES_FILE
    if not config.force and bundle.step_is_current("profiles", step_fp, ["profiles"]):
        log.info("profiles are current (%s); skipping", out)
        return out
    started = time.perf_counter()
    bundle.verify(["catalog", "users"])  # changed since recorded: named, not a KeyError from inside them
    catalog = Catalog.load(bundle.path("catalog"))
    users = load_histories(bundle.path("users"), catalog)
    if not users:
        raise BundleError(f"{bundle.path('users')}: no users to profile: the data's split has none (check --data "
                          f"and rebuild the bundle with compile all)")
    user_ids = sorted(users, key=natural_key)[: config.users or None]
    histories = [[catalog.item(i) for i in users[u]] for u in user_ids]
    keywords = profiler(bundle, catalog, config)(histories)
    Profiles(config.method, dict(zip(user_ids, keywords)), method_settings(config)).save(out)
    bundle.add_artifact("profiles", PROFILES_FILE, method=config.method, users=len(user_ids))
    bundle.record_step("profiles", step_fp, time.perf_counter() - started, config=config_record(config))
    bundle.save()
    log.info("%s profiles for %d users in %.1f s → %s; e.g. %s: %r", config.method, len(user_ids),
             time.perf_counter() - started, out, user_ids[0], keywords[0])
    return out

