"""`python -m loadtest.with_servers`: both real servers around a command, and never left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from loadtest.servers import REPO

# a command that, like Locust, writes its reports when interrupted with SIGINT (and takes a moment to)
REPORTING_COMMAND = """
import pathlib, signal, sys, time
def interrupted(*_):
    time.sleep(1)
    pathlib.Path(sys.argv[1]).write_text("reports written")
    sys.exit(130)
signal.signal(signal.SIGINT, interrupted)
time.sleep(120)
"""


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl-c"])
def test_an_interrupt_lets_the_command_write_its_reports_then_stops_both_servers(tiny_llm_bundle, tmp_path, interrupt):
    """A CI timeout sends SIGTERM to with_servers alone; Ctrl-C sends SIGINT to the whole process group.
    Either way the command finishes what it does on SIGINT (it was terminated mid-report before), then both
    servers drain and stop."""
    report = tmp_path / "report.txt"
    argv = [sys.executable, "-m", "loadtest.with_servers", "--bundle", str(tiny_llm_bundle), "--log-dir", str(tmp_path),
            "--", sys.executable, "-c", REPORTING_COMMAND, str(report)]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:  # until the command runs
        lines.append(line)
        if "running: " in line or time.monotonic() > deadline:
            break
    time.sleep(1)  # the command is running
    if interrupt == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    expected = signal.SIGTERM if interrupt == "sigterm" else signal.SIGINT
    assert process.returncode == 128 + expected, output[-3000:]
    assert report.read_text() == "reports written"
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output
