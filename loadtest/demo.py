"""`python -m loadtest.demo --bundle DIR`: the README's first command, end to end on this machine.

Starts the retrieval server as a subprocess on a free loopback port, waits for its health to say
SERVING, streams SASRec candidates for three users, prints them with titles and latency, and stops
the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtest.servers import ServerProcess
from palr.bundle import Bundle, BundleError
from palr.catalog import Catalog
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

log = logging.getLogger("demo")


@dataclass
class DemoConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (make bundle)", "metavar": "DIR"})
    users: list[str] = field(default_factory=list, metadata={
        "help": "user ids to ask for; default: the first three users of the bundle", "metavar": "USER"})
    k: int = field(default=10, metadata={"help": "candidates per user"})
    startup_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for health SERVING"})


@dataclass
class Demo:
    """What every part of the demo reads: the bundle's catalog and stored histories."""

    config: DemoConfig
    catalog: Catalog
    histories: dict[str, list[str]]

    @classmethod
    def open(cls, config: DemoConfig) -> "Demo":
        bundle = Bundle.open(config.bundle)
        users = json.loads(bundle.path("users").read_text())["users"]
        return cls(config, Catalog.load(bundle.path("catalog")), {u: e["history"] for u, e in users.items()})

    def users(self) -> list[str]:
        return self.config.users or list(self.histories)[:3]

    def titles(self, item_ids: list[str]) -> list[str]:
        return [self.catalog.by_id(i).label if i in self.catalog else i for i in item_ids]


def start_retrieval_server(config: DemoConfig) -> ServerProcess:
    """The retrieval tier as a subprocess, SERVING when this returns."""
    server = ServerProcess("retrieval_server", ["--bundle", str(config.bundle), "--log-level", "WARNING"])
    started = time.perf_counter()
    server.start(timeout=config.startup_timeout)
    print(f"retrieval server on {server.target}: SERVING after {time.perf_counter() - started:.1f} s "
          f"(log: {server.log_path})")
    return server


def show_retrieval(demo: Demo, stub: retrieval_pb2_grpc.RetrievalServiceStub, user: str) -> None:
    """Streams one user's candidates and prints them as they are ranked, with latencies."""
    request = retrieval_pb2.RetrieveRequest(user_id=user, k=demo.config.k, request_id=f"demo-{user}")
    started = time.perf_counter()
    first_chunk_ms = None
    candidates, flags = [], None
    for message in stub.Retrieve(request, timeout=30):
        first_chunk_ms = first_chunk_ms or (time.perf_counter() - started) * 1e3
        candidates.extend(message.candidates)
        flags = message
    total_ms = (time.perf_counter() - started) * 1e3
    history = demo.histories.get(user, [])
    recent = "; ".join(demo.titles(history[-3:])) or "none"
    print(f"\nuser {user}: {len(history)} items seen (most recent: {recent})"
          f"{', cold start (popularity)' if flags.cold_start else ''}"
          f"{f', model read the last {flags.history_length}' if flags.history_truncated else ''}")
    for candidate, title in zip(candidates, demo.titles([c.item_id for c in candidates])):
        print(f"  {candidate.rank + 1:>3}. {title:<60} score {candidate.score:8.3f}")
    print(f"  retrieval: first chunk {first_chunk_ms:.1f} ms, all {len(candidates)} in {total_ms:.1f} ms "
          f"(model {flags.model_version})")


def run(config: DemoConfig) -> int:
    demo = Demo.open(config)
    server = start_retrieval_server(config)
    try:
        with grpc.insecure_channel(server.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            for user in demo.users():
                show_retrieval(demo, stub, user)
    finally:
        code = server.stop()
    print(f"\nretrieval server stopped (SIGTERM, drained), exit code {code}")
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    from compile.cli import add_config_arguments, build_config

    parser = argparse.ArgumentParser(prog="python -m loadtest.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DemoConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(build_config(DemoConfig, args))
    except (BundleError, RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
