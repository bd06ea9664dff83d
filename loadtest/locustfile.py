"""Locust load test of the two-tier system over gRPC, with an SLO gate.

    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:50052 --retrieval-host 127.0.0.1:50051 \\
        --bundle bundle --slo loadtest/slo/cpu.toml -u 2 -r 2 -t 3m --stop-timeout 120 \\
        --csv reports/locust --html reports/locust.html

Each Locust user is an internal service in a closed loop: it picks a user from the bundle's
users.json (or, at `--cold-start-share`, an id nobody has seen), and calls
  - `Recommend` on `--host` (the ranking server), in generate mode at `--generate-share`, score mode
    otherwise, with `--k` and `--candidates`, recorded as "Recommend/score" or "Recommend/generate";
  - `Retrieve` on `--retrieval-host` (the retrieval server; required while `--retrieve-share` > 0,
    the run refuses to start without it) at `--retrieve-share` of its calls, recorded as "Retrieve"
    (timed until the stream is drained). `--retrieve-share 0` drives the ranking server alone.
Every call carries a deadline (`--*-deadline-ms`) and a request id ("locust-..."), so the servers'
logs show which requests were load. A degraded Recommend answer (the linear term's order, LLM skipped)
counts as a failure unless `--degraded-ok`. With `--slo FILE` the run's exit code is the gate's:
0 when every limit held, 3 when any SLO is broken (see loadtest/slo.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.event
from locust import events, task
from locust.log import greenlet_exception_logger
from locust.runners import STATE_CLEANUP, STATE_RUNNING, STATE_SPAWNING, STATE_STOPPING, MasterRunner, WorkerRunner

from loadtest.grpc_user import GrpcUser
from loadtest.patterns import PATTERNS, zipf_weights
from loadtest.report import DISTURBED_PCT, CpuTimes, cpu_share
from loadtest.slo import EXIT_BROKEN, SloError, SloProfile, gate
from palr.serving import tracing
from palr.bundle import Bundle, BundleError, write_atomically
from ranking_server.planner import MODES
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

log = logging.getLogger("locustfile")


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("recsys traffic (loadtest/locustfile.py)")
    group.add_argument("--retrieval-host", default="", metavar="HOST:PORT",
                       help="retrieval server for the Retrieve share of the calls; required unless "
                            "--retrieve-share 0 (the ranking server does not serve Retrieve)")
    group.add_argument("--bundle", default="bundle", metavar="DIR", help="bundle whose users.json users are sampled")
    group.add_argument("--slo", default="", metavar="TOML",
                       help="SLO profile (e.g. loadtest/slo/cpu.toml): exit 3 when any limit is broken")
    group.add_argument("--retrieve-share", type=float, default=0.2,
                       help="fraction of calls that are Retrieve; the rest are Recommend (1: retrieval tier only)")
    group.add_argument("--generate-share", type=float, default=0.2,
                       help="fraction of Recommend calls in generate mode; the rest use score mode")
    group.add_argument("--cold-start-share", type=float, default=0.0,
                       help="fraction of calls for user ids the bundle does not know (popularity answers)")
    group.add_argument("--user-pattern", default="uniform", choices=PATTERNS,
                       help="which known user each call is for: uniform, or zipf (a few users come back often, as "
                            "refreshing feeds do: what the ranking engine's per-user context cache serves)")
    group.add_argument("--zipf-exponent", type=float, default=1.1,
                       help="--user-pattern zipf: P(user of rank k) ~ 1/k^exponent")
    group.add_argument("--k", type=int, default=10, help="items per Recommend answer")
    group.add_argument("--candidates", type=int, default=0,
                       help="retrieved candidates the LLM ranks per Recommend (0: the server's default)")
    group.add_argument("--retrieve-k", type=int, default=50, help="candidates per Retrieve call")
    group.add_argument("--score-deadline-ms", type=float, default=30000, help="deadline of score-mode Recommend calls")
    group.add_argument("--generate-deadline-ms", type=float, default=120000,
                       help="deadline of generate-mode Recommend calls")
    group.add_argument("--retrieve-deadline-ms", type=float, default=2000, help="deadline of Retrieve calls")
    group.add_argument("--think-time-ms", type=float, default=0.0,
                       help="mean pause between a user's calls (exponential); 0: closed loop, -u = concurrency")
    group.add_argument("--degraded-ok", action="store_true",
                       help="count degraded Recommend answers (LLM skipped) as successes")
    group.add_argument("--grpc-tls-ca", default="", metavar="PEM", help="CA that signed the servers' certificates (TLS)")
    group.add_argument("--grpc-tls-cert", default="", metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--grpc-tls-key", default="", metavar="PEM", help="client key (mutual TLS)")
    group.add_argument("--otlp-endpoint", default="", metavar="URL",
                       help="OpenTelemetry collector (OTLP/gRPC): each call a CLIENT span whose trace context the "
                            "servers continue (docs/tracing.md); empty: off")


@dataclass(frozen=True)
class Traffic:
    """What every simulated caller reads: the options and the users to sample."""

    users: list[str]
    retrieval_host: str
    retrieve_share: float
    generate_share: float
    cold_start_share: float
    k: int
    candidates: int
    retrieve_k: int
    deadlines_s: dict[str, float]
    think_time_s: float
    degraded_ok: bool
    user_weights: list[float] | None = None  # --user-pattern zipf (None: uniform)

    @classmethod
    def from_options(cls, options) -> "Traffic":
        for name in ("retrieve_share", "generate_share", "cold_start_share"):
            if not 0 <= getattr(options, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(options, name)}")
        users = bundle_users(Path(options.bundle))
        return cls(users=users, retrieval_host=options.retrieval_host,
                   retrieve_share=options.retrieve_share, generate_share=options.generate_share,
                   cold_start_share=options.cold_start_share, k=options.k, candidates=options.candidates,
                   retrieve_k=options.retrieve_k,
                   deadlines_s={"score": options.score_deadline_ms / 1e3,
                                "generate": options.generate_deadline_ms / 1e3,
                                "retrieve": options.retrieve_deadline_ms / 1e3},
                   think_time_s=options.think_time_ms / 1e3, degraded_ok=options.degraded_ok,
                   user_weights=user_weights(users, options.user_pattern, options.zipf_exponent))

    def longest_deadline_s(self) -> float:
        """The longest deadline of the calls this traffic makes: how long a call may still run when -t ends."""
        retrieve = bool(self.retrieval_host) and self.retrieve_share > 0
        recommend = not (retrieve and self.retrieve_share >= 1)
        kinds = {"score": recommend and self.generate_share < 1, "generate": recommend and self.generate_share > 0,
                 "retrieve": retrieve}
        return max((self.deadlines_s[kind] for kind, made in kinds.items() if made), default=0.0)

    def user_id(self) -> str:
        if self.cold_start_share and random.random() < self.cold_start_share:
            return f"locust-new-{uuid.uuid4().hex[:8]}"
        if self.user_weights:
            return random.choices(self.users, weights=self.user_weights)[0]
        return random.choice(self.users)


def user_weights(users: list[str], pattern: str, exponent: float) -> list[float] | None:
    """Weights of the users in their (shuffled once, seeded) order: Zipf over that order, or None."""
    if pattern == "uniform":
        return None
    random.Random(0).shuffle(users)
    return zipf_weights(len(users), exponent)


def bundle_users(bundle_dir: Path) -> list[str]:
    """User ids with a history in the bundle's users.json."""
    users = json.loads(Bundle.open(bundle_dir).path("users").read_text())["users"]
    known = [u for u, entry in users.items() if entry["history"]]
    if not known:
        raise BundleError(f"{bundle_dir}: users.json has no user with a history")
    return known


# the names this load test files its calls under (`RecsysCaller.request_name`): what an SLO file may limit
REQUEST_NAMES = tuple(f"Recommend/{mode}" for mode in dict.fromkeys(MODES.values())) + ("Retrieve",)
TRAFFIC: Traffic | None = None
TRACER = None  # --otlp-endpoint
SLO: SloProfile | None = None
CPU_AT_START: CpuTimes | None = None  # the machine's CPU time when the run started (the steal during it is logged)
MASTER_RUN_TIME_S: float | None = None  # a headless master's -t, ended here (`end_distributed_run`), not by Locust


@events.init.add_listener
def check_options(environment, **_kwargs) -> None:
    """Fail before the run starts (no host, bad bundle, bad SLO file), not at its end. The SLO is
    loaded where the gate runs: the master, or the only process."""
    global SLO
    options = environment.parsed_options
    if options is None:  # imported by a tool, not run by Locust
        return
    worker = isinstance(environment.runner, WorkerRunner)
    if not environment.host and not worker:
        raise SystemExit("locustfile: --host HOST:PORT (the ranking server) is required")
    try:
        traffic = Traffic.from_options(options)
        SLO = SloProfile.load(options.slo) if options.slo and not worker else None
        if SLO is not None:
            check_slo_names(SLO)
        if not worker:
            check_retrieve_target(options)
            warn_short_stop_timeout(float(options.stop_timeout or 0), traffic.longest_deadline_s())
    except (BundleError, SloError, OSError, ValueError) as e:
        raise SystemExit(f"locustfile: {e}") from e


@events.init.add_listener
def take_over_master_run_time(environment, runner=None, **_kwargs) -> None:
    """A headless master ends -t itself (`end_distributed_run`). Locust's own end quits at once: it tells the
    workers to quit and stops listening 0.5 s later, so the stats a worker sends once its last calls are done (up
    to --stop-timeout later: the slowest calls) were lost, the gate judged the run without them, and the master,
    left "stopping", first waited the whole --stop-timeout for nothing. (Not with a LoadTestShape, whose -t
    Locust applies after the shape ends.)"""
    global MASTER_RUN_TIME_S
    options = environment.parsed_options
    if (isinstance(runner, MasterRunner) and options is not None and options.headless and options.run_time
            and environment.shape_class is None):
        MASTER_RUN_TIME_S, options.run_time = options.run_time, None  # Locust reads it after `init`


def end_distributed_run(runner: MasterRunner, stop_timeout_s: float) -> None:
    """Tells every worker to quit and lets them: a worker stops its users (waiting up to --stop-timeout for their
    calls), sends its final stats, then says it quit, and the master, once the last one has, stops and quits as
    Locust's own "last worker quit" does; the SLO gate then runs on every call made. (A stop message would not do:
    a worker sends no final stats on it, and the master forgets a stopped worker.) If the workers have not all quit
    within --stop-timeout + 60 s (Locust's own bound on a stop), the master quits without them."""
    try:
        log.info("--run-time limit reached: telling %d worker(s) to quit; they finish their calls (at most "
                 "--stop-timeout), send their final stats, then the SLO gate runs", tell_workers_to_quit(runner))
        gevent.sleep(stop_timeout_s + 60)  # the master quits before this when the last worker quits
        note_workers_not_quit(runner, "quitting")
    finally:  # the run ends either way (also if telling them failed)
        runner.quit()


def note_workers_not_quit(runner: MasterRunner, going_on: str) -> None:
    """The workers still there after --stop-timeout + 60 s: warned about (the master goes on `going_on` without
    them) and noted for the gate (BROKEN): their last stats never came."""
    lost = [c.id for c in runner.clients.all]
    log.warning("workers %s did not quit within --stop-timeout + 60 s: %s without their last stats", lost, going_on)
    record_incomplete(runner.environment, f"workers {lost} did not send their last stats (no quit within "
                                          f"--stop-timeout + 60 s)")


def record_incomplete(environment, reason: str) -> None:
    """Notes for the SLO gate (loadtest.slo.gate: BROKEN) why the run's statistics lack calls it made or meant to."""
    if not hasattr(environment, "incomplete_run"):
        environment.incomplete_run = set()
    environment.incomplete_run.add(reason)


def watch_for_lost_workers(runner: MasterRunner, every_s: float = 1.0) -> None:
    """A worker that stops sending heartbeats (crashed, its machine gone) is marked missing, then dropped from the
    master's clients: its users' load was never applied, and its calls since its last report are not counted, yet
    the gate passed on the rest. Noted for the gate when one is dropped while missing; one that sends a heartbeat
    again (late on a busy machine: Locust takes it back, its stats counted) is not. `missing_at_the_gate` notes those
    still missing when the gate runs."""
    missing: set[str] = set()
    while True:
        present = {client.id for client in runner.clients.all}
        for worker in sorted(missing - present):
            record_incomplete(runner.environment, f"worker {worker} went missing during the run (no heartbeat) and "
                                                  f"was dropped")
        missing = {client.id for client in runner.clients.missing}
        gevent.sleep(every_s)


def missing_at_the_gate(runner) -> None:
    """Workers missing (no heartbeat) when the gate runs: their last calls and stats are not in the numbers."""
    if isinstance(runner, MasterRunner):
        for client in runner.clients.missing:
            record_incomplete(runner.environment, f"worker {client.id} was missing (no heartbeat) when the gate ran")


def tell_workers_to_quit(runner: MasterRunner) -> int:
    """Sends every worker "quit" (it stops its users, sends its final stats, then says it quit); how many."""
    from locust.rpc import Message

    workers = [client.id for client in runner.clients.all]
    for worker in workers:
        runner.server.send_to_client(Message("quit", None, worker))
    return len(workers)


def warn_short_stop_timeout(stop_timeout_s: float, longest_deadline_s: float) -> None:
    """Locust drops the calls still running when -t ends unless --stop-timeout waits for them: the slowest
    calls, so a too-short wait flatters the tail the SLO gate checks."""
    if stop_timeout_s < longest_deadline_s:
        log.warning("--stop-timeout %gs is shorter than the longest call deadline (%gs): calls still running when "
                    "the run ends after that are dropped, not counted, and the percentiles look better than they "
                    "were; use --stop-timeout %d", stop_timeout_s, longest_deadline_s, math.ceil(longest_deadline_s))


def check_slo_names(profile: SloProfile) -> None:
    """An [rpc.NAME] this load test never records would be reported as "no requests" and its limits never
    checked: a typo must stop the run, not pass the gate."""
    unknown = [rpc.name for rpc in profile.rpcs if rpc.name not in REQUEST_NAMES]
    if unknown:
        raise ValueError(f"{profile.path}: {', '.join(f'[rpc.{n!r}]' for n in unknown)} names no request this load "
                         f"test makes (it makes {', '.join(REQUEST_NAMES)}): its limits would never be checked")


def check_retrieve_target(options) -> None:
    """Retrieve calls need the retrieval server: sent to --host (the ranking server) they would all
    be UNIMPLEMENTED and break the gate without saying why."""
    if options.retrieve_share > 0 and not options.retrieval_host:
        raise ValueError(f"--retrieve-share {options.retrieve_share:g} sends Retrieve calls, but no --retrieval-host "
                         f"is given (--host is the ranking server, which does not serve Retrieve): add "
                         f"--retrieval-host HOST:PORT of the retrieval server, or --retrieve-share 0 to load the "
                         f"ranking server alone")


@events.test_start.add_listener
def load_traffic(environment, **_kwargs) -> None:
    """Built when the run starts: in distributed mode a worker has the master's options by then."""
    global TRAFFIC, TRACER, CPU_AT_START
    if MASTER_RUN_TIME_S and isinstance(environment.runner, MasterRunner):
        log.info("run time limit set to %g s (this master ends it: the workers quit after their last calls and "
                 "stats)", MASTER_RUN_TIME_S)
        stop_timeout = float(environment.parsed_options.stop_timeout or 0)
        ending = gevent.spawn_later(MASTER_RUN_TIME_S, end_distributed_run, environment.runner, stop_timeout)
        ending.link_exception(greenlet_exception_logger(log))
    if isinstance(environment.runner, MasterRunner):
        gevent.spawn(watch_for_lost_workers, environment.runner).link_exception(greenlet_exception_logger(log))
    CPU_AT_START = CpuTimes.now()
    TRAFFIC = traffic = Traffic.from_options(environment.parsed_options)
    endpoint = getattr(environment.parsed_options, "otlp_endpoint", "")
    TRACER = tracing.tracer(tracing.tracer_provider("locust", endpoint), "locust") if endpoint else None
    options = environment.parsed_options
    pattern = f"zipf (exponent {options.zipf_exponent:g})" if traffic.user_weights else "uniform"
    log.info("traffic: %d users from %s, %s; Retrieve %.0f%%, Recommend generate %.0f%% / score %.0f%%; SLO %s",
             len(traffic.users), options.bundle, pattern, 100 * traffic.retrieve_share,
             100 * traffic.generate_share, 100 * (1 - traffic.generate_share), SLO.path if SLO else "none")


@events.init.add_listener
def gate_before_the_runner_quits(environment, **_kwargs) -> None:
    """Registers `slo_gate` on `quitting` now, after the runner's own listener, so it fires first (Locust fires
    `quitting` in reverse): an interrupted master's own listener quits its workers and stops listening 0.5 s
    later, so the stats a worker sends once its last calls are done (the slowest, up to --stop-timeout) were lost
    before the gate ran."""
    environment.events.quitting.add_listener(slo_gate)


def slo_gate(environment, **_kwargs) -> None:
    """The gate runs where the statistics are: the master, or the only process (not on workers). Before it, what
    the hypervisor took from this machine during the run: a limit broken on a VM that lost much of its CPU to
    other guests may be the host's doing, not the servers'."""
    if isinstance(environment.runner, WorkerRunner):
        return
    judged = getattr(environment, "slo_judged", None)
    if judged is not None:  # judged once: Locust may fire `quitting` twice (a master after its last worker quit; a
        judged.wait()  # SIGTERM while -t's end stops the users): the second waits for the verdict, or Locust exited
        return  # with its own code (0 without failures) while the first still waited for the calls
    environment.slo_judged = gevent.event.Event()
    if SLO is not None:
        environment.process_exit_code = EXIT_BROKEN  # fail closed until the gate gives its verdict
    try:
        options = environment.parsed_options
        if stop_users_first(environment.runner, float(getattr(options, "stop_timeout", 0) or 0)):
            rewrite_html_report(environment)
        log_machine_share(cpu_share(CPU_AT_START, CpuTimes.now()))
        missing_at_the_gate(environment.runner)
        if SLO is not None:
            gate(environment, SLO)
    finally:
        environment.slo_judged.set()


def rewrite_html_report(environment) -> None:
    """An interrupted run's --html report, written again with every call the gate judges: Locust writes it on
    Ctrl-C before the gate has waited for the calls still running (and on SIGTERM writes none)."""
    from locust.html import get_html_report, process_html_filename

    options = environment.parsed_options
    if not getattr(options, "html_file", None):
        return
    process_html_filename(options)
    write_atomically(Path(options.html_file), get_html_report(environment, show_download_link=False))
    log.info("HTML report written again after the interrupted run's last calls: %s", options.html_file)


def stop_users_first(runner, stop_timeout_s: float) -> bool:
    """A run stopped by SIGTERM or Ctrl-C quits with its users still calling: Locust fires `quitting` (this gate)
    before it stops them, so the gate judged the run without the calls still running, the slowest ones, which
    --stop-timeout is there to wait for. Stopping them here waits as -t's end does; a run interrupted while -t's
    end is stopping them waits for that stop (at most --stop-timeout); after -t they are stopped. True when the run
    was interrupted (it stopped or waited for them)."""
    if runner is None:
        return False
    if isinstance(runner, MasterRunner) and runner.state in (STATE_SPAWNING, STATE_RUNNING):
        # as -t's end does (`end_distributed_run`): a stop message would lose the workers' last stats (a worker
        # sends none on it) and leave them running until a heartbeat timeout (the master forgets stopped ones)
        log.info("the run was interrupted: telling %d worker(s) to quit (they finish their calls, at most "
                 "--stop-timeout, and send their final stats) before the SLO gate", tell_workers_to_quit(runner))
        deadline = time.monotonic() + stop_timeout_s + 60
        while runner.clients.all and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if runner.clients.all:
            note_workers_not_quit(runner, "judging")
        return True
    if runner.state in (STATE_SPAWNING, STATE_RUNNING):
        log.info("the run was interrupted: stopping the users (waiting up to --stop-timeout for the calls still "
                 "running) before the SLO gate")
        runner.stop()
        return True
    if isinstance(runner, MasterRunner) and not runner.clients.all:
        return False  # a master whose workers all quit has their final stats (it stays "stopping": no worker says so)
    if runner.state in (STATE_CLEANUP, STATE_STOPPING):
        log.info("the run was interrupted while its users stop: waiting for them (at most --stop-timeout, %gs) "
                 "before the SLO gate", stop_timeout_s)
        deadline = time.monotonic() + stop_timeout_s
        while runner.state in (STATE_CLEANUP, STATE_STOPPING) and time.monotonic() < deadline:
            gevent.sleep(0.1)  # the stop goes on in its own greenlet
        return True
    return False


def log_machine_share(share: dict[str, float]) -> None:
    if not share:
        return
    log.info("machine during the run: steal %.1f %% of its CPU (the hypervisor), other processes %.1f %% (the "
             "servers among them, when local)", share["steal_pct"], share["others_cpu_pct"])
    if share["steal_pct"] > DISTURBED_PCT:
        log.warning("the hypervisor took %.1f %% of this machine's CPU during the run: latencies, and any limit "
                    "broken, may be the host's doing, not the servers'", share["steal_pct"])


class RecsysCaller(GrpcUser):
    """An internal service asking for recommendations, one call after the other."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        pem_files = (options.grpc_tls_ca, options.grpc_tls_cert, options.grpc_tls_key)
        self.tls_ca, self.tls_cert, self.tls_key = (Path(p) if p else None for p in pem_files)
        self.traffic = TRAFFIC
        self.tracer = TRACER
        self.ranking = ranking_pb2_grpc.RankingServiceStub(self.channel(self.host))
        self.retrieval = (retrieval_pb2_grpc.RetrievalServiceStub(self.channel(self.traffic.retrieval_host))
                          if self.traffic.retrieval_host else None)

    def wait_time(self) -> float:
        mean = self.traffic.think_time_s
        return random.expovariate(1 / mean) if mean > 0 else 0.0

    @task
    def call(self) -> None:
        with self.rpc_errors_recorded():
            if self.retrieval is not None and random.random() < self.traffic.retrieve_share:
                self.retrieve()
            else:
                self.recommend()

    def recommend(self) -> None:
        generate = random.random() < self.traffic.generate_share
        mode = ranking_pb2.RANKING_MODE_GENERATE if generate else ranking_pb2.RANKING_MODE_SCORE
        request = ranking_pb2.RecommendRequest(user_id=self.traffic.user_id(), k=self.traffic.k, mode=mode,
                                               num_candidates=self.traffic.candidates, request_id=request_id())
        self.ranking.Recommend(request, timeout=self.traffic.deadlines_s[MODES[mode]])

    def retrieve(self) -> None:
        request = retrieval_pb2.RetrieveRequest(user_id=self.traffic.user_id(), k=self.traffic.retrieve_k,
                                                request_id=request_id())
        for _ in self.retrieval.Retrieve(request, timeout=self.traffic.deadlines_s["retrieve"]):
            pass

    def request_name(self, method: str, request) -> str:
        return f"{method}/{MODES[request.mode]}" if method == "Recommend" else method

    def response_failure(self, method: str, response) -> Exception | None:
        if method == "Recommend" and response.degraded and not self.traffic.degraded_ok:
            return DegradedAnswer(response.degraded_reason or "no reason given")
        return None


class DegradedAnswer(Exception):
    """The ranking server answered by the linear term (LLM skipped): a failure for the SLO gate."""


def request_id() -> str:
    return f"locust-{uuid.uuid4().hex[:16]}"
