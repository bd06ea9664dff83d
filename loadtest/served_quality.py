"""`python -m loadtest.served_quality --bundle DIR`: the held-out check of the RUNNING system.

Asks the two servers over gRPC, as any caller would, for the test users' recommendations and scores the
answers against the test split (each user's last item, never seen by any model): NDCG@10 and HR@10 of
the ranking tier's top 10 (score and generate mode) next to the retrieval tier's own order (its Retrieve
stream, top 10), over the same users, with paired bootstrap 95 % intervals of the ratios. Users: the same
seeded sample `compile evaluate --tier ranking` ranks offline, so the two reports compare like with like.
Also counts answers that are degraded, repeat an item or name one that was not retrieved (invalid).

Starts both servers on free loopback ports (as `make demo` does) unless `--ranking`/`--retrieval` name
running ones. Writes reports/served_quality.json.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from loadtest.with_servers import TwoTierConfig, two_tier
from palr import metrics
from palr.bundle import write_atomically
from palr.serving.channels import open_channel
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

log = logging.getLogger("served_quality")

MODES = {"score": ranking_pb2.RANKING_MODE_SCORE, "generate": ranking_pb2.RANKING_MODE_GENERATE}
K = 10


@dataclass
class ServedQualityConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle the servers serve", "metavar": "DIR"})
    data: Path = field(default=Path("data/ml-100k"), metadata={
        "help": "the dataset the bundle was built from (its test split is the answer key)", "metavar": "DIR"})
    users: int = field(default=-1, metadata={
        "help": "test users asked (0 = all; -1 = as many as the bundle's offline evaluation, reports/eval_ranking.json, "
                "else 500); seeded as compile evaluate"})
    seed: int = field(default=-1, metadata={
        "help": "seed of the user sample (-1 = the offline evaluation's, else 0, compile evaluate's default)"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "ranking modes asked"})
    candidates: int = field(default=0, metadata={
        "help": "num_candidates of each request (0 = the offline evaluation's, reports/eval_ranking.json, else the "
                "ranker's K, llm/ranker.json)"})
    concurrency: int = field(default=4, metadata={"help": "callers at once"})
    deadline: float = field(default=60.0, metadata={"help": "seconds each call may take"})
    ranking: str = field(default="", metadata={"help": "a running ranking server (HOST:PORT); default: start both"})
    retrieval: str = field(default="", metadata={"help": "a running retrieval server (HOST:PORT)"})
    out: Path = field(default=Path("reports"), metadata={"help": "where served_quality.json goes", "metavar": "DIR"})
    tls_ca: Path | None = field(default=None, metadata={
        "help": "with --ranking/--retrieval: the CA that signed the servers' certificates (TLS)", "metavar": "PEM"})
    tls_cert: Path | None = field(default=None, metadata={"help": "client certificate (mutual TLS)", "metavar": "PEM"})
    tls_key: Path | None = field(default=None, metadata={"help": "client key (mutual TLS)", "metavar": "PEM"})

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"--modes {sorted(unknown)}: choose from {', '.join(MODES)}")
        if bool(self.ranking) != bool(self.retrieval):  # else it would start its own pair and measure those
            raise ValueError("--ranking and --retrieval go together (both: running servers; neither: start both)")
        if (self.tls_ca or self.tls_cert) and not self.ranking:  # the servers it starts listen in plaintext
            raise ValueError("--tls-ca/--tls-cert are for running servers: give --ranking and --retrieval too")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.candidates < 0:
            raise ValueError(f"--candidates must be >= 0 (0: the offline evaluation's), got {self.candidates}")


def ask(targets: tuple[str, str], users: list[str], config: ServedQualityConfig) -> list[dict]:
    """Per user: the retrieval order's and each mode's top-10 item ids, flags and latencies."""
    ranking_target, retrieval_target = targets
    tls = {"tls_ca": config.tls_ca, "tls_cert": config.tls_cert, "tls_key": config.tls_key, "aio": False}
    with open_channel(ranking_target, **tls) as ranking_channel, \
            open_channel(retrieval_target, **tls) as retrieval_channel:
        ranking = ranking_pb2_grpc.RankingServiceStub(ranking_channel)
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(retrieval_channel)

        def one(user: str) -> dict:
            """A failed call is an answer without items (a miss), its status code kept: one error must not
            throw away every other user's answer."""
            request = retrieval_pb2.RetrieveRequest(user_id=user, k=config.candidates, request_id=f"quality-{user}-r")
            row = {"user": user, "errors": {}}
            try:
                candidates = [c.item_id for m in retrieval.Retrieve(request, timeout=config.deadline)
                              for c in m.candidates]
            except grpc.RpcError as e:
                candidates, row["errors"]["retrieval"] = [], e.code().name
            row |= {"retrieval": candidates[:K], "candidates": candidates}
            for mode in config.modes:
                started = time.perf_counter()
                try:
                    response = ranking.Recommend(ranking_pb2.RecommendRequest(
                        user_id=user, k=K, mode=MODES[mode], num_candidates=config.candidates,
                        request_id=f"quality-{user}-{mode}"), timeout=config.deadline)
                    row[mode], row[f"{mode}_degraded"] = [item.item_id for item in response.items], response.degraded
                except grpc.RpcError as e:
                    row[mode], row[f"{mode}_degraded"], row["errors"][mode] = [], False, e.code().name
                row[f"{mode}_ms"] = 1e3 * (time.perf_counter() - started)
            return row

        with ThreadPoolExecutor(config.concurrency) as pool:
            return list(pool.map(one, users))


def error_codes(rows: list[dict], call: str) -> dict[str, int]:
    """Failed calls by gRPC status code (their answers were scored as misses)."""
    return dict(collections.Counter(r["errors"][call] for r in rows if call in r["errors"]))


def summarise(asked: list[dict], held_out: dict[str, str], config: ServedQualityConfig) -> dict:
    """Compared over the users whose Retrieve answered: without the retrieval order there is nothing to compare a
    ranking with (counted as a retrieval miss, it raised the ratio, and every ranking answer read as invalid)."""
    rows = [r for r in asked if "retrieval" not in r["errors"]]

    def ranks(key: str) -> list[int | None]:
        return [r[key].index(held_out[r["user"]]) if held_out[r["user"]] in r[key] else None for r in rows]

    retrieval = ranks("retrieval")
    report = {"users": len(rows), "users_asked": len(asked), "k": K, "candidates": config.candidates,
              "retrieval_errors": error_codes(asked, "retrieval"),
              **{f"{mode}_errors": error_codes(asked, mode) for mode in config.modes}}
    if not rows:
        log.error("no user's Retrieve answered (%s): nothing to compare the rankings with", report["retrieval_errors"])
        return report
    report |= {"retrieval_ndcg@10": metrics.ndcg(retrieval, K), "retrieval_hr@10": metrics.hit_rate(retrieval, K)}
    base = metrics.per_user_ndcg(retrieval, K)
    for mode in config.modes:
        got = ranks(mode)
        # no ratio where retrieval scored nothing (the offline report leaves it out too; JSON has no NaN)
        paired = metrics.paired_bootstrap_ratio(metrics.per_user_ndcg(got, K), base) if any(base) else None
        report |= {f"{mode}_ndcg@10": metrics.ndcg(got, K), f"{mode}_hr@10": metrics.hit_rate(got, K),
                   f"{mode}_vs_retrieval_ndcg@10": round(paired["ratio"], 4) if paired else None,
                   f"{mode}_vs_retrieval_ndcg@10_ci95": [round(paired["low"], 4), round(paired["high"], 4)]
                   if paired else None,
                   f"{mode}_degraded": sum(r[f"{mode}_degraded"] for r in rows),
                   f"{mode}_invalid": sum(len(set(r[mode])) != len(r[mode]) or not set(r[mode]) <= set(r["candidates"])
                                          for r in rows),
                   f"{mode}_same_as_retrieval": sum(r[mode] == r["retrieval"] for r in rows),
                   # answered calls only: a fast refusal or a call cut at its deadline is not a latency of the tier
                   f"{mode}_p50_ms": round(statistics.median(answered), 1) if (answered := [
                       r[f"{mode}_ms"] for r in rows if mode not in r["errors"]]) else None,
                   f"{mode}_p50_n": len(answered)}
        if paired and paired["undefined_draws"]:
            report[f"{mode}_vs_retrieval_ndcg@10_ci95_undefined_draws"] = paired["undefined_draws"]
    return report


def offline_sample(config: ServedQualityConfig, offline_report: Path, test_users: int,
                   ranker_k: int = 20) -> ServedQualityConfig:
    """`--users -1` / `--seed -1` / `--candidates 0` resolved to the offline evaluation's sample and candidate
    count (its report's `users`, `seed` and `k`), so the two compare the same users and lists by default on every
    preset (the full preset evaluates all 943, the quick 500); without a report 500 users, seed 0 and the ranker's
    K (`ranker_k`: a server refuses more candidates than its ranker was tuned on)."""
    offline = json.loads(offline_report.read_text()) if offline_report.is_file() else {}
    users = config.users if config.users >= 0 else int(offline.get("users", 500))
    seed = config.seed if config.seed >= 0 else int(offline.get("seed", 0))
    candidates = config.candidates or int(offline.get("k", ranker_k))
    if users >= test_users:
        users = 0  # all of them, as the evaluation's 0 is
    log.info("asking %s test users (seed %d) for %d candidates%s", users or "all", seed, candidates,
             f", as the offline evaluation {offline_report} did" if offline and config.users < 0 else "")
    return dataclasses.replace(config, users=users, seed=seed, candidates=candidates)


def run(config: ServedQualityConfig) -> dict:
    from palr.bundle import Bundle
    from palr.corpus import Corpus
    from palr.data import sample_users
    from palr.ranking import load_ranker, ranker_k

    bundle = Bundle.open(config.bundle)
    split = Corpus.load_for(bundle, config.data).split  # the answer key: the bundle's own
    config = offline_sample(config, bundle.reports_dir() / "eval_ranking.json", len(split.test),
                            ranker_k(load_ranker(bundle)))  # as compile evaluate resolves its --candidates 0
    users = sample_users(sorted(split.test), config.users, config.seed)  # compile evaluate's sample
    started = time.perf_counter()
    if config.ranking and config.retrieval:
        rows = ask((config.ranking, config.retrieval), users, config)
    else:
        with two_tier(TwoTierConfig(bundle=config.bundle, log_dir=config.out,
                                    retrieval_args="--log-level WARNING")) as (retrieval, ranking):
            rows = ask((ranking.target, retrieval.target), users, config)
    report = {**summarise(rows, split.test, config), "seconds": round(time.perf_counter() - started, 1),
              "config": json.loads(json.dumps(asdict(config), default=str))}
    config.out.mkdir(parents=True, exist_ok=True)
    write_atomically(config.out / "served_quality.json", json.dumps(report, indent=2) + "\n")
    for mode in config.modes if report["users"] else ():
        log.info("served %s mode, %d test users: NDCG@10 %.4f vs retrieval %.4f = %sx (95%% CI %s); %d degraded, "
                 "%d invalid, %d identical to the retrieval order, failed calls %s; p50 %s ms over %d answered calls",
                 mode, report["users"],
                 report[f"{mode}_ndcg@10"], report["retrieval_ndcg@10"], report[f"{mode}_vs_retrieval_ndcg@10"],
                 report[f"{mode}_vs_retrieval_ndcg@10_ci95"], report[f"{mode}_degraded"], report[f"{mode}_invalid"],
                 report[f"{mode}_same_as_retrieval"], report[f"{mode}_errors"] or "none", report[f"{mode}_p50_ms"],
                 report[f"{mode}_p50_n"])
    return report


def failed_modes(report: dict, modes: list[str]) -> list[str]:
    """The modes with nothing measured: no user's Retrieve answered, or every call of the mode failed."""
    return [mode for mode in modes
            if not report["users"] or sum(report[f"{mode}_errors"].values()) >= report["users_asked"]]


def run_checked(config: ServedQualityConfig) -> int:
    """`run`, exit 1 when a mode measured nothing (the report is written all the same, with the failed calls'
    codes): a check that could not ask the servers must not pass."""
    failed = failed_modes(run(config), config.modes)
    if failed:
        log.error("served quality check failed: nothing measured in %s mode (see the errors in %s)",
                  " and ".join(failed), config.out / "served_quality.json")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from palr.bundle import BundleError
    from palr.cli import config_main

    return config_main(argv, "python -m loadtest.served_quality", __doc__, ServedQualityConfig, run_checked,
                       (BundleError, OSError, RuntimeError, TimeoutError), "served quality check failed")

if __name__ == "__main__":
    sys.exit(main())
