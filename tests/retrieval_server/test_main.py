"""`python -m retrieval_server` as a real subprocess: SIGTERM drains in-flight requests and exits 0,
and a bad bundle ends in a clear message and a non-zero exit, not a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.servers import REPO, ServerProcess, free_port, scrape_metrics
from palr.bundle import Bundle
from palr.serving.channels import open_channel
from palr.serving.server import NOT_SERVING, SERVING
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

IN_FLIGHT = 20


def in_flight(metrics_port: int) -> float:
    return scrape_metrics(metrics_port)["retrieval_requests_in_flight"]


def test_sigterm_finishes_in_flight_requests_then_exits_zero_and_refuses_new_connections(tiny_bundle):
    users = list(json.loads(Bundle.open(tiny_bundle).path("users").read_text())["users"])[:IN_FLIGHT]
    metrics_port = free_port()
    # A long batch window holds the requests inside the server, so they are surely in flight at SIGTERM (5 s: the 20
    # calls arrive and are counted within it, with a wide margin on a loaded machine; 1.5 s left a thin one).
    server = ServerProcess("retrieval_server", ["--bundle", str(tiny_bundle), "--metrics-port", str(metrics_port),
                                                "--max-batch-size", "64", "--batch-window-ms", "5000", "--grace", "30"])
    server.start()
    try:
        async def scenario() -> tuple[list[int], float, list[float]]:
            async with open_channel(server.target) as channel:  # our clients' settings (no BDP pings)
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == SERVING
                stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
                finished: list[float] = []

                async def one(i: int) -> int:
                    request = retrieval_pb2.RetrieveRequest(user_id=users[i], k=5, request_id=f"drain-{i}")
                    count = sum([len(m.candidates) async for m in stub.Retrieve(request, timeout=60)])
                    finished.append(time.monotonic())
                    return count

                calls = [asyncio.create_task(one(i)) for i in range(IN_FLIGHT)]
                deadline = time.monotonic() + 4  # before the window ends
                while await asyncio.to_thread(in_flight, metrics_port) < IN_FLIGHT:
                    assert time.monotonic() < deadline, "requests never reached the server"
                    await asyncio.sleep(0.02)
                server.process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                assert (await watch.read()).status == NOT_SERVING
                watch.cancel()
                return await asyncio.gather(*calls), sent, finished

        try:
            counts, sigterm_at, finished = asyncio.run(scenario())
        except grpc.RpcError as e:  # keep what the server said for the diagnosis (palr.serving.channels.NO_BDP_PROBE)
            pytest.fail(f"an in-flight call failed: {e}\nserver log:\n{server.log_path.read_text()[-4000:]}")
        assert counts == [5] * IN_FLIGHT  # every in-flight request completed OK...
        assert min(finished) > sigterm_at  # ...after SIGTERM
        assert server.process.wait(30) == 0
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        log = server.log_path.read_text()
        assert "received SIGTERM" in log and "drained and stopped" in log
    finally:
        server.kill()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retrieval_server", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_corrupted_bundle_is_refused_with_a_clear_message(tiny_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, broken)
    with (broken / "sasrec.onnx").open("ab") as f:
        f.write(b"tampered")
    result = run_cli("--bundle", str(broken), "--port", "0")
    assert result.returncode == 1
    assert "sasrec_onnx: sasrec.onnx checksum" in result.stderr
    assert "Traceback" not in result.stderr

    missing = run_cli("--bundle", str(tmp_path / "nowhere"), "--port", "0")
    assert missing.returncode == 1 and "no manifest.json" in missing.stderr and "Traceback" not in missing.stderr


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--bundle", "--port", "--host", "--threads", "--max-k", "--chunk-size", "--metrics-port",
                 "--tls-cert", "--tls-key", "--tls-client-ca", "--grace", "--max-batch-size", "--batch-window-ms"):
        assert flag in result.stdout


def test_a_server_started_by_a_harness_that_is_killed_drains_and_exits(tiny_bundle, tmp_path):
    """`ServerProcess` passes `--parent-pid`: when the harness dies by SIGKILL (no chance to stop its servers),
    the server notices it was re-parented, drains and exits 0 instead of running on as an orphan."""
    pid_file, log_file = tmp_path / "server.pid", tmp_path / "server.log"
    harness = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from loadtest.servers import ServerProcess\n"
        f"server = ServerProcess('retrieval_server', ['--bundle', {str(tiny_bundle)!r}],\n"
        f"                       log_path=pathlib.Path({str(log_file)!r})).start()\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(server.process.pid))\n"
        "time.sleep(600)\n")], cwd=REPO)
    server_pid = None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert harness.poll() is None and time.monotonic() < deadline, "the harness never got its server up"
            time.sleep(0.1)
        server_pid = int(pid_file.read_text())
        harness.kill()
        harness.wait(10)
        deadline = time.monotonic() + 30
        while _alive(server_pid):
            assert time.monotonic() < deadline, "the orphaned server is still running 30 s after its harness died"
            time.sleep(0.2)
        log = log_file.read_text()  # it drained, as on SIGTERM, rather than crashing
        assert "is gone; draining" in log and "drained and stopped" in log, log[-2000:]
    finally:
        harness.kill()
        if server_pid and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
