"""Options of `python -m ranking_server`; the command line is generated from this dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from palr.serving.config import ServerConfig, check_files, check_finite
from ranking_server.engines.config import EngineConfig

ENGINES = ("hf", "trtllm", "ortgenai")
DEVICES = ("cpu", "cuda")
MAX_DEFAULT_DEADLINE_MS = 86_400_000.0  # a day: gRPC's deadline arithmetic overflows past ~7e9 s (every call fails)


PORTLESS_SCHEMES = ("unix:", "unix-abstract:", "xds:")  # targets that name no TCP port


def check_target_port(target: str) -> None:
    """ValueError unless a gRPC target names its port ("HOST:PORT", "[IPv6]:PORT", "dns:///NAME:PORT"; unix
    sockets and xds aside): "dns:///retrieval-headless" was accepted and gRPC's resolver then dialled port 443."""
    if target.startswith(PORTLESS_SCHEMES):
        return
    addresses = target.split("///", 1)[-1]  # dns:///NAME:PORT
    for scheme in ("ipv4:", "ipv6:"):  # ipv4:A:PORT,B:PORT (gRPC's static address lists)
        addresses = addresses.removeprefix(scheme)
    for address in addresses.split(","):
        host, _, port = address.rpartition(":")
        bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))  # "::1": no port in it
        if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--retrieval must name the retrieval server and its port: HOST:PORT, [IPv6]:PORT, "
                             f"dns:///NAME:PORT, ipv4:A:PORT,B:PORT (or unix:PATH, xds:///NAME), got {target!r}")


@dataclass
class RankingServerConfig(ServerConfig, EngineConfig):
    """The server's own options, the shared server options (ServerConfig) and the engine limits
    (EngineConfig: --max-batch-size, --max-tokens-per-step, --max-queue, --max-seq-len, --prefix-reuse,
    --prefix-cache-size, --threads), each declared once; `EngineConfig.of(config)` takes the engine's part."""

    bundle: Path = field(default=Path("bundle"), metadata={
        "help": "bundle directory with catalog, users, profiles, llm/merged and llm/ranker.json "
                "(python -m compile all)", "metavar": "DIR"})
    port: int = field(default=50052, metadata={"help": "gRPC port (0 = any free port)"})

    # -- the retrieval tier --------------------------------------------------------------------
    retrieval: str = field(default="127.0.0.1:50051", metadata={
        "help": "address of the retrieval server (python -m retrieval_server): HOST:PORT, or any gRPC target such "
                "as dns:///retrieval-headless.NS.svc.cluster.local:50051", "metavar": "HOST:PORT"})
    retrieval_tls_ca: Path | None = field(default=None, metadata={
        "help": "PEM CA that signed the retrieval server's certificate; turns TLS on for that channel",
        "metavar": "PEM"})
    retrieval_tls_cert: Path | None = field(default=None, metadata={
        "help": "PEM client certificate for mutual TLS with the retrieval server (with --retrieval-tls-key)",
        "metavar": "PEM"})
    retrieval_tls_key: Path | None = field(default=None, metadata={
        "help": "PEM private key of --retrieval-tls-cert", "metavar": "PEM"})
    retrieval_lb: str = field(default="pick_first", metadata={
        "help": "gRPC client-side load balancing over the addresses --retrieval resolves to: round_robin spreads "
                "requests over every retrieval replica (with --retrieval dns:///NAME:PORT, e.g. a Kubernetes "
                "headless Service) that say SERVING (client-side health checking: a loading, draining or failed "
                "replica gets no calls), pick_first uses one at a time", "choices": ("pick_first", "round_robin")})
    retrieval_chunk_size: int = field(default=0, metadata={
        "help": "candidates per streamed retrieval message (0 = the retrieval server's default)"})
    retrieval_attempts: int = field(default=3, metadata={
        "help": "attempts of a Retrieve call that ends UNAVAILABLE before the retrieval server sent headers or a "
                "message (a replica restarting or draining): gRPC retries it with backoff (50 ms, doubling, <= 500 "
                "ms), within the caller's deadline, on the next ready replica under round_robin, and stops retrying "
                "once failures outrun successes about 1 to 10 (retry throttling); 1 = no retry"})
    retrieval_queue_full_retries: int = field(default=1, metadata={
        "help": "under round_robin, times a Retrieve refused RESOURCE_EXHAUSTED for a replica's full --max-queue "
                "(before any answer) is sent again at once, within the caller's deadline, so the next replica "
                "round_robin picks can serve it (most often another one: the picks of concurrent calls interleave); "
                "counted in ranking_retrieval_queue_full_retries_total. Not done under pick_first (the same replica "
                "would get it) nor for other refusals. 0 = pass the refusal on; at most 4"})

    max_seq_len: int = field(default=0, metadata={
        "help": "prompt + generated tokens per request (the size of one KV slot of the hf and ortgenai engines); "
                "0 = the longest prompt + answer this bundle can build with --max-k candidates (computed at start-up). "
                "A smaller value that the longest prompt cannot fit stops the server at start-up"})
    # -- candidates ----------------------------------------------------------------------------
    candidates: int = field(default=0, metadata={
        "help": "candidates retrieved and ranked when a request's num_candidates is 0; 0 = the K the "
                "LLM was tuned with (llm/ranker.json)"})
    max_k: int = field(default=0, metadata={
        "help": "largest num_candidates a request may ask for; 0 = the K the LLM was tuned with. At most "
                "the number of prompt labels (26 letters by default)"})

    # -- the LLM engine ------------------------------------------------------------------------
    engine: str = field(default="hf", metadata={
        "help": "LLM backend: hf (transformers, in-flight batching), trtllm (TensorRT-LLM engine, NVIDIA GPUs) or "
                "ortgenai (onnxruntime-genai CPU build, for the modes its build won; torch serves the rest). "
                "A bundle build for the engine and device (compile build --target ...) is used and checked against "
                "this machine; hf without one serves llm/merged as is",
        "choices": ENGINES})
    device: str = field(default="cpu", metadata={"help": "where the LLM runs", "choices": DEVICES})
    engine_check_s: float = field(default=1.0, metadata={
        "help": "seconds between engine health checks once serving; an engine that has failed (its loop "
                "crashed) turns grpc health NOT_SERVING, so probes take the replica out and restart it (0 = off)"})

    # -- deadlines -----------------------------------------------------------------------------
    default_deadline_ms: float = field(default=30_000.0, metadata={
        "help": "deadline of a request whose caller set none"})
    degrade_reserve_ms: float = field(default=100.0, metadata={
        "help": "time kept back from the caller's deadline to answer by the linear term (degraded) when "
                "the LLM is not done; the LLM request is aborted this long before the deadline, and a deadline "
                "shorter than this gets the linear term's order without asking the LLM"})

    def __post_init__(self) -> None:
        super().__post_init__()  # ServerConfig, then EngineConfig (cooperative)
        if not 1 <= self.retrieval_attempts <= 5:  # gRPC clamps a retry policy's maxAttempts to 5
            raise ValueError(f"--retrieval-attempts must be in [1, 5], got {self.retrieval_attempts}")
        if bool(self.retrieval_tls_cert) != bool(self.retrieval_tls_key):
            raise ValueError("--retrieval-tls-cert and --retrieval-tls-key go together")
        check_files(("--retrieval-tls-ca", self.retrieval_tls_ca), ("--retrieval-tls-cert", self.retrieval_tls_cert),
                    ("--retrieval-tls-key", self.retrieval_tls_key))
        check_target_port(self.retrieval)
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.engine != "trtllm" and self.max_queue < 1:  # refused now, not after the model loads
            raise ValueError(f"--max-queue must be >= 1 for the {self.engine} engine (each request waits in its "
                             f"queue until the engine thread admits it), got {self.max_queue}")
        for name in ("retrieval_chunk_size", "retrieval_queue_full_retries", "candidates", "max_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.retrieval_queue_full_retries > 4:  # resent at once, without backoff: a few replicas' worth
            raise ValueError(f"--retrieval-queue-full-retries must be in [0, 4], got "
                             f"{self.retrieval_queue_full_retries}")
        if self.retrieval_chunk_size > 2**31 - 1:  # an int32 in the Retrieve request
            raise ValueError(f"retrieval_chunk_size must be < 2**31, got {self.retrieval_chunk_size}")
        check_finite("default_deadline_ms", self.default_deadline_ms, positive=True)
        if self.default_deadline_ms > MAX_DEFAULT_DEADLINE_MS:
            raise ValueError(f"--default-deadline-ms {self.default_deadline_ms:g} is over a day "
                             f"({MAX_DEFAULT_DEADLINE_MS:g} ms); far larger ones (to mean 'no deadline') made every "
                             f"call without a deadline fail at once, DEADLINE_EXCEEDED, in gRPC's deadline arithmetic")
        check_finite("engine_check_s", self.engine_check_s)
        check_finite("degrade_reserve_ms", self.degrade_reserve_ms)
        if self.degrade_reserve_ms >= self.default_deadline_ms:  # the LLM would never be asked without a deadline
            raise ValueError(f"--degrade-reserve-ms {self.degrade_reserve_ms} must be below --default-deadline-ms "
                             f"{self.default_deadline_ms}")

    @property
    def retrieval_tls(self) -> bool:
        return bool(self.retrieval_tls_ca or self.retrieval_tls_cert)
