"""What every benchmark report carries: percentiles, the machine it ran on, JSON + Markdown files."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from palr.bundle import package_versions, write_atomically


def percentiles_ms(seconds: Sequence[float], points: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Percentiles in ms of latencies in seconds; NaN for each when there are none (a cell whose every call
    failed), so the report is written and says so instead of the run failing at its end."""
    if not len(seconds):
        return {f"p{p}_ms": float("nan") for p in points}
    values = np.asarray(seconds) * 1e3
    return {f"p{p}_ms": round(float(np.percentile(values, p)), 3) for p in points}


def machine_info() -> dict[str, Any]:
    """Where and when; the load average tells a reader whether the machine was busy."""
    return {"host": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "packages": package_versions()}


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far (/proc/stat, every CPU, in seconds) and this process's own."""

    total_s: float  # every state, idle included
    busy_s: float   # user, nice, system, irq, softirq: running something
    steal_s: float  # the hypervisor ran another guest while this machine had work (a VM's noisy neighbour)
    own_s: float    # this process's user + system time, every thread

    @classmethod
    def now(cls) -> "CpuTimes | None":
        """None where /proc/stat is not there (not Linux)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        if fields[:1] != ["cpu"] or len(fields) < 9:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        tick, own = os.sysconf("SC_CLK_TCK"), os.times()
        return cls(total_s=sum(int(x) for x in fields[1:9]) / tick,
                   busy_s=(user + nice + system + irq + softirq) / tick, steal_s=steal / tick,
                   own_s=own.user + own.system)


MIN_SHARE_CPU_S = 0.5  # CPU time (every CPU) an interval needs for its shares: 50 ticks, a 2 % resolution


def cpu_share(before: CpuTimes | None, after: CpuTimes | None) -> dict[str, float]:
    """What else had the machine between two readings, as % of all its CPU time: `steal_pct` (taken by the
    hypervisor) and `others_cpu_pct` (other processes). A cell with either well above 0 was measured on a
    machine shared with something else; its latencies and any ratio taken from it say so. {} off Linux, and
    for an interval under MIN_SHARE_CPU_S of CPU time: /proc/stat counts in clock ticks (10 ms), so a cell of a
    few milliseconds read as 0, 33 or 50 % (or nothing) by chance."""
    if before is None or after is None:
        return {}
    total = after.total_s - before.total_s
    if total < MIN_SHARE_CPU_S:
        return {}
    others = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s))
    return {"steal_pct": round(100 * (after.steal_s - before.steal_s) / total, 1),
            "others_cpu_pct": round(100 * others / total, 1)}


DISTURBED_PCT = 5.0  # a cell whose machine was this much busy with something else is named in the report
CPU_SHARE_KEYS = ("steal_pct", "others_cpu_pct")


def answered(summary: dict) -> bool:
    """Whether a cell's round answered anything: one that answered nothing has NaN percentiles and 0 throughput,
    and gives none of a cell's medians or spreads."""
    return math.isfinite(summary.get("p50_ms", 0.0))


def disturbed(summary: dict) -> bool:
    """Whether a cell's machine had more than DISTURBED_PCT of its CPU taken by steal or other processes."""
    return any(summary.get(k, 0.0) > DISTURBED_PCT for k in CPU_SHARE_KEYS)


def disturbance(cells: Sequence[tuple[str, dict]]) -> str:
    """One sentence for a report: the most CPU that steal and other processes took during any (name, summary)
    cell, and which cells went over DISTURBED_PCT (their latencies, and ratios taken from them, are suspect)."""
    measured = [(name, summary) for name, summary in cells if any(k in summary for k in CPU_SHARE_KEYS)]
    if not measured:
        return ("CPU taken by other work during the cells: not measured (no /proc/stat, or cells shorter than "
                f"{MIN_SHARE_CPU_S:g} s of CPU time, which its clock ticks cannot resolve).")
    top = {k: max(summary.get(k, 0.0) for _, summary in measured) for k in CPU_SHARE_KEYS}
    over = [f"{name} ({', '.join(f'{k} {summary[k]:g}' for k in CPU_SHARE_KEYS if summary.get(k, 0) > DISTURBED_PCT)})"
            for name, summary in measured if disturbed(summary)]
    return (f"CPU taken by other work during the cells, as % of the machine: steal (the hypervisor) up to "
            f"{top['steal_pct']:g} %, other processes up to {top['others_cpu_pct']:g} %; "
            + (f"over {DISTURBED_PCT:g} % in {len(over)} of {len(measured)} cells: {'; '.join(over)}." if over
               else f"no cell over {DISTURBED_PCT:g} %."))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    # a half-written report would read as current; NaN (a cell that answered nothing) is written as null: strict
    # JSON readers refuse the bare NaN token
    write_atomically(json_path, json.dumps(finite(data), indent=2, allow_nan=False) + "\n")
    write_atomically(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _cell(value: Any) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
