"""`EngineConfig`: the scheduler limits of every ranking engine, declared once.

The ranking server's config inherits these fields (`RankingServerConfig(ServerConfig, EngineConfig)`),
so `--max-batch-size`, `--max-tokens-per-step`, ... are these fields; `EngineConfig.of(config)` takes
the engine's part out of any config that has them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from palr.decoding import DRAFT_TOKENS
from palr.serving.config import check_finite


@dataclass
class EngineConfig:
    """Scheduler limits shared by the engines (each backend uses the subset it needs)."""

    max_batch_size: int = field(default=16, metadata={
        "help": "most requests in the engine's running batch (KV slots)"})
    max_tokens_per_step: int = field(default=2048, metadata={
        "help": "token budget of one engine step: decode tokens first, then prompt chunks (room for several "
                "prompts per step; see docs/serving.md, Engines, for measurements)"})
    max_queue: int = field(default=64, metadata={
        "help": "requests waiting for a batch slot; beyond it requests are rejected at once "
                "(EngineOverloaded; the server answers RESOURCE_EXHAUSTED); >= 1 for the hf and ortgenai engines, "
                "where every request waits there first (trtllm: 0 = its batch slots only)"})
    max_seq_len: int = field(default=1024, metadata={
        "help": "prompt + generated tokens per request (the size of one KV slot); the ranking server's 0 sizes it "
                "to the longest prompt + answer its bundle can build"})
    prefix_reuse: bool = field(default=True, metadata={
        "help": "compute the shared instruction prefix's KV once and reuse it for every request"})
    prefix_cache_size: int = field(default=4, metadata={"help": "distinct shared prefixes kept (LRU)"})
    context_cache_mb: float = field(default=256.0, metadata={
        "help": "memory for the KV of recent users' contexts (profile + history, keyed by their exact token ids; "
                "LRU): a user's repeat call computes only its candidates (0: off)"})
    answer_cache_size: int = field(default=4096, metadata={
        "help": "answers kept for requests that repeat exactly (the same prompt tokens, candidates and mode: a "
                "user's repeat call with no new interaction); a repeat is answered without running the model "
                "(LRU, ~1 KB an answer; 0: off)"})
    score_first_ms: float = field(default=500.0, metadata={
        "help": "requests that end with their prompt (score mode; generate mode at logit weight 0) go ahead of "
                "decoding generate requests that arrived up to this long before them, in admission and in the "
                "order prompts run; decoding requests older than this keep their turn (0 = arrival order)"})
    shared_pass_tokens: int = field(default=768, metadata={
        "help": "hf engine: once 3 or more prompts wait, prompts of about one length run in one forward pass of up "
                "to this many padded tokens (each pass has a fixed cost, so this raises throughput under load; a "
                "bigger pass makes a request arriving during it wait longer; 0: one prompt a pass)"})
    draft_tokens: int = field(default=DRAFT_TOKENS, metadata={
        "help": "generate mode: each decode pass checks up to this many of the bias's own next picks, shared "
                "among the generating requests (a draft; the same answers, fewer passes when the fused scores "
                "decide most picks; 1 = one token a pass)"})
    threads: int = field(default=0, metadata={
        "help": "torch threads of the engine (0 = the count the bundle's build measured fastest on this machine, "
                "else torch's default)"})

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent:
            parent()
        for name in ("max_batch_size", "max_tokens_per_step", "prefix_cache_size", "draft_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_seq_len", "threads", "context_cache_mb", "answer_cache_size", "score_first_ms",
                     "shared_pass_tokens"):
            check_finite(name, getattr(self, name))  # a nan cache bound would never evict
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_batch_size "
                             f"({self.max_batch_size}) so every decoding request gets its token each step")

    @property
    def num_threads(self) -> int | None:
        """torch intra-op threads to set on the engine thread (None: leave torch's default)."""
        return self.threads or None

    @classmethod
    def of(cls, config, **changes) -> "EngineConfig":
        """The engine fields of `config` (any object that has them, e.g. RankingServerConfig) as this class."""
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
        values.update(changes)
        return cls(**values)
