"""The locustfile's Retrieve target: without --retrieval-host it refuses to start (it used to send
Retrieve to the ranking server, which answers UNIMPLEMENTED), saying how to fix it. With --retrieve-share 0
it runs against the ranking server alone: tests/loadtest/test_locustfile.py, against a real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.servers import REPO


def locust(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
            "--host", "127.0.0.1:1", "--bundle", str(bundle), "-u", "1", "-r", "1", "-t", "1s",
            "--csv", str(out / "locust"), "--only-summary", *extra]
    return subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)


def test_retrieve_share_without_retrieval_host_refuses_to_start_saying_how_to_fix_it(tiny_bundle, tmp_path):
    run = locust(tiny_bundle, tmp_path)  # the default --retrieve-share 0.2
    assert run.returncode != 0
    assert "--retrieve-share 0.2 sends Retrieve calls, but no --retrieval-host is given" in run.stdout, run.stdout[-2000:]
    assert "add --retrieval-host HOST:PORT" in run.stdout and "--retrieve-share 0" in run.stdout
