"""Dataclass configs → argparse options, so every step's and server's options live in its config dataclass.

Each field becomes `--field-name`; its `metadata["help"]` is the help text. Options left off
the command line fall back to the preset's value, then to the dataclass default: `build_config` is the
one place that precedence is merged (`python -m compile <step>`, `compile all`, the servers, loadtest).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) with Optional[...] unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = with_default(f.metadata.get("help", ""), default)
        tp, is_list = _base_type(hints[f.name])
        option = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp if tp in (int, float, str, Path) else str
            if is_list:
                kwargs["nargs"] = f.metadata.get("nargs", "+")  # "*": the option with no value is the empty list
            if "choices" in f.metadata:  # argparse lists them as the metavar ({cpu,cuda}) unless one is given
                kwargs["choices"] = f.metadata["choices"]
            if "metavar" in f.metadata or "choices" not in f.metadata:
                kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        parser.add_argument(option, **kwargs)


def with_default(help_text: str, default: Any) -> str:
    """The help with "(default: X)" after it, unless the help gives its own "(default: ...)" or there is none to show
    (None, "": the help says what leaving the option off means)."""
    if "(default:" in help_text or default is None or default == "":
        return help_text
    return f"{help_text} (default: {default})".strip()


def build_config(config_cls: type, args: argparse.Namespace | Mapping[str, Any],
                 preset_values: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """The config from (dataclass defaults < preset values < command line < fixed). `args` is the parsed
    command line, or any mapping in its place (`compile all` passes its shared fields)."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    given = args if isinstance(args, Mapping) else vars(args)
    values = {k: v for k, v in (preset_values or {}).items() if k in names}
    values.update({k: v for k, v in given.items() if k in names})
    values.update({k: v for k, v in fixed.items() if k in names})
    return config_cls(**values)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")  # every name logging knows


def check_bounds(config: Any, *, at_least_1: tuple[str, ...] = (), at_least_0: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = ()) -> None:
    """ValueError naming the flag (`--name-with-dashes`) of a field of `config` out of its bound: counts (>= 1,
    >= 0), finite numbers (> 0, >= 0: nan and inf refused) and fractions in [0, 1)."""
    rules = ((at_least_1, lambda v: v >= 1, ">= 1"), (at_least_0, lambda v: v >= 0, ">= 0"),
             (positive, lambda v: 0 < v < math.inf, "a finite number > 0"),
             (non_negative, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
             (fractions, lambda v: 0 <= v < 1, "in [0, 1)"))
    for names, within, bound in rules:
        for name in names:
            value = getattr(config, name)
            if not within(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """`--log-level`, any case; a level logging does not know is refused by argparse (exit 2), not a traceback."""
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO)")


def config_main(argv: list[str] | None, prog: str, description: str, config_cls: type,
                run: Callable[[Any], Any], errors: tuple[type[BaseException], ...] = (),
                failure: str = "failed") -> int:
    """An entry point's whole `main`: flags from `config_cls` plus `--log-level`, logging, the config
    (`build_config`), then `run(config)`: an int it returns is the exit code, anything else (None, a
    report) means 0. A refused config (ValueError) or one of `errors` is logged as "<failure>: <reason>"
    and exits 1, not a traceback."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)
    add_log_level(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        code = run(build_config(config_cls, args))
    except (ValueError, *errors) as e:
        logging.getLogger(prog.split()[-1]).error("%s: %s", failure, e)
        return 1
    return code if isinstance(code, int) else 0


def server_main(argv: list[str] | None, prog: str, description: str, config_cls: type, server_module: str) -> int:
    """A server's `__main__`: `config_main` running `server_module.serve(config)` until SIGTERM. The
    server module is imported after parsing, so `--help` stays fast. Exit 1 with the reason logged
    when the bundle, the options or the port are refused; exit 0 at once after a stop during the model
    load (palr/serving/loading.py)."""
    import asyncio
    import importlib

    from palr.bundle import BundleError
    from palr.errors import EngineError
    from palr.serving.loading import exit_if_loads_abandoned

    def serve(config) -> None:
        asyncio.run(importlib.import_module(server_module).serve(config))
        exit_if_loads_abandoned(0)  # stopped while loading: drained already, the load thread is not waited for

    # ImportError: a library the bundle's build needs is missing here (e.g. torchao for an int8 weight-only build);
    # EngineError: an engine that cannot start (palr.trtllm_runtime: TensorRT-LLM installed but failing to import)
    return config_main(argv, prog, description, config_cls, serve, (BundleError, OSError, ImportError, EngineError),
                       "cannot serve")
