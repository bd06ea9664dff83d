"""The options every server shares (a server's own config dataclass extends `ServerConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


def check_finite(name: str, value: float, *, positive: bool = False, unit: str = "") -> None:
    """ValueError unless `value` is a finite number >= 0 (> 0 with `positive`). The comparisons refuse nan too;
    inf is an expired timeout to gRPC and a wait that never ends to asyncio, so neither is a setting."""
    if not ((value > 0 if positive else value >= 0) and value < math.inf):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number{f' of {unit}' if unit else ''} {bound}, got {value}")


def check_files(*flag_paths: tuple[str, Path | None]) -> None:
    """ValueError naming the flag of a given path that is not a file (a None path: the option is off)."""
    for flag, path in flag_paths:
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")


@dataclass
class ServerConfig:
    """Options every server shares; a server's own config dataclass extends this one."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; loopback by default, 0.0.0.0 or [::] to accept remote clients"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    otlp_endpoint: str = field(default="", metadata={
        "help": "OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. http://localhost:4317 "
                "(empty = tracing off, no cost per request); see docs/tracing.md", "metavar": "URL"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "largest request or response message in bytes; larger requests get RESOURCE_EXHAUSTED (the retrieval "
                "server splits its stream's chunks to fit; the ranking server refuses to start below the largest "
                "answer its bundle can give)"})
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
        "help": "seconds in-flight RPCs get to finish after SIGTERM/SIGINT (and after --drain-delay) before they are "
                "cancelled; a stop takes up to drain delay + grace + the model's close: size Kubernetes' "
                "terminationGracePeriodSeconds above it"})
    drain_delay: float = field(default=0.0, metadata={
        "help": "seconds between health turning NOT_SERVING on SIGTERM/SIGINT and new RPCs being refused: time "
                "for load balancers and clients that watch health to stop sending (set it to about the readiness "
                "probe's period behind Kubernetes); RPCs that arrive meanwhile are still answered"})

    ports_file: Path | None = field(default=None, metadata={
        "help": "once listening, write the bound ports here as JSON ({\"port\": ..., \"metrics_port\": ..., "
                "\"health_port\": ..., \"pid\": ...}; the metrics and health ports as configured, null when off), "
                "replacing the file at once: how a harness that starts the server with --port 0 learns its port, "
                "with no race for a port picked beforehand", "metavar": "JSON"})
    parent_pid: int = field(default=0, metadata={
        "help": "drain and exit once process PID is no longer this server's parent (it died, even by SIGKILL): "
                "what loadtest's server harness passes, so a killed harness leaves no server behind; 0 = off",
        "metavar": "PID"})

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # cooperative: a config may mix in more dataclasses
        if parent:
            parent()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        check_files(("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-client-ca", self.tls_client_ca))
        if not 0 < self.max_message_bytes < 2 ** 31:  # gRPC's channel options are C ints
            raise ValueError(f"max_message_bytes must be between 1 and {2 ** 31 - 1}, got {self.max_message_bytes}")
        for flag, port in (("--port", self.port), ("--metrics-port", self.metrics_port),
                           ("--health-port", self.health_port)):
            if not 0 <= port <= 65535:  # gRPC would listen on port % 65536 and say it listens on that
                raise ValueError(f"{flag} must be a TCP port, 0 to 65535, got {port}")
        check_finite("grace", self.grace, unit="seconds")
        check_finite("drain_delay", self.drain_delay, unit="seconds")
        if self.parent_pid < 0:
            raise ValueError(f"parent_pid must be >= 0, got {self.parent_pid}")

    @property
    def tls(self) -> str:
        """How the server authenticates: 'off', 'TLS' or 'mutual TLS'."""
        return "mutual TLS" if self.tls_client_ca else "TLS" if self.tls_cert else "off"


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
