"""`python -m loadtest.bench [<benchmark>] [options]`: latency benchmarks, measured side by side in one
run and written under `reports/`. Without a benchmark name it runs `all`, the full report
(reports/bench.json, bench.md and plots); `--quick` sizes any benchmark that has a quick preset for
a smoke run of a few minutes (options given explicitly still win).

Performance is measured here and reported as ratios, never asserted by timed unit tests. The
machine's load average is recorded with every report: numbers taken on a busy machine are not final.
Each benchmark is a module with a config dataclass and `run(config) -> dict` (its options come from
the dataclass; an optional module-level `QUICK` dict is its quick preset); add one by adding a line
to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from palr.bundle import BundleError
from palr.cli import LOG_FORMAT, add_config_arguments, add_log_level, build_config

# name → (module, config class, one-line help). Modules are imported to build their options, so
# they keep heavy imports (torch, onnxruntime) inside functions.
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "all": ("loadtest.bench_all", "BenchConfig",
            "the full report: one-at-a-time vs static vs in-flight batching at concurrency 1/4/16/64 in score and "
            "generate modes, score vs generate, prefix reuse on/off, ORT vs torch retrieval → reports/bench.*"),
    "retrieval": ("loadtest.bench_retrieval", "RetrievalBenchConfig",
                  "SASRec ORT vs torch eager at batch 1/32; Retrieve RPC p50/p99 at concurrency 1/8/32, "
                  "micro-batching on vs off"),
    "mixed": ("loadtest.bench_mixed", "MixedBenchConfig",
              "score and generate requests together (80/20), closed loop and open loop (Poisson arrivals at shares "
              "of capacity), static vs in-flight batching: the score requests' own p95 → reports/bench_mixed.*"),
    "router": ("loadtest.bench_router", "RouterBenchConfig",
               "two engines on one CPU behind a ModeRouter (what --engine ortgenai serves when its build won some "
               "modes), computing at once vs in turns, against one engine → reports/bench_router.*"),
    "gpu": ("loadtest.bench_gpu", "GpuBenchConfig",
            "hf engine on a random-weight Llama-2-7B-shape model on one CUDA GPU: score p50/p99, throughput at "
            "concurrency 1/8/32, generate time per token, vs memory-bandwidth and FLOP/s limits"),
}


DEFAULT = "all"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not set(argv) & set(BENCHMARKS) and argv[:1] not in (["-h"], ["--help"]):  # `--quick --help`: all's help
        argv = [DEFAULT, *argv]
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, config_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text + "\n\n" + (module.__doc__ or ""),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_log_level(sub)
        if hasattr(module, "QUICK"):
            sub.add_argument("--quick", action="store_true", help=f"smoke-run sizes: {module.QUICK}")
        add_config_arguments(sub, getattr(module, config_name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    module_name, config_name, _ = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    quick = module.QUICK if getattr(args, "quick", False) else None
    try:
        config = build_config(getattr(module, config_name), args, quick)
    except ValueError as e:  # a refused option: one line, as every entry point's (palr.cli.config_main)
        parser.error(f"{args.benchmark}: {e}")
    try:
        module.run(config)
    except BundleError as e:  # a missing or unfinished bundle: one line, as every other entry point says it
        parser.exit(1, f"{parser.prog} {args.benchmark}: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
