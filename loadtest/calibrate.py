"""`python -m loadtest calibrate`: measure this machine and write an SLO file sized to it.

    python -m loadtest calibrate --bundle bundle --out loadtest/slo/this-machine.toml
    python -m loadtest calibrate --ranking HOST:PORT --retrieval HOST:PORT --bundle bundle --out FILE

Runs the documented load (loadtest/slo/cpu.toml's: the locustfile's default mix, -u 2, closed
loop) against running servers, or against both tiers started on `--bundle` (loadtest.with_servers'
`two_tier`) when no `--ranking` is given; reads Locust's percentiles per request name from its CSV;
and writes an SLO TOML (the format loadtest/slo.py reads) whose limits are the measured values
times a stated margin: by default 1.5x p50 and p95 and 2x p99, with a floor (`--floor-ms`) so
millisecond RPCs are not gated on scheduling noise. A run that failed more calls than the error
budget writes nothing (its fast failures would set the limits). The file's comments say the machine, date,
load and margins. A gate with these limits breaks on a 2x slowdown (tests/loadtest/test_calibrate.py).
Measure on the machine and load the gate will run under; measure long enough that p99 is not one call.
"""

from __future__ import annotations

import csv
import datetime
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.servers import REPO
from loadtest.with_servers import split_flags
from palr.bundle import write_atomically

log = logging.getLogger("calibrate")

PERCENTILES = (50, 95, 99)
TOTAL = "Aggregated"


@dataclass
class CalibrateConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle the servers serve", "metavar": "DIR"})
    out: Path = field(default=Path("reports/slo-calibrated.toml"), metadata={
        "help": "SLO file to write", "metavar": "TOML"})
    work_dir: Path = field(default=Path("reports/calibrate"), metadata={
        "help": "where Locust's CSVs (<out's name>_stats.csv, ...) and the servers' logs go: not beside --out, which "
                "may be the repository's loadtest/slo/", "metavar": "DIR"})
    ranking: str = field(default="", metadata={
        "help": "a running ranking server; empty: start both tiers on --bundle", "metavar": "HOST:PORT"})
    retrieval: str = field(default="", metadata={
        "help": "a running retrieval server (with --ranking)", "metavar": "HOST:PORT"})
    users: int = field(default=2, metadata={"help": "Locust users (-u), closed loop"})
    duration: str = field(default="3m", metadata={"help": "Locust run time (-t)"})
    margin_p50: float = field(default=1.5, metadata={"help": "limit = measured p50 x this"})
    margin_p95: float = field(default=1.5, metadata={"help": "limit = measured p95 x this"})
    margin_p99: float = field(default=2.0, metadata={"help": "limit = measured p99 x this"})
    floor_ms: float = field(default=0.0, metadata={
        "help": "every limit is at least this many milliseconds, so millisecond RPCs are not gated on scheduling "
                "noise (0: only the 1 ms minimum)"})
    max_error_rate: float = field(default=0.01, metadata={"help": "error budget per RPC and overall"})
    locust_args: str = field(default="", metadata={
        "help": "extra locustfile flags, one string (e.g. '--k 3 --candidates 6')", "metavar": "FLAGS"})
    ranking_args: str = field(default="--answer-cache-size 0", metadata={
        "help": "extra ranking_server flags (when starting them); the default turns the answer cache off so the "
                "limits measure the model: Locust's callers repeat users far more often than real traffic, and an "
                "exact repeat is answered without it", "metavar": "FLAGS"})

    def __post_init__(self) -> None:
        for name in ("locust_args", "ranking_args"):  # refused now, not after the servers start
            split_flags(name, getattr(self, name))
        if bool(self.ranking) != bool(self.retrieval):  # --retrieval alone: it started its own pair and measured those
            raise ValueError("--ranking and --retrieval go together (both: running servers, the load includes "
                             "Retrieve calls; neither: start both on --bundle)")

    @property
    def margins(self) -> dict[int, float]:
        return {50: self.margin_p50, 95: self.margin_p95, 99: self.margin_p99}


def read_stats(csv_path: Path) -> dict[str, dict]:
    """Locust's <prefix>_stats.csv → {name: {"requests", "failures", 50, 95, 99}} (ms)."""
    rows = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                 **{p: float(row[f"{p}%"]) for p in PERCENTILES if row.get(f"{p}%") not in (None, "N/A")}}
    return rows


def over_budget(stats: dict[str, dict], budget: float) -> list[str]:
    """'NAME: F of N failed' for each request name whose failure rate is above `budget`."""
    return [f"{name}: {row['failures']} of {row['requests']} failed" for name, row in stats.items()
            if name != TOTAL and row["requests"] and row["failures"] / row["requests"] > budget]


def limit_ms(measured: float, margin: float, floor: float) -> float:
    """measured x margin, rounded up to 2 significant digits (Locust's own precision), at least floor."""
    value = max(measured * margin, floor, 1.0)
    digits = 10 ** max(math.floor(math.log10(value)) - 1, 0)
    return float(math.ceil(value / digits) * digits)


def slo_toml(stats: dict[str, dict], config: CalibrateConfig, load: str) -> str:
    """The SLO file for `stats` (one Locust run) with `config`'s margins."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    margins = ", ".join(f"{m:g}x p{p}" for p, m in config.margins.items())
    lines = [f"# SLO profile calibrated by `python -m loadtest calibrate` on {now}.",
             f"# Machine: {machine}; load average at the end {os.getloadavg()[0]:.1f}.",
             f"# Load: {load}",
             f"# Margin: limit = measured x ({margins}), rounded up to 2 significant digits"
             + (f", at least {config.floor_ms:g} ms" if config.floor_ms else "") + ";",
             f"# error budget {config.max_error_rate:g}. Measured (ms):"]
    for name, row in stats.items():
        if name != TOTAL:
            lines.append(f"#   {name:<20} " + "  ".join(f"p{p} {row.get(p, float('nan')):g}" for p in PERCENTILES)
                         + f"  ({row['requests']} calls, {row['failures']} failed)")
    lines += ["", f'description = "calibrated on {platform.node()} {now}: {margins}"', "measured = true",
              f"max_error_rate = {config.max_error_rate:g}"]
    for name, row in stats.items():
        if name == TOTAL or not row["requests"] or not all(p in row for p in PERCENTILES):
            continue
        lines += ["", f'[rpc."{name}"]']
        lines += [f"p{p}_ms = {limit_ms(row[p], config.margins[p], config.floor_ms):g}" for p in PERCENTILES]
        lines.append(f"max_error_rate = {config.max_error_rate:g}")
    return "\n".join(lines) + "\n"


def run_locust(ranking: str, retrieval: str, config: CalibrateConfig, csv_prefix: Path,
               slo: Path | None = None) -> subprocess.CompletedProcess:
    """The documented load against the two servers (gated by `slo` when given)."""
    return subprocess.run(locust_argv(ranking, retrieval, config, csv_prefix, slo), cwd=REPO, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def locust_argv(ranking: str, retrieval: str, config: CalibrateConfig, csv_prefix: Path,
                slo: Path | None = None) -> list[str]:
    """Locust's command line. It runs in the repository, so every path it is given is absolute (relative ones
    would be read from there, not from the caller's directory); `--locust-args` is split as a shell would."""
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
            "--host", ranking, "--retrieval-host", retrieval, "--bundle", str(Path(config.bundle).resolve()),
            "-u", str(config.users), "-r", str(config.users), "-t", config.duration, "--stop-timeout", "120",
            "--csv", str(Path(csv_prefix).resolve()), "--only-summary", *split_flags("locust_args", config.locust_args)]
    if slo is not None:
        argv += ["--slo", str(Path(slo).resolve())]
    return argv


def task_exceptions(exceptions_csv: Path) -> list[str]:
    """"COUNTx MESSAGE" of each row of Locust's exceptions CSV (Count, Message, Traceback, Nodes); [] without one."""
    if not exceptions_csv.exists():
        return []
    with exceptions_csv.open(newline="") as f:
        return [f"{row['Count']}x {row['Message']}" for row in csv.DictReader(f)]


def calibrate(config: CalibrateConfig) -> Path:
    """Measures and writes `config.out`; returns its path."""
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    csv_prefix = config.work_dir / config.out.stem
    load = f"locustfile default mix, -u {config.users} -t {config.duration} {config.locust_args}".strip()
    stats_csv, exceptions_csv = Path(f"{csv_prefix}_stats.csv"), Path(f"{csv_prefix}_exceptions.csv")
    for stale in (stats_csv, exceptions_csv):  # an earlier run's: Locust writes them once its options were accepted
        stale.unlink(missing_ok=True)
    if config.ranking:
        run = run_locust(config.ranking, config.retrieval, config, csv_prefix)
    else:
        from loadtest.with_servers import TwoTierConfig, two_tier

        with two_tier(TwoTierConfig(bundle=config.bundle, log_dir=config.work_dir,
                                    ranking_args=config.ranking_args)) as (retrieval, ranking):
            run = run_locust(ranking.target, retrieval.target, config, csv_prefix)
    if run.returncode not in (0, 1):  # 1: some calls failed (judged against the error budget below); else a crash
        raise RuntimeError(f"Locust exited {run.returncode} (refused options or crashed); nothing written:\n"
                           f"{run.stdout[-3000:]}")
    if not stats_csv.exists():
        raise RuntimeError(f"Locust wrote no statistics (exit {run.returncode}):\n{run.stdout[-3000:]}")
    raised = task_exceptions(exceptions_csv)
    if raised:  # Locust's exit 1 covers these too: the load test's own code failed, so its calls were not made
        raise RuntimeError(f"the load test's task code raised ({'; '.join(raised)}): the calls it meant to make were "
                           f"not made, so its statistics measure another load; nothing written")
    stats = read_stats(stats_csv)
    if not stats.get(TOTAL, {}).get("requests"):
        raise RuntimeError(f"the calibration run recorded no requests:\n{run.stdout[-3000:]}")
    failing = over_budget(stats, config.max_error_rate)
    if failing:
        raise RuntimeError(f"the calibration run failed more calls than the error budget ({config.max_error_rate:.2%}) "
                           f"allows: {'; '.join(failing)}. Limits measured on failing calls would gate a broken "
                           f"server; nothing written (Locust's failures:\n{run.stdout[-3000:]})")
    write_atomically(config.out, slo_toml(stats, config, load))  # a cut-short TOML can parse with fewer limits
    log.info("wrote %s from %d requests", config.out, stats[TOTAL]["requests"])
    return config.out


def main(argv: list[str] | None = None) -> int:
    from palr.cli import config_main

    return config_main(argv, "python -m loadtest calibrate", __doc__, CalibrateConfig,
                       lambda config: print(calibrate(config)), (RuntimeError, TimeoutError), "calibration failed")
