"""Wiring: a verified bundle → the servicer → a `palr.serving.server.GrpcServer`; ORT loads while NOT_SERVING."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.users import load_histories
from palr.serving import tracing
from palr.serving.loading import in_load_thread
from palr.serving.server import GrpcServer
from palr.serving.streak import LIMIT, FailureStreak
from recsys.v1 import retrieval_pb2_grpc
from retrieval_server.batcher import DirectRunner, MicroBatcher, RunnerStopped
from retrieval_server.config import RetrievalServerConfig
from retrieval_server.metrics import BUILD, ORT_BATCH_SIZE, ORT_SECONDS
from palr.sasrec_onnx import ARTIFACT, Query, Ranked, SasrecOnnx
from retrieval_server.servicer import SERVICE_NAME, RetrievalServicer

log = logging.getLogger(__name__)

ARTIFACTS = ["catalog", "users", ARTIFACT]
MAX_FAILED_CALLS = LIMIT  # ORT calls failing in a row that turn health NOT_SERVING (the model, not the requests)


class RetrievalServer:
    """The retrieval tier in one process; construct it inside the running event loop.
    `run()` is the whole life; tests drive the steps:
    `start()` (listening, NOT_SERVING) → `load()` (ORT + warm-up) → `server.set_serving()` → `drain()`."""

    def __init__(self, config: RetrievalServerConfig, tracer_provider=None):
        self.config = config
        bundle = Bundle.open(config.bundle)
        bundle.verify(ARTIFACTS)
        self.bundle = bundle
        catalog = Catalog.load(bundle.path("catalog"))
        meta = SasrecOnnx.manifest_record(bundle, len(catalog))
        top_k = int(meta["top_k"])
        max_k = config.max_k or top_k
        if max_k > top_k:
            raise ValueError(f"--max-k {max_k} is larger than the model's top_k {top_k} (fixed at ONNX export)")
        traces = tracer_provider or tracing.tracer_provider("retrieval_server", config.otlp_endpoint)
        self.servicer = RetrievalServicer(catalog, load_histories(bundle.path("users"), catalog),
                                          max_len=int(meta["max_len"]), max_k=max_k, chunk_size=config.chunk_size,
                                          max_queue=config.max_queue, max_message_bytes=config.max_message_bytes,
                                          model_version=bundle.version(ARTIFACT),
                                          tracer=tracing.tracer(traces, "retrieval_server"))
        BUILD.info({"model": self.servicer.model_version})
        largest = self.servicer.largest_one_candidate_message()
        if config.max_message_bytes < largest:  # an answer would fail after its first messages went out
            raise ValueError(f"--max-message-bytes {config.max_message_bytes} is below the biggest one-candidate "
                             f"message this bundle's answers may need ({largest} bytes)")
        self.server = GrpcServer(config, [SERVICE_NAME])
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self.servicer, self.server.grpc)
        self.model: SasrecOnnx | None = None
        self.runner: MicroBatcher | DirectRunner | None = None
        self._health_task: asyncio.Task | None = None  # the NOT_SERVING a dead runner sets (kept: tasks are weak)
        self._failed_calls = FailureStreak()  # ORT calls failed in a row (from the worker threads)
        self._loop: asyncio.AbstractEventLoop | None = None
        log.info("bundle %s verified: %d items, %d users with history, model %s (max_len %s, top_k %d), max_k %d",
                 bundle.root, len(catalog), len(self.servicer.stored_histories), self.servicer.model_version,
                 meta["max_len"], top_k, max_k)

    async def start(self) -> int:
        return await self.server.start()

    async def load(self) -> None:
        """Loads and warms up the ORT session in a thread (health keeps answering; a stop does not wait for it:
        palr/serving/loading.py), then connects it."""
        self.model = await in_load_thread(self._load_model)
        self._loop = asyncio.get_running_loop()  # where a worker thread reports calls failing in a row
        if self.config.max_batch_size > 1:
            self.runner = MicroBatcher(self._run_batch, self.config.max_batch_size, self.config.batch_window_ms / 1e3,
                                       on_stopped=self._runner_stopped)
            log.info("micro-batching on: up to %d requests per ORT call, window %.1f ms",
                     self.config.max_batch_size, self.config.batch_window_ms)
        else:
            self.runner = DirectRunner(self._run_batch, self.config.workers)
            log.info("micro-batching off: one ORT call per request, %d at a time", self.config.workers)
        self.runner.start()
        self.servicer.attach(self.runner.submit)

    def _runner_stopped(self, reason: str) -> None:
        """The micro-batcher died, or the model failed call after call: every request would fail, so health says
        NOT_SERVING (callers move away; a restart is the way back)."""
        self._health_task = asyncio.get_running_loop().create_task(self.server.set_not_serving(reason))

    async def drain(self) -> None:
        await self.server.drain()
        await self._close_runner()

    async def run(self) -> None:
        """Serves until SIGTERM/SIGINT, then drains (see GrpcServer.run)."""
        await self.server.run(self.load, cleanup=self._close_runner)

    def _load_model(self) -> SasrecOnnx:
        started = time.perf_counter()
        model = SasrecOnnx.from_bundle(self.bundle, threads=self.config.threads)
        log.info("loaded %s in %.2f s (%d intra-op threads)", model.path, time.perf_counter() - started,
                 self.config.threads)
        model.warm_up(sorted({1, self.config.max_batch_size}))
        return model

    def _run_batch(self, queries: Sequence[Query]) -> list[Ranked]:
        """One ORT call (in a worker thread), measured. MAX_FAILED_CALLS failing in a row (an allocation failing at
        the pod's memory limit on every call): the model, not the requests, is what is broken, and health says so
        for good, as the ranking engine's does (it stayed SERVING, so its share of every caller's calls failed). From
        then on a failing call is RunnerStopped (UNAVAILABLE, which callers retry on another replica) instead of
        INTERNAL, which none retries, until a health watch takes the replica out."""
        started = time.perf_counter()
        try:
            ranked = self.model.retrieve(queries)
        except Exception as e:
            tripping = self._failed_calls.failed()
            if tripping:
                reason = f"{MAX_FAILED_CALLS} ONNX Runtime calls failed in a row; the last: {e!r}"
                log.error("%s: health NOT_SERVING until this server is restarted", reason)
                self._loop.call_soon_threadsafe(self._runner_stopped, reason)
            if tripping or self._failed_calls.tripped:
                raise RunnerStopped(f"the model fails call after call on this replica ({e!r})") from e
            raise
        else:
            self._failed_calls.succeeded()
            return ranked
        finally:  # failed calls too: a failing model shows as ORT calls, not as none
            ORT_SECONDS.observe(time.perf_counter() - started)
            ORT_BATCH_SIZE.observe(len(queries))

    async def _close_runner(self) -> None:
        if self.runner is not None:
            await self.runner.close()
            self.runner = None


async def serve(config: RetrievalServerConfig) -> None:
    """The whole life of `python -m retrieval_server` (the gRPC server must be made inside the loop)."""
    await RetrievalServer(config).run()
