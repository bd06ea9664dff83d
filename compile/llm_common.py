"""Small helpers the LLM compile steps share (base-model, profiles, sft-data, finetune, merge, evaluate)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any


def config_record(config: Any) -> dict[str, Any]:
    """A step config as plain JSON values (paths as strings), for the manifest's step record."""
    return json.loads(json.dumps(asdict(config), default=str))


def fingerprint_record(config: Any, bundle: Any, *unused: str) -> dict[str, Any]:
    """A step config as its fingerprint sees it: the bundle path, `force` and the `unused` fields (what does
    not change the output) blanked, and the dataset by the checksum the bundle was built from, not the
    `--data` path it is read from (the steps refuse other data), so the same files reached another way
    do not redo the step."""
    record = config_record(config) | {name: None for name in ("bundle", "force", *unused)}
    if "data" in record:
        record["data"] = bundle.manifest.dataset.get("checksum")
    return record


def preset_flag(bundle: Any) -> str:
    """`--preset P` with the preset `compile all` last built the bundle with (its `all` step record), for the
    commands an error tells the operator to run; `--preset PRESET` when no `compile all` built it."""
    return f"--preset {bundle.manifest.steps.get('all', {}).get('preset') or 'PRESET'}"


def check_sft_data(bundle: Any, step: str) -> None:
    """StepFailed unless llm/sft holds the files `sft-data` recorded: a run of it stopped part-way leaves new and
    old files side by side under the old version, and training or merging on them would mix two data sets."""
    from compile.steps import StepFailed
    from palr.bundle import BundleError

    try:
        bundle.verify(["sft_data"])
    except BundleError as e:
        raise StepFailed(f"{step}: the SFT data is not what sft-data wrote ({e}); make it again with the options it "
                         f"was built with: python -m compile sft-data --bundle {bundle.root} {preset_flag(bundle)} "
                         f"--force") from None
