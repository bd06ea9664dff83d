"""`python -m loadtest COMMAND ...`: calibrate (write an SLO file measured on this machine)."""

from __future__ import annotations

import sys

COMMANDS = {"calibrate": "loadtest.calibrate"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m loadtest {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
