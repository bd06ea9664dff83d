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
        "sasrec": {"epochs": 20, "patience": 3},
        # a short LoRA run on a third of the users (top 10 of 30 layers: about half the backward cost);
        # the fusion weight fitted on validation at merge keeps the two tiers at least at retrieval's order
        "sft-data": {"users": 300, "valid_users": 100},
        "finetune": {"max_steps": 20, "batch_size": 8, "top_layers": 10, "save_every": 10},
        "merge": {"fusion_users": 100},
        "evaluate": {"users": 30},  # ranking tier only (retrieval always ranks every test user)
        # every candidate: the bf16 ones are measured only where the CPU has avx512_bf16/amx_bf16
        # (elsewhere they are emulated, ~5x slower, and the build skips them)
        "build": {"probe_users": 8, "generate_probes": 4, "repeats": 3},
    },
    "tiny": {
        "sasrec": {"epochs": 1, "max_steps": 10, "max_len": 20, "hidden": 32, "ffn_hidden": 64},
        "sft-data": {"users": 24, "valid_users": 12, "retrieval_per_user": 1, "recommend_per_user": 1},
        "finetune": {"max_steps": 4, "batch_size": 4, "save_every": 2, "lr": 5e-3},
        "merge": {"fusion_users": 12},
        "evaluate": {"users": 6},
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
