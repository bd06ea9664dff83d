"""`python -m ranking_server --bundle DIR --retrieval HOST:PORT --port N`: the PALR LLM ranking tier.

A unary `recsys.v1.RankingService/Recommend` streams candidates from the retrieval server, ranks them
with the bundle's merged LLM (score mode: one forward pass; generate mode: constrained decoding)
under in-flight batching, fuses the LLM's scores with the retrieval scores and answers the top k.
When the caller's deadline nears, the LLM request is aborted and the answer is the order of the ranker's
linear term (retrieval + trend + EASE, no LLM) flagged `degraded`; a full engine queue is RESOURCE_EXHAUSTED at once; a retrieval tier that is down
is UNAVAILABLE naming its address.

Health (grpc.health.v1) says NOT_SERVING until the LLM is loaded and warmed up, then SERVING.
SIGTERM or SIGINT drains: health NOT_SERVING, then (after --drain-delay, 0 by default) no new RPCs,
in-flight ones finish within --grace, exit 0.

Test-only: the environment variable RANKING_INJECT_DELAY_MS=N delays every Recommend by N ms (a server
slowed on purpose, to show an SLO gate catches it; ranking_server/inject.py). Never set it in production.
"""

from __future__ import annotations

import sys

from palr.cli import server_main
from ranking_server.config import RankingServerConfig


def main(argv: list[str] | None = None) -> int:
    return server_main(argv, "python -m ranking_server", __doc__, RankingServerConfig, "ranking_server.server")


if __name__ == "__main__":
    sys.exit(main())
