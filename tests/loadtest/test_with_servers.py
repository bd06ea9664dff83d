"""`python -m loadtest.with_servers`: both real servers around a command, and never left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from loadtest.servers import REPO


def test_sigterm_stops_both_servers_and_the_command(tiny_llm_bundle, tmp_path):
    """A CI timeout sends SIGTERM: with_servers unwinds as on Ctrl-C, drains and stops both servers."""
    argv = [sys.executable, "-m", "loadtest.with_servers", "--bundle", str(tiny_llm_bundle), "--log-dir", str(tmp_path),
            "--", sys.executable, "-c", "import time; time.sleep(120)"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:  # until the command runs
        lines.append(line)
        if "running: " in line or time.monotonic() > deadline:
            break
    time.sleep(1)  # the command is running
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output
