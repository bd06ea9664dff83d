"""`python -m compile <step> [options]`: one entry point for every offline step.

Each step (compile/steps.py) is a module with a config dataclass and `run(config)`; its options are
generated from the dataclass, so `python -m compile <step> --help` lists them with their defaults.
`evaluate --tier retrieval|ranking` is an alias of `evaluate-retrieval` / `evaluate-ranking`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from compile.presets import PRESETS, preset_for
from compile.steps import EVALUATE_ALIAS, STEPS, StepFailed, resolve_alias
from palr.bundle import BundleError
from palr.cli import LOG_FORMAT, add_config_arguments, add_log_level, build_config
from palr.errors import EngineError


def _preset_default(config_cls: type) -> str:
    """What a step runs with when no --preset is given: its config's `preset` default (all's), else its own."""
    preset = config_cls.__dataclass_fields__.get("preset")
    return preset.default if preset is not None else "none, this step's own defaults below"


def _step_parser(step: str) -> tuple[argparse.ArgumentParser, type, object]:
    _, module_name, config_name, help_text = STEPS[step]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = argparse.ArgumentParser(prog=f"python -m compile {step}", description=help_text + "\n\n" + (module.__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="option set: quick (make demo), full (best quality, ~30 min), tiny (tests); default: "
                             + _preset_default(config_cls))
    add_log_level(parser)
    add_config_arguments(parser, config_cls, skip=("preset",))  # a config's `preset` field comes from --preset
    return parser, config_cls, module


# what a step raises for input it refuses (ValueError: options, malformed data files; BundleError: a bundle that is
# incomplete, stale or built for other hardware; FileNotFoundError: a missing input) or a failure it can name
# (StepFailed; EngineError: an engine library that is installed but does not load, with the runtime's install
# hint): logged as one line, exit 1
REFUSALS = (ValueError, BundleError, FileNotFoundError, StepFailed, EngineError)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    argv = resolve_alias(given)
    if given and given[0] == EVALUATE_ALIAS and {"-h", "--help"} & set(given):
        print(f"`python -m compile {EVALUATE_ALIAS}` is an alias: --tier retrieval (the default) runs evaluate-retrieval, "
              f"--tier ranking runs evaluate-ranking; below, {argv[0]}'s options.\n")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STEPS:
        width = max(len(s) for s in STEPS)
        listing = "\n".join(f"  {name:<{width}}  {step.help}" for name, step in STEPS.items())
        listing += f"\n  {EVALUATE_ALIAS:<{width}}  alias: evaluate --tier retrieval|ranking"
        print(f"usage: python -m compile <step> [options]\n\n{__doc__}\nsteps:\n{listing}\n\n"
              f"`python -m compile <step> --help` lists a step's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown step {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    step = argv[0]
    parser, config_cls, module = _step_parser(step)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    preset = getattr(args, "preset", None)
    log = logging.getLogger("compile")
    try:
        config = build_config(config_cls, args, preset_for(preset, step), **({"preset": preset} if preset else {}))
        log.info("%s: %s", step, config)
        module.run(config)
    except REFUSALS as e:  # a refused option, a bundle or dataset that does not fit: the reason, not a traceback
        log.error("%s failed: %s", step, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
