"""`python -m loadtest.bench <benchmark> [options]`: latency benchmarks, measured side by side in one
run and written to `reports/bench_<benchmark>.json` and `.md`.

Performance is measured here and reported as ratios, never asserted by timed unit tests. The
machine's load average is recorded with every report: numbers taken on a busy machine are not final.
Each benchmark is a module with a config dataclass and `run(config) -> dict` (its options come from
the dataclass); add one by adding a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from compile.cli import add_config_arguments, build_config

# name → (module, config class, one-line help). Modules are imported to build their options, so
# they keep heavy imports (torch, onnxruntime) inside functions.
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "retrieval": ("loadtest.bench_retrieval", "RetrievalBenchConfig",
                  "SASRec ORT vs torch eager at batch 1/32; Retrieve RPC p50/p99 at concurrency 1/8/32, "
                  "micro-batching on vs off"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, config_name, help_text) in BENCHMARKS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(sub, getattr(importlib.import_module(module_name), config_name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, config_name, _ = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    module.run(build_config(getattr(module, config_name), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
