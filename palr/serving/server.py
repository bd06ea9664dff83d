"""`GrpcServer`: the server lifecycle shared by the retrieval and ranking servers.

Both servers are grpc.aio servers with the same operational surface, so it lives here once:

- message size limits (a request over `max_message_bytes` is refused by gRPC itself with
  RESOURCE_EXHAUSTED; the server keeps serving),
- `grpc.health.v1`: NOT_SERVING from start until the model is loaded and warmed up, then SERVING,
  for the overall "" name and for each service name,
- server reflection (so `grpcurl list/describe` work without the .proto files),
- TLS and mutual TLS from PEM files, and the matching client channel,
- Prometheus metrics over HTTP on `metrics_port`, and per-RPC metrics by status code,
- SIGTERM/SIGINT: health → NOT_SERVING, `drain_delay` seconds still accepting (callers watching health move
  away), stop accepting, finish in-flight RPCs within `grace`, exit 0.

Typical use (see retrieval_server/server.py):

    server = GrpcServer(config, [SERVICE_NAME])
    add_FooServicer_to_server(servicer, server.grpc)
    await server.run(load_and_warm_up)     # returns after a signal-triggered drain
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from palr.serving.config import ServerConfig, message_size_options

from palr.serving.interceptors import server_interceptors
from palr.serving.metrics import CERT_EXPIRY, SERVING as SERVING_GAUGE, note_grace_end
from palr.serving.tls import ServerTls

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, checked now and re-read when they change (palr.serving.tls);
    None when TLS is off."""
    if not config.tls_cert:
        return None
    return ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca,
                     on_certificate=CERT_EXPIRY.labels("server").set).credentials()


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc's health servicer, whose `Watch` streams end once the server stops (`end_watches`): a Watch never
    returns on its own, so each one open (a caller's client-side health checking, a mesh's probe) counted as an
    RPC in flight and held `stop(grace)` to the whole grace period, an idle server's too."""

    def __init__(self) -> None:
        super().__init__()
        self._stopping = asyncio.Event()

    def end_watches(self) -> None:
        self._stopping.set()

    async def Watch(self, request, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, stopping):
                task.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # the stream's own end or error


def write_ports(path: Path, ports: dict[str, int | None]) -> None:
    """`ports` and this process's pid as JSON at `path`, whole or not at all (written beside it under a name of
    this process's own, then renamed over it): a reader polling for the file never sees half of it, and can tell
    its own server's file from another's."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({**ports, "pid": os.getpid()}))
    os.replace(partial, path)


class GrpcServer:
    """A grpc.aio server with health, reflection, optional TLS, metrics and a graceful drain.

    Lifecycle: `start()` listens with health NOT_SERVING → the caller loads and warms its model →
    `set_serving()` → `drain()` (or `run(load)`, which does all of it and drains on a signal).
    Construct it inside the running event loop (grpc.aio binds the server to it) and register
    servicers on `.grpc` before `start()`.
    """

    def __init__(self, config: ServerConfig, service_names: Sequence[str]):
        self.config = config
        self.service_names = list(service_names)
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
        self.grpc = grpc.aio.server(options=[*message_size_options(config.max_message_bytes), ("grpc.so_reuseport", 0)],
                                    interceptors=server_interceptors())
        self.health = DrainingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME],
                                            self.grpc)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        # health only, plaintext: the same HealthServicer, so both ports always report the same status
        self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=server_interceptors()) \
            if config.health_port else None  # (the service port's interceptors: an unparsable request's handling)
        if self._health_grpc is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        self._metrics_httpd = None
        self._stop_requested: asyncio.Event | None = None
        self._serving = False   # health says SERVING (a drain delay is only for callers that were sent here)
        self._failed = ""       # why the model cannot serve (set_not_serving): health stays NOT_SERVING
        self._draining = False
        self._skip_delay = asyncio.Event()  # a second SIGTERM/SIGINT while draining: no more waiting

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING) and reflection; returns the bound port."""
        note_grace_end(None)
        await self._set_health(NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        try:
            if credentials is None:
                port = self.grpc.add_insecure_port(address)
            else:
                port = self.grpc.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        await self.grpc.start()
        self.port = port
        if self._health_grpc is not None:
            health_address = f"{self.config.host}:{self.config.health_port}"
            try:
                self.health_port = self._health_grpc.add_insecure_port(health_address)
            except RuntimeError as e:
                raise OSError(f"cannot serve health on {health_address}: {e}") from None
            await self._health_grpc.start()
        if self.config.metrics_port:
            try:
                # gRPC takes an IPv6 host in brackets ("[::]"); the HTTP server takes the bare address
                self._metrics_httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.host.strip("[]"))
            except OSError as e:
                raise OSError(f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {e}") from None
            self.metrics_port = self._metrics_httpd.server_port
        log.info("listening on %s (TLS %s, max message %d bytes, metrics %s, plaintext health port %s); health "
                 "NOT_SERVING until warmed up", self.address, self.config.tls, self.config.max_message_bytes,
                 f"http://{self.config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 self.health_port or "off")
        if self.config.ports_file:
            write_ports(Path(self.config.ports_file), {"port": self.port, "metrics_port": self.metrics_port,
                                                       "health_port": self.health_port})
        return self.port

    async def set_serving(self) -> None:
        if self._failed:  # the model failed as its load ended (its watcher said so first): a restart is the way back
            log.error("health stays NOT_SERVING: %s", self._failed)
            return
        await self._set_health(SERVING)
        self._serving = not self._draining
        log.info("health SERVING (%s)", ", ".join(self.service_names) or "overall")

    async def set_not_serving(self, reason: str) -> None:
        """Health → NOT_SERVING while still answering RPCs (e.g. the model failed after start-up), for good: a later
        `set_serving` (the end of a load whose runner died meanwhile) does not turn it back."""
        self._failed = reason
        await self._set_health(NOT_SERVING)
        self._serving = False
        log.error("health NOT_SERVING: %s", reason)

    async def drain(self) -> None:
        """Health → NOT_SERVING; if it was SERVING, `drain_delay` seconds still answering new RPCs (while the
        callers that watch health move away; a second stop request ends it); then refuse new RPCs, give
        in-flight ones `grace` seconds, stop."""
        started = time.perf_counter()
        self._draining = True
        was_serving, self._serving = self._serving, False
        await self.health.enter_graceful_shutdown()
        SERVING_GAUGE.set(0)
        if self.config.drain_delay and was_serving:
            log.info("draining: health NOT_SERVING; still answering new RPCs for %.1f s (--drain-delay; a second "
                     "SIGTERM/SIGINT skips the rest)", self.config.drain_delay)
            try:
                await asyncio.wait_for(self._skip_delay.wait(), self.config.drain_delay)
                log.info("second stop request: the rest of the drain delay skipped")
            except asyncio.TimeoutError:
                pass
        log.info("draining: health NOT_SERVING, no new RPCs, in-flight RPCs get up to %.1f s", self.config.grace)
        note_grace_end(time.monotonic() + self.config.grace)  # RPCs cancelled after it: cut by this stop
        self.health.end_watches()  # they have had NOT_SERVING; left open, each held the stop to the whole grace
        await self.grpc.stop(self.config.grace)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        log.info("drained and stopped in %.2f s", time.perf_counter() - started)

    def request_stop(self) -> None:
        """What SIGTERM/SIGINT do: ask `run()` to drain; while draining, end the drain delay."""
        if self._draining:
            self._skip_delay.set()
        elif self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self, load: Callable[[], Awaitable[None]],
                  cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Starts, runs `load` (model load + warm-up) while health says NOT_SERVING, turns SERVING,
        and serves until SIGTERM/SIGINT, then drains and runs `cleanup` (closing the model). A signal during loading
        drains at once; a second one ends the drain delay (not the grace in-flight RPCs get) and never kills the
        process, cleanup included."""
        if self.config.parent_pid and os.getppid() != self.config.parent_pid:  # else it drained at once, exit 0
            raise ValueError(f"--parent-pid {self.config.parent_pid} is not this process's parent ({os.getppid()}): "
                             f"a wrapper (bash -c, nohup, uv run) between them? Pass the direct parent's PID")
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        watch = asyncio.create_task(self._watch_parent()) if self.config.parent_pid else None
        try:
            await self.start()
            if await self._run_unless_stopped(load()):
                await self.set_serving()
                await self._stop_requested.wait()
        finally:
            if watch is not None:
                watch.cancel()
            try:
                if self.port is not None:  # else it never listened: nothing to drain
                    await self.drain()  # the handlers stay: a second signal ends the drain delay, never kills it
            finally:
                try:
                    if cleanup is not None:  # under the same handlers (an engine's join takes up to 30 s: a second
                        await cleanup()  # Ctrl-C there raised KeyboardInterrupt, a second SIGTERM killed it, 143)
                finally:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)

    async def _watch_parent(self, every_s: float = 1.0) -> None:
        """`--parent-pid`: once that process is no longer our parent (it died; we were re-parented), drain as on
        SIGTERM, so a harness killed with SIGKILL leaves no server behind."""
        while os.getppid() == self.config.parent_pid:
            await asyncio.sleep(every_s)
        log.warning("parent process %d is gone; draining", self.config.parent_pid)
        self.request_stop()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.request_stop()

    async def _run_unless_stopped(self, work: Awaitable[None]) -> bool:
        """Runs `work`; False when a stop was requested first (the work is cancelled)."""
        work_task = asyncio.ensure_future(work)
        stop_task = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if work_task.done():
            work_task.result()  # re-raises a failed load
            return True
        log.info("stop requested while loading; not turning SERVING")
        work_task.cancel()
        return False

    async def _set_health(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        SERVING_GAUGE.set(int(status == SERVING and not self._draining))  # (health ignores a set once draining)
