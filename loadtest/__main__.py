"""`python -m loadtest COMMAND ...`: calibrate (write an SLO file measured on this machine).

The other load-test entry points are modules of their own:

    python -m loadtest.bench [all|retrieval|mixed|router|gpu] ...   the side-by-side benchmark reports
    python -m loadtest.with_servers --bundle DIR -- COMMAND ...      run COMMAND while both tiers serve
    python -m loadtest.served_quality --bundle DIR --data DIR        ranking quality asked of the running servers
    python -m loadtest.demo --bundle DIR --data DIR                  a few users' ranked lists, by title
    locust -f loadtest/locustfile.py --headless ... --slo TOML       Locust over gRPC with an SLO gate (docs/loadtest.md)
"""

from __future__ import annotations

import sys

COMMANDS = {"calibrate": "loadtest.calibrate"}
USAGE = f"usage: python -m loadtest {{{','.join(COMMANDS)}}} [--help]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"{USAGE}\n(python -m loadtest --help lists the other load-test commands)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
