"""Latency SLO gates for Locust runs: a TOML profile per target, checked when the run ends.

A profile (see loadtest/slo/cpu.toml):

    description = "embedded default: hf engine on 2 CPU cores, -u 2"
    measured = true            # false: limits derived on paper, not yet measured on the target
    max_error_rate = 0.01      # over all requests (Locust's "Aggregated" row)

    [rpc."Recommend/score"]    # a Locust request name (grpc_user.GrpcUser.request_name)
    p50_ms = 2500
    p95_ms = 4000
    p99_ms = 5000
    max_error_rate = 0.01

Measured values are Locust's own statistics (the numbers in its CSV/HTML reports, aggregated over
workers in distributed mode): percentiles over all requests of that name, failed ones included,
from Locust's response-time buckets (2 significant digits, so within ~5 %). A limit is broken
when the measured value is above it. Failed requests are in the percentiles (a server refusing calls in
1 ms meets every latency limit), so an RPC without a `max_error_rate` of its own is held to the profile's,
and where the profile sets none either, to 0: no failure allowed, as Locust's own exit code does without
a gate. So is a request name the profile does not list (a profile for score calls still fails a run whose
Retrieve calls all failed). An RPC that got no requests is reported and not checked; a
run with no requests at all breaks the gate, and so does one whose task code raised (Locust's
"exceptions" table: a bug in the load test means the calls it meant to make were not made).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("slo")

PERCENTILE_KEY = re.compile(r"^p(\d{1,2})_ms$")
TOTAL = "Aggregated"  # Locust's name for the row over all requests
EXIT_BROKEN = 3       # distinct from Locust's own codes (1: failures without a gate, 2: crashes)


class SloError(ValueError):
    """An SLO file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class RpcSlo:
    name: str
    percentiles_ms: dict[int, float] = field(default_factory=dict)  # percentile → limit
    max_error_rate: float | None = None


@dataclass(frozen=True)
class SloProfile:
    path: Path
    description: str
    measured: bool
    max_error_rate: float | None
    rpcs: tuple[RpcSlo, ...]

    @classmethod
    def load(cls, path: str | Path) -> "SloProfile":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SloError(f"{path}: {e}") from e
        _no_unknown_keys(path, "", data, {"description", "measured", "max_error_rate", "rpc"})
        rpcs = data.get("rpc", {})
        if not isinstance(rpcs, dict) or not rpcs:
            raise SloError(f"{path}: no [rpc.NAME] table; nothing to gate")
        measured = data.get("measured", True)
        if not isinstance(measured, bool):  # bool("false") is True
            raise SloError(f"{path}: measured must be true or false (unquoted), got {measured!r}")
        budget = _rate(path, "max_error_rate", data.get("max_error_rate"))
        # an RPC without a budget of its own gets the profile's, or none at all allowed (else an RPC failing every
        # call in a millisecond passes its latency limits, and a small one hides in the aggregate's budget)
        rpc_slos = tuple(_rpc(path, name, table, default_error_rate(budget)) for name, table in rpcs.items())
        return cls(path, str(data.get("description", "")), measured, budget, rpc_slos)


def default_error_rate(profile_budget: float | None) -> float:
    """The error rate a request without a budget of its own is held to: the profile's, or 0 where it sets none."""
    return 0.0 if profile_budget is None else profile_budget


def _no_unknown_keys(path: Path, where: str, table: dict, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SloError(f"{path}: unknown key(s) {unknown}{' in ' + where if where else ''}; "
                       f"allowed: {sorted(allowed)}")


def _rate(path: Path, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # true is an int 1
        raise SloError(f"{path}: {key} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _rpc(path: Path, name: str, table: Any, default_error_rate: float) -> RpcSlo:
    where = f"[rpc.{name!r}]"
    if not isinstance(table, dict):
        raise SloError(f"{path}: {where} must be a table")
    limits = {}
    for key, value in table.items():
        match = PERCENTILE_KEY.match(key)
        if key == "max_error_rate":
            continue
        if not match:
            raise SloError(f"{path}: unknown key {key!r} in {where}; use pNN_ms (e.g. p95_ms) or max_error_rate")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise SloError(f"{path}: {where} {key} must be a positive number of milliseconds, got {value!r}")
        limits[int(match.group(1))] = float(value)
    own = _rate(path, f"{where} max_error_rate", table.get("max_error_rate"))
    return RpcSlo(name, dict(sorted(limits.items())), default_error_rate if own is None else own)


@dataclass(frozen=True)
class Check:
    """One limit compared with its measurement."""

    rpc: str
    what: str          # "p95" or "error rate"
    measured: float
    limit: float
    requests: int

    @property
    def broken(self) -> bool:
        return self.measured > self.limit

    def line(self) -> str:
        unit = (lambda v: f"{v:.2%}") if self.what == "error rate" else (lambda v: f"{v:g} ms")
        verdict = "BROKEN" if self.broken else "ok"
        return (f"{verdict:>6}  {self.rpc} {self.what}: measured {unit(self.measured)}, limit {unit(self.limit)} "
                f"({self.requests} requests)")


def evaluate(profile: SloProfile, stats) -> tuple[list[Check], list[str]]:
    """Every limit of `profile` against Locust's `RequestStats`, and the error rate of every request name it does
    not list against its budget (0 where it sets none); also the listed RPCs that got no requests."""
    entries: dict[str, list] = {}
    for entry in stats.entries.values():
        entries.setdefault(entry.name, []).append(entry)
    checks, unexercised = [], []
    for rpc in profile.rpcs:
        rows = entries.get(rpc.name, [])
        requests = sum(e.num_requests for e in rows)
        if not requests:
            unexercised.append(rpc.name)
            continue
        entry = _one_entry(rows)
        for p, limit in rpc.percentiles_ms.items():
            checks.append(Check(rpc.name, f"p{p}", float(entry.get_response_time_percentile(p / 100)), limit, requests))
        if rpc.max_error_rate is not None:
            checks.append(Check(rpc.name, "error rate", entry.fail_ratio, rpc.max_error_rate, requests))
    listed = {rpc.name for rpc in profile.rpcs}
    for name, rows in sorted(entries.items()):  # the requests no [rpc.NAME] names: held to the profile's budget
        requests = sum(e.num_requests for e in rows)
        if name not in listed and name != TOTAL and requests:
            checks.append(Check(name, "error rate", _one_entry(rows).fail_ratio,
                                default_error_rate(profile.max_error_rate), requests))
    total = stats.total
    if profile.max_error_rate is not None and total.num_requests:
        checks.append(Check(TOTAL, "error rate", total.fail_ratio, profile.max_error_rate, total.num_requests))
    return checks, unexercised


def _one_entry(rows: list):
    """The stats of one request name: its entry, or one merged over the request types it was recorded under."""
    return rows[0] if len(rows) == 1 else _merged(rows)


def _merged(rows: list):
    """One entry over the same name under several request types."""
    from locust.stats import StatsEntry

    merged = StatsEntry(rows[0].stats, rows[0].name, "", use_response_times_cache=False)
    for row in rows:
        merged.extend(row)
    return merged


def gate(environment, profile: SloProfile) -> bool:
    """Logs every check and sets Locust's exit code: EXIT_BROKEN when any SLO is broken, else 0 (so
    failures within the error budget do not fail the run). Returns True when the gate passed."""
    from locust import log as locust_log

    checks, unexercised = evaluate(profile, environment.stats)
    empty = not environment.stats.total.num_requests
    raised = task_exceptions(environment.runner)
    crashed = locust_log.unhandled_greenlet_exception  # Locust's own exit-2 rule, which our exit code would hide
    incomplete = sorted(getattr(environment, "incomplete_run", ()))  # a distributed run's lost workers (locustfile)
    broken = [c for c in checks if c.broken]
    log.info("SLO gate %s%s", profile.path, "" if profile.measured else
             " (limits derived on paper, not yet measured on this target)")
    for check in checks:
        (log.error if check.broken else log.info)("%s", check.line())
    for name in unexercised:
        log.warning("  skip  %s: no requests in this run, not checked", name)
    if raised:
        log.error("SLO gate BROKEN: the load test's task code raised %d time(s), so calls it meant to make were not "
                  "made: %s", sum(count for count, _ in raised), "; ".join(f"{count}x {msg}" for count, msg in raised))
    if crashed:
        log.error("SLO gate BROKEN: Locust logged an unhandled exception (an event listener or greenlet failed; see "
                  "its traceback above), so the run may not have done what it was set to")
    if incomplete:
        log.error("SLO gate BROKEN: the run's statistics are incomplete, so the load it was set to apply was not "
                  "all measured: %s", "; ".join(incomplete))
    if empty:
        log.error("SLO gate BROKEN: the run recorded no requests at all")
    elif broken:
        log.error("SLO gate BROKEN: %d of %d limits exceeded: %s", len(broken), len(checks),
                  "; ".join(f"{c.rpc} {c.what} {c.measured:g} > {c.limit:g}" for c in broken))
    elif not (raised or crashed or incomplete):
        log.info("SLO gate passed: %d limits held", len(checks))
    passed = not (empty or broken or raised or crashed or incomplete)
    environment.process_exit_code = 0 if passed else EXIT_BROKEN
    return passed


def task_exceptions(runner) -> list[tuple[int, str]]:
    """(occurrences, message) of each distinct exception the task code raised: gRPC errors are not among
    them (they are failed requests, see grpc_user.rpc_errors_recorded), so these are bugs."""
    if runner is None:
        return []
    return [(row["count"], f"{row['msg']} at `{_last_line(row['traceback'])}`") for row in runner.exceptions.values()]


def _last_line(traceback: str) -> str:
    """The code line a formatted traceback ends at (not the ~~~^^^ marker line Python 3.11+ adds under it)."""
    lines = [line.strip() for line in traceback.splitlines() if line.strip() and set(line.strip()) - set("~^")]
    return lines[-1] if lines else "?"
