"""Small helpers the LLM compile steps share (base-model, profiles, sft-data, finetune, merge, evaluate)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any


def config_record(config: Any) -> dict[str, Any]:
    """A step config as plain JSON values (paths as strings), for the manifest's step record."""
    return json.loads(json.dumps(asdict(config), default=str))
