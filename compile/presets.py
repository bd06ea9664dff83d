"""Named option sets for the whole chain. Dataclass defaults are the `full` preset.

    quick  what `make demo` builds on a fresh 2-core machine (minutes, not hours)
    full   the best quality we measured (the dataclass defaults)
    tiny   seconds; for tests only (tiny models, few steps, small data)
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {},
    "quick": {
        # SASRec exactly as in the full preset (best epoch ~37, ~3 min here), so the demo's retrieval tier is
        # not the weaker one: patience 5 stopped one run at epoch 21 on a plateau (test NDCG@10 0.1028)
        # the held-out SASRec for the ranker's training data peaks early (epoch ~17 measured); 1,600 of the
        # ~2,700 held-out examples for the 4-layer listwise ranker (200 steps of 8: the minutes 100 steps took at 8
        # layers, which ranked no better on validation)
        # 8 cut points per user, not the full preset's 16: the 1,600 examples are drawn from ~2,700 either way, and
        # the held-out SASRec trained without 8 items is the closer one to the served SASRec
        "sft-data": {"holdout_epochs": 20, "holdout_items": 8},
        "finetune": {"max_steps": 200, "save_every": 100},
        "evaluate-ranking": {"users": 500},  # ranking tier only (retrieval always ranks every test user)
        # every candidate: the bf16 ones are measured only where the CPU has avx512_bf16/amx_bf16
        # (elsewhere they are emulated, ~5x slower, and the build skips them)
        "build": {"generate_probes": 4, "repeats": 3},  # 100 probes as full (score and first pick): a fair bar
    },
    "tiny": {
        "sasrec": {"epochs": 1, "max_steps": 10, "max_len": 20, "hidden": 32, "ffn_hidden": 64},
        "sft-data": {"users": 48, "valid_users": 12, "retrieval_per_user": 1, "recommend_per_user": 1,
                     "holdout_items": 3, "holdout_epochs": 1},
        "finetune": {"max_steps": 4, "batch_size": 4, "save_every": 2, "lr": 5e-3},
        "merge": {"fusion_users": 12, "generate_format": "titles"},  # tests cover the titles answer format end to end
        "evaluate-ranking": {"users": 6},
        "build": {"probe_users": 4, "generate_probes": 2, "generate_k": 3, "prompt_tokens": 48, "decode_steps": 2,
                  "repeats": 1},
    },
}


def preset_for(preset: str | None, step: str) -> dict[str, Any]:
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(step, {}))
