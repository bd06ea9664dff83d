"""What else had the machine while a cell ran: another process's CPU time is counted, this process's is not."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.report import MIN_SHARE_CPU_S, CpuTimes, cpu_share, disturbance

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")

BUSY_S = 1.0


def cpu_seconds_of_others(share: dict, wall_s: float) -> float:
    """The share back in CPU seconds: % of every CPU's time over the wall time."""
    return share["others_cpu_pct"] / 100 * (os.cpu_count() or 1) * wall_s


def measure(work) -> tuple[dict, float]:
    before, started = CpuTimes.now(), time.perf_counter()
    work()
    return cpu_share(before, CpuTimes.now()), time.perf_counter() - started


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_another_process_spinning_is_counted():
    child = [sys.executable, "-c", f"import time\nend = time.process_time() + {BUSY_S}\n"
                                   "while time.process_time() < end: pass"]
    share, wall = measure(lambda: subprocess.run(child, check=True))
    assert set(share) == {"steal_pct", "others_cpu_pct"}
    assert cpu_seconds_of_others(share, wall) >= 0.8 * BUSY_S  # the child's second, interpreter start aside


def test_this_processs_own_work_is_not_counted():
    """This process's CPU time is read with the machine's and taken off: a second of its own spinning is not
    counted as another process's. (Live, what the others ran meanwhile depends on the machine's load, so the
    subtraction is checked on readings made up here, and the live reading for what it says of this process.)"""
    before = CpuTimes.now()
    spin(BUSY_S)
    after = CpuTimes.now()
    assert after.own_s - before.own_s >= 0.9 * BUSY_S
    assert after.busy_s - before.busy_s >= 0.9 * BUSY_S  # the machine counted it as busy too
    reading = CpuTimes(total_s=100.0, busy_s=10.0, steal_s=0.0, own_s=5.0)
    alone = dataclasses.replace(reading, total_s=102.0, busy_s=11.0, own_s=6.0)
    assert cpu_share(reading, alone) == {"steal_pct": 0.0, "others_cpu_pct": 0.0}
    beside = dataclasses.replace(alone, busy_s=11.5)  # and half a second of another process's
    assert cpu_share(reading, beside) == {"steal_pct": 0.0, "others_cpu_pct": 25.0}


def test_an_interval_too_short_for_the_clock_ticks_has_no_shares():
    """/proc/stat counts 10 ms ticks: a cell of a few milliseconds read as 0, 33 or 50 % by chance (or nothing),
    and the report named it disturbed. (On readings made up here: live, every CPU's time counts, so how much a
    short spin reads depends on the machine's CPU count.)"""
    before = CpuTimes(total_s=100.0, busy_s=10.0, steal_s=0.0, own_s=5.0)
    assert cpu_share(before, dataclasses.replace(before, total_s=100.0 + MIN_SHARE_CPU_S - 0.01, busy_s=10.5)) == {}
    assert MIN_SHARE_CPU_S <= 2.0
    assert cpu_share(before, dataclasses.replace(before, total_s=102.0, busy_s=10.5)) == {
        "steal_pct": 0.0, "others_cpu_pct": 25.0}  # 0.5 s of others' work in 2 s of CPU time


def test_disturbance_names_the_cells_over_the_threshold():
    cells = [("round 0 score/inflight/c1", {"steal_pct": 0.4, "others_cpu_pct": 1.0}),
             ("round 1 score/inflight/c1", {"steal_pct": 12.5, "others_cpu_pct": 0.0}),
             ("round 1 score/sequential/c1", {"steal_pct": 0.0, "others_cpu_pct": 30.0})]
    text = disturbance(cells)
    assert "steal (the hypervisor) up to 12.5 %" in text and "other processes up to 30 %" in text
    assert "in 2 of 3 cells" in text and "round 1 score/inflight/c1 (steal_pct 12.5)" in text
    assert "round 1 score/sequential/c1 (others_cpu_pct 30)" in text and "round 0" not in text
    assert "no cell over" in disturbance(cells[:1])
    assert "not measured" in disturbance([("a", {"p50_ms": 1.0})])
