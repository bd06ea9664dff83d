"""The retrieval benchmark, side by side in one run:

1. model: the same SASRec top-k graph in ONNX Runtime (`sasrec.onnx`) and in torch eager
   (`models/sasrec.pt` through palr/sasrec.py's `SASRecTopK`), same packed inputs from
   real users' histories, same thread count, at batch 1 and 32; calls interleaved in rounds so
   machine noise hits both alike; medians. Goal: ORT ≤ 0.5× torch eager at batch 1.
2. RPC: `Retrieve` p50/p99 and throughput from closed-loop gRPC clients at concurrency 1, 8, 32
   against real servers on loopback, micro-batching on and off (both servers up, levels interleaved).
   Client and server share this machine's cores, so the client's CPU is in the numbers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from loadtest.report import machine_info, markdown_table, percentiles_ms, write_report
from loadtest.servers import ServerProcess, free_port, scrape_metrics, stop_all
from palr.machine import torch_threads

log = logging.getLogger(__name__)

# server flags of each RPC mode
MODES: dict[str, list[str]] = {
    "micro-batching": ["--max-batch-size", "32", "--batch-window-ms", "0"],
    "micro-batching, 2 ms window": ["--max-batch-size", "32", "--batch-window-ms", "2"],
    "one ORT call per request": ["--max-batch-size", "1", "--workers", "1"],
    "one ORT call per request, 2 workers": ["--max-batch-size", "1", "--workers", "2"],
}


@dataclass
class RetrievalBenchConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle with sasrec.onnx and models/sasrec.pt",
                                                            "metavar": "DIR"})
    out: Path = field(default=Path("reports"), metadata={"help": "where bench_retrieval.json/.md go", "metavar": "DIR"})
    threads: int = field(default=1, metadata={"help": "intra-op threads for ORT and torch alike (and the servers)"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "model batch sizes"})
    model_calls: int = field(default=300, metadata={"help": "timed calls per engine and batch size"})
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "RPC client concurrency levels"})
    rpc_seconds: float = field(default=6.0, metadata={"help": "measuring time per mode and concurrency level"})
    rpc_repeats: int = field(default=3, metadata={
        "help": "rounds the measuring time is split into, modes alternating within each (noise hits all alike)"})
    k: int = field(default=20, metadata={"help": "candidates per Retrieve request"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={
        "help": f"server modes to compare: {', '.join(repr(m) for m in MODES)}"})
    skip_model: bool = field(default=False, metadata={"help": "leave out the ORT vs torch part"})
    skip_rpc: bool = field(default=False, metadata={"help": "leave out the RPC part"})

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown:  # before any server starts, not after the modes listed before it
            raise ValueError(f"--modes: unknown {unknown}; choose from {', '.join(repr(m) for m in MODES)}")


def run(config: RetrievalBenchConfig) -> dict:
    from palr.bundle import Bundle

    bundle = Bundle.open(config.bundle)
    report = {"benchmark": "retrieval", "config": {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in asdict(config).items()},
              "machine_before": machine_info()}
    if not config.skip_model:
        report["model"] = model_latency(bundle, config)
    if not config.skip_rpc:
        report["rpc"] = rpc_latency(bundle, config)
    report["machine_after"] = machine_info()
    report["goals"] = goals(report)
    json_path, md_path = write_report(config.out, "bench_retrieval", report, markdown(report))
    print(markdown(report))
    log.info("wrote %s and %s", json_path, md_path)
    return report


# -- 1. the model: ORT vs torch eager ---------------------------------------------------------------

def model_latency(bundle, config: RetrievalBenchConfig) -> list[dict]:
    with torch_threads(config.threads):
        return _model_latency(bundle, config)


def _model_latency(bundle, config: RetrievalBenchConfig) -> list[dict]:
    import numpy as np
    import torch

    from palr.catalog import Catalog
    from palr.sasrec import SASRec, SASRecTopK
    from palr.sasrec_onnx import SasrecOnnx, pack_excludes
    from palr.users import load_histories

    onnx_model = SasrecOnnx.from_bundle(bundle, threads=config.threads)
    torch_model = SASRecTopK(SASRec.load(bundle.path("sasrec_torch")), onnx_model.top_k).eval()
    histories = list(load_histories(bundle.path("users"), Catalog.load(bundle.path("catalog"))).values())
    rows = []
    for batch_size in config.batch_sizes:
        users = [histories[i % len(histories)] for i in range(batch_size)]
        history = onnx_model.pack_histories(users)  # [B, max_len]
        exclude = pack_excludes(users)  # [B, n]
        history_t, exclude_t = torch.from_numpy(history), torch.from_numpy(exclude)
        feeds = {"history": history, "exclude": exclude}

        def run_ort():
            return onnx_model.session.run(["scores", "indices"], feeds)

        def run_torch():
            with torch.inference_mode():
                return torch_model(history_t, exclude_t)

        (ort_scores, ort_indices), (torch_scores, torch_indices) = run_ort(), run_torch()
        finite = np.isfinite(ort_scores)
        times = interleaved({"onnxruntime": run_ort, "torch eager": run_torch}, config.model_calls)
        medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        for name, t in times.items():
            rows.append({"engine": name, "batch": batch_size, "median_ms": round(medians[name], 4),
                         **percentiles_ms(t, (90,)), "vs_torch": round(medians[name] / medians["torch eager"], 3)})
        rows[-2]["top_k_ids_equal"] = bool(np.array_equal(ort_indices, torch_indices.numpy()))
        rows[-2]["max_score_gap"] = float(np.abs(ort_scores[finite] - torch_scores.numpy()[finite]).max())
        log.info("batch %d: ORT %.3f ms, torch eager %.3f ms (%.2fx)", batch_size, medians["onnxruntime"],
                 medians["torch eager"], medians["onnxruntime"] / medians["torch eager"])
    return rows


def interleaved(engines: dict[str, Callable[[], object]], calls: int, round_size: int = 10,
                warm_up: int = 20) -> dict[str, list[float]]:
    """Per-call seconds of each engine, alternating rounds (and their order) so noise hits all alike."""
    for fn in engines.values():
        for _ in range(warm_up):
            fn()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_no in range(math.ceil(calls / round_size)):
        order = list(engines) if round_no % 2 == 0 else list(reversed(engines))
        for name in order:
            fn = engines[name]
            for _ in range(round_size):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return times


# -- 2. the RPC: micro-batching on vs off -------------------------------------------------------------

def rpc_latency(bundle, config: RetrievalBenchConfig) -> list[dict]:
    import json

    users = [u for u, entry in json.loads(bundle.path("users").read_text())["users"].items() if entry["history"]]
    servers: dict[str, tuple[ServerProcess, int]] = {}
    try:
        for mode in config.modes:
            metrics_port = free_port()
            server = ServerProcess("retrieval_server", ["--bundle", str(config.bundle), "--threads", str(config.threads),
                                                        "--metrics-port", str(metrics_port), "--log-level", "WARNING",
                                                        *MODES[mode]])
            servers[mode] = (server.start(), metrics_port)
        rows = []
        for concurrency in config.concurrency:
            rows += measure_level(servers, users, config, concurrency).values()
        return rows
    finally:
        stop_all(server for server, _ in servers.values())


def measure_level(servers: dict[str, tuple[ServerProcess, int]], users: list[str], config: RetrievalBenchConfig,
                  concurrency: int) -> dict[str, dict]:
    """One concurrency level for every mode: `rpc_repeats` rounds, modes in alternating order within
    each, latencies pooled per mode, so a noisy spell on a shared machine hits all modes alike."""
    latencies: dict[str, list[float]] = {mode: [] for mode in servers}
    errors: dict[str, Counter] = {mode: Counter() for mode in servers}
    seconds = dict.fromkeys(servers, 0.0)
    counters = {mode: server_counters(port) for mode, (_, port) in servers.items()}
    for repeat in range(config.rpc_repeats):
        for mode in (list(servers) if repeat % 2 == 0 else list(reversed(servers))):
            got, failed, took = asyncio.run(closed_loop(servers[mode][0].target, users, config.k, concurrency,
                                                        config.rpc_seconds / config.rpc_repeats))
            latencies[mode] += got
            errors[mode] += failed
            seconds[mode] += took
    rows = {}
    for mode, (_, port) in servers.items():
        calls, requests, answered, cpu = (after - before for after, before in zip(server_counters(port), counters[mode]))
        served = len(latencies[mode])
        if errors[mode]:
            log.warning("%s, concurrency %d: %d calls failed (%s); the latencies are the answered calls'", mode,
                        concurrency, sum(errors[mode].values()), dict(errors[mode]))
        rows[mode] = {"mode": mode, "concurrency": concurrency, "requests": served,
                      "errors": sum(errors[mode].values()), **percentiles_ms(latencies[mode]),
                      "requests_per_s": round(served / seconds[mode], 1),
                      "server_cpu_ms_per_request": round(cpu * 1e3 / answered, 3) if answered else 0.0,
                      "mean_ort_batch": round(requests / calls, 2) if calls else 0.0}
        log.info("%s, concurrency %d: p50 %.2f ms, p99 %.2f ms, %.0f req/s, server CPU %.3f ms/request, "
                 "mean ORT batch %.2f", mode, concurrency, rows[mode]["p50_ms"], rows[mode]["p99_ms"],
                 rows[mode]["requests_per_s"], rows[mode]["server_cpu_ms_per_request"], rows[mode]["mean_ort_batch"])
    return rows


async def closed_loop(target: str, users: list[str], k: int, concurrency: int,
                      seconds: float) -> tuple[list[float], Counter, float]:
    """`concurrency` clients on one channel, each sending its next request when the last stream ended: (latencies of
    the answered calls, failed calls by status code, seconds). A failed call is counted, not fatal to the run."""
    import grpc

    from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

    requests = [retrieval_pb2.RetrieveRequest(user_id=u, k=k) for u in users]
    latencies: list[float] = []
    errors: Counter = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

        async def client(first: int, until: float | None, record: bool) -> None:
            i = first
            while until is None or time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    async for _ in stub.Retrieve(requests[i % len(requests)], timeout=30):
                        pass
                except grpc.aio.AioRpcError as e:
                    if record:
                        errors[e.code().name] += 1
                else:
                    if record:
                        latencies.append(time.perf_counter() - started)
                i += concurrency
                if until is None:
                    return

        await asyncio.gather(*(client(c, None, False) for c in range(concurrency)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(c, started + seconds, True) for c in range(concurrency)))
        return latencies, errors, time.perf_counter() - started


def server_counters(metrics_port: int) -> tuple[float, float, float, float]:
    """(ORT calls, requests in them, requests answered, server CPU seconds) so far, from the server's
    metrics. CPU time per request is the figure least bent by other load on a shared machine."""
    samples = scrape_metrics(metrics_port)
    return (samples.get("retrieval_ort_batch_size_count", 0.0), samples.get("retrieval_ort_batch_size_sum", 0.0),
            samples.get('retrieval_requests_total{code="OK"}', 0.0), samples.get("process_cpu_seconds_total", 0.0))


# -- the report -----------------------------------------------------------------------------------

def goals(report: dict) -> dict:
    out = {}
    rows = {(r["engine"], r["batch"]): r for r in report.get("model", [])}
    if ("onnxruntime", 1) in rows:
        ratio = rows[("onnxruntime", 1)]["vs_torch"]
        out["ort_vs_torch_eager_batch1"] = {"ratio": ratio, "goal": "<= 0.5", "met": ratio <= 0.5}
    return out


def markdown(report: dict) -> str:
    before, after = report["machine_before"], report["machine_after"]
    parts = [f"# Retrieval benchmark\n\n{before['cpus']} CPUs ({before['processor']}), load average "
             f"{before['load_average_1_5_15']} before and {after['load_average_1_5_15']} after; "
             f"{report['config']['threads']} intra-op thread(s); {before['at']}."]
    if "model" in report:
        parts.append("## SASRec top-k: ONNX Runtime vs torch eager (same inputs, interleaved calls)\n\n"
                     + markdown_table(report["model"], ["engine", "batch", "median_ms", "p90_ms", "vs_torch"]))
    if "rpc" in report:
        parts.append(f"## Retrieve RPC over loopback (k={report['config']['k']}, closed loop, "
                     f"{report['config']['rpc_seconds']} s per cell in {report['config']['rpc_repeats']} interleaved rounds)\n\n"
                     + markdown_table(report["rpc"], ["mode", "concurrency", "p50_ms", "p99_ms", "requests_per_s",
                                                      "server_cpu_ms_per_request", "mean_ort_batch", "requests", "errors"]))
    for name, goal in report["goals"].items():
        parts.append(f"Goal {name}: {goal['ratio']} (goal {goal['goal']}): {'met' if goal['met'] else 'NOT met'}.")
    return "\n\n".join(parts)
