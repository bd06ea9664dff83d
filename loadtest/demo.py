"""`python -m loadtest.demo --bundle DIR`: the README's first command, the two-tier path end to end.

Builds the bundle first if it is missing or incomplete (`compile fetch` + `compile all --preset quick`;
`make demo` has already done so). Starts the retrieval server and the ranking server as subprocesses
on free loopback ports and waits for both healths to say SERVING; asks the ranking server for three
users' recommendations in score mode and for the first user's again in generate mode; prints the
ranked titles with per-stage timings and, when the dataset is at hand, where the user's held-out next
item (the test split's, never seen by the models) landed; stops both servers with SIGTERM (they drain
and exit 0).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtest.with_servers import TwoTierConfig, two_tier
from palr.bundle import Bundle, BundleError
from palr.catalog import Catalog
from palr.serving.config import check_finite
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger("demo")

ARTIFACTS = ("catalog", "users", "sasrec_onnx", "trends", "collab", "profiles", "llm_merged", "ranker")  # what the servers read
MODE_NAMES = {ranking_pb2.RANKING_MODE_SCORE: "score", ranking_pb2.RANKING_MODE_GENERATE: "generate"}


@dataclass
class DemoConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle directory (make bundle)", "metavar": "DIR"})
    data: Path = field(default=Path("data"), metadata={
        "help": "data directory (compile fetch): builds a missing bundle and shows each user's held-out next item",
        "metavar": "DIR"})
    preset: str = field(default="quick", metadata={"help": "compile preset used when the bundle must be built"})
    users: list[str] = field(default_factory=list, metadata={
        "help": "user ids to ask for; default: the first three users of the bundle", "metavar": "USER"})
    k: int = field(default=10, metadata={"help": "ranked items per user"})
    deadline: float = field(default=120.0, metadata={"help": "seconds each Recommend call may take"})
    startup_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for each health SERVING"})
    log_dir: Path = field(default=Path("reports"), metadata={"help": "where the two servers' logs go", "metavar": "DIR"})

    def __post_init__(self) -> None:  # refused now, not after both servers have loaded their models
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        check_finite("--deadline", self.deadline, positive=True, unit="seconds")
        check_finite("--startup-timeout", self.startup_timeout, positive=True, unit="seconds")


@dataclass
class Demo:
    """What every part of the demo reads: the bundle's catalog, stored histories, held-out items."""

    config: DemoConfig
    catalog: Catalog
    histories: dict[str, list[str]]
    held_out: dict[str, str]  # user → the test split's item ({} when the dataset is not at hand)

    @classmethod
    def open(cls, config: DemoConfig) -> "Demo":
        bundle = Bundle.open(config.bundle)
        users = json.loads(bundle.path("users").read_text())["users"]
        return cls(config, Catalog.load(bundle.path("catalog")), {u: e["history"] for u, e in users.items()},
                   held_out_items(bundle, dataset_dir(config.data)))

    def users(self) -> list[str]:
        return self.config.users or list(self.histories)[:3]

    def title(self, item_id: str) -> str:
        return self.catalog.by_id(item_id).label if item_id in self.catalog else item_id


def dataset_dir(data: Path) -> Path:
    """`--data` is the data root (compile fetch's `--data-dir`); the dataset folder itself is taken too."""
    return data if any(data.glob("*.inter")) else data / "ml-100k"


def held_out_items(bundle: Bundle, data_dir: Path) -> dict[str, str]:
    """Each user's test item (the split the bundle was built with, checked); {} without the dataset."""
    if not data_dir.is_dir():
        log.warning("not marking held-out items: no dataset at %s (--data: the data root, e.g. data)", data_dir)
        return {}
    from palr.corpus import Corpus

    try:
        return dict(Corpus.load_for(bundle, data_dir).split.test)
    except BundleError as e:  # the lists are still printed, without the held-out item marked
        log.warning("not marking held-out items: %s", e)
        return {}


def ensure_bundle(config: DemoConfig) -> None:
    """Builds the bundle (fetch + compile all) when an artifact the servers read is missing."""
    try:
        missing = [name for name in ARTIFACTS if not Bundle.open(config.bundle).has(name)]
    except BundleError:
        missing = list(ARTIFACTS)
    if not missing:
        return
    print(f"bundle {config.bundle} lacks {', '.join(missing)}: building it (compile all --preset {config.preset}; "
          f"a first build takes minutes)", flush=True)
    dataset = dataset_dir(config.data)
    for step in (["fetch", "--data-dir", str(dataset.parent)],
                 ["all", "--preset", config.preset, "--bundle", str(config.bundle), "--data", str(dataset)]):
        subprocess.run([sys.executable, "-m", "compile", *step], check=True)


def show(demo: Demo, stub: ranking_pb2_grpc.RankingServiceStub, user: str, mode: int) -> str:
    """One Recommend call, printed: ranked titles, the held-out item's fate, per-stage timings; its degraded reason
    ("" when the LLM ranked it)."""
    request = ranking_pb2.RecommendRequest(user_id=user, k=demo.config.k, mode=mode, request_id=f"demo-{user}-{mode}")
    started = time.perf_counter()
    response = stub.Recommend(request, timeout=demo.config.deadline)
    wall_ms = (time.perf_counter() - started) * 1e3
    history = demo.histories.get(user, [])
    recent = "; ".join(demo.title(i) for i in history[-3:]) or "none"
    flags = "".join([", cold start (popularity)" if response.cold_start else "",
                     f", DEGRADED ({response.degraded_reason}): the linear term's order, no LLM" if response.degraded else ""])
    print(f"\nuser {user}, {MODE_NAMES[response.mode]} mode: {len(history)} items seen "
          f"(most recent: {recent}){flags}")
    for item in response.items:
        print(f"  {item.rank + 1:>3}. {item.title:<58} score {item.score:8.3f}   (retrieval #{item.retrieval_rank + 1})")
    target = demo.held_out.get(user)
    if target:
        ranked = {item.item_id: item.rank for item in response.items}
        where = f"ranked #{ranked[target] + 1}" if target in ranked else f"not in the top {len(response.items)}"
        print(f"  held-out next item: {demo.title(target)} — {where}")
    t = response.timings
    print(f"  timings: retrieval {t.retrieval_ms:.1f} ms | queue {t.queue_ms:.1f} ms | ranking {t.ranking_ms:.1f} ms "
          f"| total {t.total_ms:.1f} ms (client saw {wall_ms:.1f} ms); models {response.model_version}")
    return (response.degraded_reason or "unspecified") if response.degraded else ""


def run(config: DemoConfig) -> int:
    ensure_bundle(config)
    demo = Demo.open(config)
    servers = TwoTierConfig(bundle=config.bundle, log_dir=config.log_dir, startup_timeout=config.startup_timeout,
                            retrieval_args="--log-level WARNING")
    with two_tier(servers) as (retrieval, ranking):
        print(f"retrieval server (SASRec, ONNX Runtime) on {retrieval.target}, ranking server (PALR LLM, loaded "
              f"and warmed up) on {ranking.target}: both SERVING (logs in {config.log_dir}/)")
        with grpc.insecure_channel(ranking.target) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            degraded = [show(demo, stub, user, ranking_pb2.RANKING_MODE_SCORE) for user in demo.users()]
            degraded.append(show(demo, stub, demo.users()[0], ranking_pb2.RANKING_MODE_GENERATE))
    codes = {server.module: server.process.returncode for server in (ranking, retrieval)}
    print("\n" + ", ".join(f"{name} stopped (SIGTERM, drained), exit code {code}" for name, code in codes.items()))
    reasons = [reason for reason in degraded if reason]
    if reasons:  # served, but not by the ranking tier: the demo of a two-tier system did not show one
        print(f"{len(reasons)} of {len(degraded)} answers were degraded to the linear term's order "
              f"({', '.join(sorted(set(reasons)))}): the LLM ranked none of them; see {config.log_dir}/ranking_server.log",
              file=sys.stderr)
    return 0 if set(codes.values()) == {0} and not reasons else 1


def main(argv: list[str] | None = None) -> int:
    from palr.cli import config_main

    return config_main(argv, "python -m loadtest.demo", __doc__, DemoConfig, run,
                       (BundleError, RuntimeError, TimeoutError, grpc.RpcError, subprocess.CalledProcessError),
                       "demo failed")

if __name__ == "__main__":
    sys.exit(main())
