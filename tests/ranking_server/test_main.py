"""`python -m ranking_server` as a real subprocess in front of `python -m retrieval_server`: health
turns SERVING only after the warm-up, SIGTERM drains in-flight requests (none lost, none degraded)
and exits 0, and a bundle it cannot serve ends in a clear message and exit 1, not a traceback.
And the README's first command, `python -m loadtest.demo`, end to end on the tiny bundle."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.servers import REPO, ServerProcess, free_port, scrape_metrics
from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.serving.server import NOT_SERVING, SERVING
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

IN_FLIGHT = 6


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tiny_llm_bundle):
    metrics_port = free_port()
    with ServerProcess("retrieval_server", ["--bundle", str(tiny_llm_bundle)]) as retrieval:
        # Four batch slots and four tokens per engine step: the six requests stay in flight for seconds.
        ranking = ServerProcess("ranking_server", [
            "--bundle", str(tiny_llm_bundle), "--retrieval", retrieval.target, "--metrics-port", str(metrics_port),
            "--max-batch-size", "4", "--max-tokens-per-step", "4", "--threads", "1", "--grace", "60"])
        ranking.start()
        try:
            async def scenario() -> tuple[list[ranking_pb2.RecommendResponse], float, list[float]]:
                async with grpc.aio.insecure_channel(ranking.target) as channel:
                    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                    assert (await watch.read()).status == SERVING
                    stub = ranking_pb2_grpc.RankingServiceStub(channel)
                    finished: list[float] = []

                    async def one(i: int) -> ranking_pb2.RecommendResponse:
                        response = await stub.Recommend(ranking_pb2.RecommendRequest(
                            user_id=str(i + 1), k=5, mode=ranking_pb2.RANKING_MODE_GENERATE,
                            request_id=f"drain-{i}"), timeout=120)
                        finished.append(time.monotonic())
                        return response

                    calls = [asyncio.create_task(one(i)) for i in range(IN_FLIGHT)]
                    deadline = time.monotonic() + 30
                    while (await asyncio.to_thread(scrape_metrics, metrics_port))["ranking_requests_in_flight"] \
                            < IN_FLIGHT:
                        assert time.monotonic() < deadline, "requests never reached the server"
                        await asyncio.sleep(0.02)
                    ranking.process.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
                    assert (await watch.read()).status == NOT_SERVING
                    watch.cancel()
                    return await asyncio.gather(*calls), sent, finished

            responses, sigterm_at, finished = asyncio.run(scenario())
            assert [len(r.items) for r in responses] == [5] * IN_FLIGHT  # every in-flight request answered...
            assert not any(r.degraded for r in responses)  # ...by the LLM...
            assert min(finished) > sigterm_at  # ...after SIGTERM
            assert ranking.process.wait(60) == 0
            log = ranking.log_path.read_text()
            assert log.index("warmed up") < log.index("health SERVING")
            assert "received SIGTERM" in log and "drained and stopped" in log
            with grpc.insecure_channel(ranking.target) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            ranking.kill()


def test_sigterm_while_the_model_loads_exits_zero_at_once_without_waiting_for_the_load(tiny_llm_bundle,
                                                                                      monkeypatch):
    """A load that takes ten minutes (RANKING_INJECT_LOAD_DELAY_MS blocks the load thread, as a 7B model's load
    does): SIGTERM while health says NOT_SERVING ends the process in seconds, exit 0, not when the load ends."""
    monkeypatch.setenv("RANKING_INJECT_LOAD_DELAY_MS", "600000")
    ranking = ServerProcess("ranking_server", ["--bundle", str(tiny_llm_bundle), "--retrieval", "127.0.0.1:1"])
    try:
        with ranking.log_path.open("wb") as log_file:
            ranking.process = subprocess.Popen(ranking.argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        ranking.wait_listening(60)
        with grpc.insecure_channel(ranking.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert ranking.process.poll() is None and time.monotonic() < deadline, ranking.log_tail()
                try:
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == NOT_SERVING
                    break
                except grpc.RpcError:
                    time.sleep(0.1)  # not listening yet
        ranking.process.send_signal(signal.SIGTERM)
        assert ranking.process.wait(30) == 0, ranking.log_tail()  # within 30 s, or wait raises
        log = ranking.log_path.read_text()
        assert "stop requested while loading" in log
        assert "exiting without waiting for the model load under way" in log
    finally:
        ranking.kill()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ranking_server", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_bundle_without_the_llm_or_an_absent_engine_is_refused_with_a_clear_message(tiny_bundle, tiny_llm_bundle):
    no_llm = run_cli("--bundle", str(tiny_bundle), "--port", "0")
    assert no_llm.returncode == 1 and "Traceback" not in no_llm.stderr
    assert "bundle has no artifact 'profiles'" in no_llm.stderr

    trtllm = run_cli("--bundle", str(tiny_llm_bundle), "--port", "0", "--engine", "trtllm")
    assert trtllm.returncode == 1 and "Traceback" not in trtllm.stderr
    assert "--engine trtllm" in trtllm.stderr


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--bundle", "--retrieval", "--port", "--host", "--engine", "--device", "--max-batch-size",
                 "--max-tokens-per-step", "--max-queue", "--candidates", "--max-k", "--prefix-reuse",
                 "--no-prefix-reuse", "--retrieval-tls-ca", "--retrieval-tls-cert", "--retrieval-tls-key",
                 "--default-deadline-ms", "--degrade-reserve-ms", "--threads", "--metrics-port", "--tls-cert",
                 "--tls-key", "--tls-client-ca", "--grace", "--max-message-bytes"):
        assert flag in result.stdout


def test_demo_ranks_three_users_and_one_generate_request_by_title_and_stops_both_servers(tiny_llm_bundle,
                                                                                        ml100k_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "loadtest.demo", "--bundle", str(tiny_llm_bundle), "--k", "5",
                             "--data", str(ml100k_dir.parent), "--log-dir", str(tmp_path)],  # not the repo's reports/
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "building it" not in out  # the bundle was complete: nothing rebuilt
    assert out.count(", score mode:") == 3 and out.count(", generate mode:") == 1
    assert out.count("timings: retrieval") == 4 and out.count("held-out next item:") == 4
    rows = [line.split(".", 1)[1].rsplit(" score ", 1)[0].strip()
            for line in out.splitlines() if line.strip()[:3].strip(". ").isdigit()]
    labels = {item.label for item in Catalog.load(Bundle.open(tiny_llm_bundle).path("catalog")).items}
    assert len(rows) == 20 and set(rows) <= labels  # 5 ranked items per answer, shown by title
    assert "ranking_server stopped (SIGTERM, drained), exit code 0" in out
    assert "retrieval_server stopped (SIGTERM, drained), exit code 0" in out


@pytest.mark.parametrize("flag", ["retrieval_tls_ca", "retrieval_tls_cert", "retrieval_tls_key"])
def test_a_missing_retrieval_tls_file_is_refused_naming_its_flag(flag, pki, tmp_path):
    """It said `cannot serve: [Errno 2] No such file or directory: '/nope'`, naming no flag."""
    from ranking_server.config import RankingServerConfig

    files = {"retrieval_tls_ca": pki.ca, "retrieval_tls_cert": pki.client_cert, "retrieval_tls_key": pki.client_key}
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} {missing}: no such file"):
        RankingServerConfig(**{**files, flag: missing})

