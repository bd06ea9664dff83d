"""`python -m loadtest.with_servers --bundle DIR -- COMMAND ...`: run COMMAND while both tiers serve.

Starts the retrieval server, then the ranking server pointed at it (each on a free loopback port,
waiting for health SERVING), runs COMMAND with `{ranking}` and `{retrieval}` in its arguments
replaced by the servers' HOST:PORT, stops both with SIGTERM (they drain and exit 0) and exits with
COMMAND's exit code (or EXIT_SERVER_STOP, 4, when COMMAND passed but a server did not drain and exit 0: a
shutdown that loses requests is a failure too). The servers and COMMAND run in their own sessions, so an interrupt (Ctrl-C, a CI
timeout's SIGTERM to the process group, a closed terminal's SIGHUP) reaches with_servers alone: it
passes exactly one SIGINT to COMMAND (Locust then runs its SLO gate and writes its reports), waits for
it while both servers keep serving, then stops them; a second interrupt stops COMMAND at once. `make loadtest` runs Locust this way
(the ranking server's answer cache off, so the SLO limits measure the model: Locust's callers repeat users far more
often than real traffic; --stop-timeout so the calls running at -t's end are counted):

    python -m loadtest.with_servers --bundle bundle --ranking-args "--answer-cache-size 0" -- \\
        locust -f loadtest/locustfile.py --headless --host {ranking} --retrieval-host {retrieval} --bundle bundle \\
        --slo loadtest/slo/cpu.toml -u 2 -r 2 -t 3m --stop-timeout 120 --csv reports/locust --html reports/locust.html
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.servers import ServerProcess, stop_all

log = logging.getLogger("with_servers")
EXIT_SERVER_STOP = 4  # the command passed, a server's stop did not (distinct from Locust's 1, 2 and the gate's 3)


@dataclass
class TwoTierConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle both servers serve", "metavar": "DIR"})
    log_dir: Path = field(default=Path("reports"), metadata={
        "help": "where the servers' logs go (retrieval_server.log, ranking_server.log)", "metavar": "DIR"})
    startup_timeout: float = field(default=600.0, metadata={"help": "seconds each server may take to be SERVING"})
    retrieval_args: str = field(default="", metadata={
        "help": "extra retrieval_server flags, one string (e.g. '--threads 1')", "metavar": "FLAGS"})
    ranking_args: str = field(default="", metadata={
        "help": "extra ranking_server flags, one string (e.g. '--max-batch-size 8')", "metavar": "FLAGS"})

    def __post_init__(self) -> None:
        for name in ("retrieval_args", "ranking_args"):  # refused before any server starts
            split_flags(name, getattr(self, name))


def split_flags(name: str, flags: str) -> list[str]:
    """A config's one-string flags option split as a shell would; ValueError naming `--name` (unbalanced quotes)."""
    try:
        return shlex.split(flags)
    except ValueError as e:
        raise ValueError(f"--{name.replace('_', '-')}: {e}") from None


@contextlib.contextmanager
def two_tier(config: TwoTierConfig, own_session: bool = False) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(retrieval, ranking) servers, both SERVING; stopped (SIGTERM, drained) on exit. `own_session`: the
    terminal's signals do not reach them (the caller stops them)."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    retrieval_args, ranking_args = (split_flags("retrieval_args", config.retrieval_args),
                                    split_flags("ranking_args", config.ranking_args))
    launched: list[ServerProcess] = []  # each one from the moment it is started: one still starting is stopped too
    try:
        retrieval = _start(ServerProcess("retrieval_server", ["--bundle", str(config.bundle), *retrieval_args],
                                         log_path=config.log_dir / "retrieval_server.log", own_session=own_session),
                           launched, config.startup_timeout)
        ranking = _start(ServerProcess("ranking_server", ["--bundle", str(config.bundle), "--retrieval",
                                                          retrieval.target, *ranking_args],
                                       log_path=config.log_dir / "ranking_server.log", own_session=own_session),
                         launched, config.startup_timeout)
        yield retrieval, ranking
    finally:
        stop_all(reversed(launched))


def _start(server: ServerProcess, launched: list[ServerProcess], timeout: float) -> ServerProcess:
    """Starts `server` (in `launched` from the moment it is started) and waits until it is SERVING."""
    launched.append(server)
    began = time.perf_counter()
    server.start(timeout)
    log.info("%s SERVING on %s after %.1f s (log: %s)", server.module, server.target, time.perf_counter() - began,
             server.log_path)
    return server


COMMAND_GRACE_S = 150.0  # an interrupted command's time to finish (Locust: up to --stop-timeout 120, reports)


class Interrupted(Exception):
    """SIGTERM (a CI timeout) or SIGHUP (a closed terminal) reached with_servers."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def interrupt_signal(interrupt: KeyboardInterrupt | Interrupted) -> int:
    """The signal behind an interrupt: Ctrl-C's SIGINT, or the one `Interrupted` carries."""
    return interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT


def run(config: TwoTierConfig, command: Sequence[str]) -> int:
    with two_tier(config, own_session=True) as servers:
        retrieval, ranking = servers
        argv = [arg.replace("{ranking}", ranking.target).replace("{retrieval}", retrieval.target) for arg in command]
        log.info("running: %s", " ".join(argv))
        with _recorded(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
            child = subprocess.Popen(argv, start_new_session=True)
            try:
                code = _wait(child, received)
            finally:  # not finished (timed out, or a second interrupt): it goes, before the servers it was using
                if child.poll() is None:
                    _stop(child)
    return code or server_stop_code(servers)


def server_stop_code(servers: Sequence[ServerProcess]) -> int:
    """EXIT_SERVER_STOP when a server exited other than 0 at its SIGTERM (or was killed for not draining in time),
    logged; else 0."""
    failed = {server.module: server.process.returncode for server in servers
              if server.process is not None and server.process.returncode != 0}
    if failed:
        log.error("the command passed, but %s did not drain and exit 0 at SIGTERM (see their logs): exit %d",
                  ", ".join(f"{module} (exit code {code})" for module, code in failed.items()), EXIT_SERVER_STOP)
        return EXIT_SERVER_STOP
    return 0


@contextlib.contextmanager
def _recorded(*signums: int) -> Iterator[list[int]]:
    """While the command runs, `signums` are recorded (in the list yielded), not raised, by a handler installed
    here: with_servers started with SIGINT ignored (a background job of a script) has no KeyboardInterrupt of
    Python's, and it waited out the command on Ctrl-C; and one that arrives while the command is being started is
    handled like any other (raised there, it would escape before the command was passed its SIGINT)."""
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in signums}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(child: subprocess.Popen, received: list[int]) -> int:
    """The command's exit code; after an interrupt (`received`), the command is passed one SIGINT and given
    COMMAND_GRACE_S to finish (its reports) while the servers keep serving, a second interrupt ends the wait:
    128 + the first interrupt's signal."""
    while _poll(child) is None and not received:
        pass
    if not received:
        return child.returncode
    signum = received[0]
    log.warning("%s: passing SIGINT to the command, waiting up to %.0f s for it to finish (its reports); "
                "the servers keep serving meanwhile; interrupt again to stop it at once",
                signal.Signals(signum).name, COMMAND_GRACE_S)
    child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + COMMAND_GRACE_S
    while _poll(child) is None:
        if len(received) > 1:
            return 128 + signum
        if time.monotonic() > deadline:
            log.warning("the command did not finish within %.0f s of its SIGINT", COMMAND_GRACE_S)
            return 128 + signum
    log.info("the interrupted command exited with %d", child.returncode)
    return 128 + signum


def _poll(child: subprocess.Popen, seconds: float = 0.1) -> int | None:
    """The command's exit code, waiting up to `seconds` for it; None while it runs."""
    try:
        return child.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _stop(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    log.warning("the command was stopped (exit %d)", child.returncode)


def main(argv: list[str] | None = None) -> int:
    from palr.cli import LOG_FORMAT, add_config_arguments, build_config

    parser = argparse.ArgumentParser(prog="python -m loadtest.with_servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, TwoTierConfig)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if shutil.which(command[0]) is None:  # before the servers' minutes of start-up, not after
        parser.error(f"command not found: {command[0]!r}")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # SIGTERM (a CI timeout, `timeout 10m make loadtest`) and SIGHUP are handled like Ctrl-C (see `run`); SIGINT
    # gets the same handler, so one started with SIGINT ignored (a script's background job, where Python installs
    # no KeyboardInterrupt) still stops on `kill -INT` while its servers start or stop
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    try:
        config = build_config(TwoTierConfig, args)
    except ValueError as e:
        parser.error(str(e))
    try:
        code = run(config, command)
    except (RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:  # while the servers were starting or stopping
        signum = interrupt_signal(e)
        log.warning("interrupted (%s); the servers that had started are stopped", signal.Signals(signum).name)
        return 128 + signum
    log.info("command exited with %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
