"""`python -m retrieval_server --bundle DIR --port N`: SASRec candidates over server-streaming gRPC.

Health (grpc.health.v1) says NOT_SERVING until the ONNX model is loaded and warmed up, then SERVING.
SIGTERM or SIGINT drains: health NOT_SERVING, then (after --drain-delay, 0 by default) no new RPCs,
in-flight ones finish within --grace, exit 0.
"""

from __future__ import annotations

import sys

from palr.cli import server_main
from retrieval_server.config import RetrievalServerConfig


def main(argv: list[str] | None = None) -> int:
    return server_main(argv, "python -m retrieval_server", __doc__, RetrievalServerConfig, "retrieval_server.server")


if __name__ == "__main__":
    sys.exit(main())
