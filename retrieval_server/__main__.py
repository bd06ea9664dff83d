"""`python -m retrieval_server --bundle DIR --port N`: SASRec candidates over server-streaming gRPC.

Health (grpc.health.v1) says NOT_SERVING until the ONNX model is loaded and warmed up, then SERVING.
SIGTERM or SIGINT drains: health NOT_SERVING, no new RPCs, in-flight ones finish within --grace, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from compile.cli import add_config_arguments, build_config
from palr.bundle import BundleError
from retrieval_server.config import RetrievalServerConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RetrievalServerConfig)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("retrieval_server")
    try:
        config = build_config(RetrievalServerConfig, args)
        from retrieval_server.server import serve  # imports onnxruntime: after --help

        asyncio.run(serve(config))
    except (BundleError, ValueError, OSError) as e:
        log.error("cannot serve: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
