"""gRPC server plumbing shared by the retrieval and ranking servers.

Both servers are grpc.aio servers with the same operational surface, so it lives here once:

- message size limits (a request over `max_message_bytes` is refused by gRPC itself with
  RESOURCE_EXHAUSTED; the server keeps serving),
- `grpc.health.v1`: NOT_SERVING from start until the model is loaded and warmed up, then SERVING,
  for the overall "" name and for each service name,
- server reflection (so `grpcurl list/describe` work without the .proto files),
- TLS and mutual TLS from PEM files, and the matching client channel,
- Prometheus metrics over HTTP on `metrics_port`, and per-RPC metrics by status code,
- SIGTERM/SIGINT: health → NOT_SERVING, stop accepting, finish in-flight RPCs within `grace`, exit 0.

Typical use (see retrieval_server/server.py):

    server = GrpcServer(config, [SERVICE_NAME])
    add_FooServicer_to_server(servicer, server.grpc)
    await server.run(load_and_warm_up)     # returns after a signal-triggered drain
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from palr.interceptors import server_interceptors

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LB_POLICIES = ("pick_first", "round_robin")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
                   1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class ServerConfig:
    """Options every server shares; a server's own config dataclass extends this one."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; loopback by default, 0.0.0.0 or [::] to accept remote clients"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "largest request or response message in bytes; larger requests get RESOURCE_EXHAUSTED"})
    metrics_port: int = field(default=0, metadata={
        "help": "port for Prometheus metrics over HTTP on the same host (0 = off)"})
    health_port: int = field(default=0, metadata={
        "help": "a second, plaintext port on the same host serving only grpc.health.v1, for probes that cannot "
                "speak (mutual) TLS, such as Kubernetes' native grpc probes (0 = off)"})
    tls_cert: Path | None = field(default=None, metadata={
        "help": "PEM server certificate chain; with --tls-key turns TLS on", "metavar": "PEM"})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert", "metavar": "PEM"})
    tls_client_ca: Path | None = field(default=None, metadata={
        "help": "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
        "metavar": "PEM"})
    grace: float = field(default=10.0, metadata={
        "help": "seconds in-flight RPCs get to finish after SIGTERM/SIGINT before they are cancelled"})

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")
        if self.grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {self.grace}")

    @property
    def tls(self) -> str:
        """How the server authenticates: 'off', 'TLS' or 'mutual TLS'."""
        return "mutual TLS" if self.tls_client_ca else "TLS" if self.tls_cert else "off"


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files; None when TLS is off."""
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def open_channel(target: str, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, server_name: str | None = None,
                 max_message_bytes: int | None = None, load_balancing: str | None = None, aio: bool = True):
    """A client channel to `target`: TLS when a CA or client certificate is given (the CA verifies
    the server; cert + key are this client's identity for mutual TLS), plaintext otherwise.
    `server_name` overrides the name checked against the server certificate.

    `target` is anything gRPC resolves: "host:port", or "dns:///name:port" (every address the name
    resolves to, e.g. a Kubernetes headless Service's pods). `load_balancing` picks gRPC's
    client-side policy over those addresses: "round_robin" (spread RPCs over all ready backends)
    or "pick_first" (gRPC's default: one backend at a time)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs its key (tls_cert and tls_key go together)")
    options = message_size_options(max_message_bytes) if max_message_bytes else []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if load_balancing:
        if load_balancing not in LB_POLICIES:
            raise ValueError(f"load_balancing must be one of {LB_POLICIES}, got {load_balancing!r}")
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
    module = grpc.aio if aio else grpc
    if not (tls_ca or tls_cert):
        return module.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
    return module.secure_channel(target, credentials, options=options)


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
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME],
                                            self.grpc)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        # health only, plaintext: the same HealthServicer, so both ports always report the same status
        self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)]) if config.health_port else None
        if self._health_grpc is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        self._metrics_httpd = None
        self._stop_requested: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING) and reflection; returns the bound port."""
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
                self._metrics_httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.host)
            except OSError as e:
                raise OSError(f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {e}") from None
            self.metrics_port = self._metrics_httpd.server_port
        log.info("listening on %s (TLS %s, max message %d bytes, metrics %s, plaintext health port %s); health "
                 "NOT_SERVING until warmed up", self.address, self.config.tls, self.config.max_message_bytes,
                 f"http://{self.config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 self.health_port or "off")
        return self.port

    async def set_serving(self) -> None:
        await self._set_health(SERVING)
        log.info("health SERVING (%s)", ", ".join(self.service_names) or "overall")

    async def set_not_serving(self, reason: str) -> None:
        """Health → NOT_SERVING while still answering RPCs (e.g. the model failed after start-up)."""
        await self._set_health(NOT_SERVING)
        log.error("health NOT_SERVING: %s", reason)

    async def drain(self) -> None:
        """Health → NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds, stop."""
        started = time.perf_counter()
        log.info("draining: health NOT_SERVING, no new RPCs, in-flight RPCs get up to %.1f s", self.config.grace)
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.grace)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        log.info("drained and stopped in %.2f s", time.perf_counter() - started)

    def request_stop(self) -> None:
        """What SIGTERM/SIGINT do: ask `run()` to drain."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self, load: Callable[[], Awaitable[None]]) -> None:
        """Starts, runs `load` (model load + warm-up) while health says NOT_SERVING, turns SERVING,
        and serves until SIGTERM/SIGINT, then drains. A signal during loading drains at once."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            if await self._run_unless_stopped(load()):
                await self.set_serving()
                await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.port is not None:  # else it never listened: nothing to drain
                await self.drain()

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


# -- per-RPC helpers ----------------------------------------------------------------------------

class RequestError(Exception):
    """A request the server refuses: carries the gRPC status code; the message names the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_IDS_IN_MESSAGE = 10


def check_known_ids(field_name: str, item_ids: Sequence[str], catalog) -> None:
    """INVALID_ARGUMENT naming the field and its unknown item ids (the first few, each cut to 40
    characters) when `catalog` does not know some of `item_ids`."""
    unknown = list(dict.fromkeys(catalog.unknown(item_ids)))
    if unknown:
        shown = ", ".join(repr(i[:40]) for i in unknown[:MAX_IDS_IN_MESSAGE])
        more = f" and {len(unknown) - MAX_IDS_IN_MESSAGE} more" if len(unknown) > MAX_IDS_IN_MESSAGE else ""
        raise invalid_argument(f"{field_name}: unknown item ids {shown}{more}")


def request_id(from_request: str, context: grpc.aio.ServicerContext) -> str:
    """The request's id for logs: its own field, else `x-request-id` metadata, else a new one."""
    if from_request:
        return from_request
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value
    return uuid.uuid4().hex[:16]


class RpcMetrics:
    """Prometheus metrics for one RPC: requests by status code, latency, requests in flight.

    Create one per RPC per process (prometheus_client registers names process-wide)."""

    def __init__(self, prefix: str, rpc: str):
        self.requests = Counter(f"{prefix}_requests", f"{rpc} RPCs by final status code", ["code"])
        self.latency = Histogram(f"{prefix}_request_seconds", f"{rpc} latency from handler start to last message",
                                 buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge(f"{prefix}_requests_in_flight", f"{rpc} RPCs being handled now")

    @contextlib.asynccontextmanager
    async def track(self, context: grpc.aio.ServicerContext, rid: str, logger: logging.Logger):
        """Wraps a handler: counts and times it; a RequestError becomes its status code, any other
        exception INTERNAL (logged with traceback); the server keeps serving either way."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight.inc()
        try:
            yield
        except RequestError as e:
            code = e.code
            logger.info("rid=%s %s: %s", rid, code.name, e)
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            logger.info("rid=%s cancelled by the client", rid)
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("rid=%s failed", rid)
            await context.abort(code, f"internal error (request id {rid}); see the server log")
        finally:
            self.in_flight.dec()
            self.requests.labels(code.name).inc()
            self.latency.observe(time.perf_counter() - started)
