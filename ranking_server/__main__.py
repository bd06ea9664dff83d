"""`python -m ranking_server --bundle DIR --retrieval HOST:PORT --port N`: the PALR LLM ranking tier.

A unary `recsys.v1.RankingService/Recommend` streams candidates from the retrieval server, ranks them
with the bundle's merged LLM (score mode: one forward pass; generate mode: constrained decoding)
under in-flight batching, fuses the LLM's scores with the retrieval scores and answers the top k.
When the caller's deadline nears, the LLM request is aborted and the answer is the retrieval order
flagged `degraded`; a full engine queue is RESOURCE_EXHAUSTED at once; a retrieval tier that is down
is UNAVAILABLE naming its address.

Health (grpc.health.v1) says NOT_SERVING until the LLM is loaded and warmed up, then SERVING.
SIGTERM or SIGINT drains: health NOT_SERVING, no new RPCs, in-flight ones finish within --grace, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from compile.cli import add_config_arguments, build_config
from palr.bundle import BundleError
from ranking_server.config import RankingServerConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranking_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RankingServerConfig)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ranking_server")
    try:
        config = build_config(RankingServerConfig, args)
        from ranking_server.server import serve  # imports grpc stubs and the engines: after --help

        asyncio.run(serve(config))
    except (BundleError, ValueError, OSError) as e:
        log.error("cannot serve: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
