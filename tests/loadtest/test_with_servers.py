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
print("ready", flush=True)
time.sleep(120)
"""
# a command that never finishes: it ignores SIGINT
STUCK_COMMAND = """
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
time.sleep(120)
"""


def start(tiny_llm_bundle, tmp_path, *command: str) -> tuple[subprocess.Popen, list[str]]:
    """with_servers running `command`, in its own session (as a terminal's job is); its output up to the
    command's "ready" line."""
    argv = [sys.executable, "-m", "loadtest.with_servers", "--bundle", str(tiny_llm_bundle), "--log-dir", str(tmp_path),
            "--", sys.executable, "-c", *command]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready") or time.monotonic() > deadline:
            break
    return process, lines


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl-c"])
def test_an_interrupt_lets_the_command_write_its_reports_then_stops_both_servers(tiny_llm_bundle, tmp_path, interrupt):
    """A CI timeout sends SIGTERM to with_servers alone; Ctrl-C sends SIGINT to the whole process group.
    Either way the command gets one SIGINT and finishes what it does then (it was terminated mid-report
    before) while the servers still serve; then both drain and stop."""
    report = tmp_path / "report.txt"
    process, lines = start(tiny_llm_bundle, tmp_path, REPORTING_COMMAND, str(report))
    if interrupt == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    expected = signal.SIGTERM if interrupt == "sigterm" else signal.SIGINT
    assert process.returncode == 128 + expected, output[-3000:]
    assert report.read_text() == "reports written"
    assert "the interrupted command exited with 130" in output
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output


def test_a_second_interrupt_stops_a_command_that_does_not_finish(tiny_llm_bundle, tmp_path):
    process, lines = start(tiny_llm_bundle, tmp_path, STUCK_COMMAND)
    child = int(lines[-1].split()[1])
    process.send_signal(signal.SIGTERM)
    time.sleep(1)  # the command ignores the SIGINT it was passed
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "the command was stopped" in output
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, not left running against stopped servers
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output
