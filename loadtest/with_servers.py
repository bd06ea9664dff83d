"""`python -m loadtest.with_servers --bundle DIR -- COMMAND ...`: run COMMAND while both tiers serve.

Starts the retrieval server, then the ranking server pointed at it (each on a free loopback port,
waiting for health SERVING), runs COMMAND with `{ranking}` and `{retrieval}` in its arguments
replaced by the servers' HOST:PORT, stops both with SIGTERM (they drain and exit 0) and exits with
COMMAND's exit code. Interrupted (Ctrl-C, or SIGTERM from a CI timeout), it lets COMMAND finish what it
does on SIGINT (Locust: the SLO gate and its reports) before stopping the servers. `make loadtest` runs Locust this way:

    python -m loadtest.with_servers --bundle bundle -- locust -f loadtest/locustfile.py --headless \\
        --host {ranking} --retrieval-host {retrieval} --bundle bundle --slo loadtest/slo/cpu.toml -u 2 -r 2 -t 3m
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.servers import ServerProcess

log = logging.getLogger("with_servers")


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


@contextlib.contextmanager
def two_tier(config: TwoTierConfig) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(retrieval, ranking) servers, both SERVING; stopped (SIGTERM, drained) on exit."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    retrieval = ServerProcess("retrieval_server", ["--bundle", str(config.bundle), *config.retrieval_args.split()],
                              log_path=config.log_dir / "retrieval_server.log")
    ranking = ServerProcess("ranking_server", ["--bundle", str(config.bundle), "--retrieval", retrieval.target,
                                               *config.ranking_args.split()],
                            log_path=config.log_dir / "ranking_server.log")
    started: list[ServerProcess] = []
    try:
        for server in (retrieval, ranking):
            seconds = _start(server, config.startup_timeout)
            started.append(server)
            log.info("%s SERVING on %s after %.1f s (log: %s)", server.module, server.target, seconds, server.log_path)
        yield retrieval, ranking
    finally:
        for server in reversed(started):  # each one, whatever the other did: none is left running
            try:
                code = server.stop()
            except RuntimeError as e:  # it did not drain in time and was killed
                log.warning("%s", e)
                continue
            (log.info if code == 0 else log.warning)("%s stopped, exit code %d", server.module, code)


def _start(server: ServerProcess, timeout: float) -> float:
    began = time.perf_counter()
    server.start(timeout)
    return time.perf_counter() - began


COMMAND_GRACE_S = 150.0  # an interrupted command's time to finish (Locust: --stop-timeout 120, then its reports)


def run(config: TwoTierConfig, command: Sequence[str]) -> int:
    with two_tier(config) as (retrieval, ranking):
        argv = [arg.replace("{ranking}", ranking.target).replace("{retrieval}", retrieval.target) for arg in command]
        log.info("running: %s", " ".join(argv))
        child = subprocess.Popen(argv)
        try:
            return child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the command has its SIGINT already
            _wait_for_command(child, signal_first=None)
            raise
        finally:  # SIGTERM to this process alone: the command is interrupted as Ctrl-C would, before its servers go
            if child.poll() is None:
                _wait_for_command(child, signal_first=signal.SIGINT)


def _wait_for_command(child: subprocess.Popen, signal_first: int | None) -> None:
    """Lets an interrupted command finish what it does on SIGINT (Locust: its gate, CSV and HTML reports)
    within COMMAND_GRACE_S; then SIGTERM, then SIGKILL."""
    if signal_first is not None:
        child.send_signal(signal_first)
    log.info("waiting up to %.0f s for the interrupted command to finish", COMMAND_GRACE_S)
    try:
        child.wait(COMMAND_GRACE_S)
        return
    except subprocess.TimeoutExpired:
        log.warning("the command did not exit within %.0f s of its interrupt: terminating it", COMMAND_GRACE_S)
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


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
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # SIGTERM (a CI timeout, `timeout 10m make loadtest`) unwinds like Ctrl-C, so both servers are stopped
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        code = run(build_config(TwoTierConfig, args), command)
    except (RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted (Ctrl-C): the command finished its reports, both servers are stopped")
        return 128 + signal.SIGINT
    log.info("command exited with %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
