"""Options of `python -m retrieval_server`; the command line is generated from this dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from palr.serving.config import ServerConfig, check_finite


@dataclass
class RetrievalServerConfig(ServerConfig):
    bundle: Path = field(default=Path("bundle"), metadata={
        "help": "bundle directory with catalog, users and sasrec.onnx (python -m compile all)", "metavar": "DIR"})
    threads: int = field(default=1, metadata={"help": "ONNX Runtime intra-op threads per call"})
    max_k: int = field(default=0, metadata={
        "help": "largest k a request may ask for; 0 = the model's top_k, the most it can return"})
    chunk_size: int = field(default=10, metadata={
        "help": "candidates per streamed message when the request does not say"})
    max_batch_size: int = field(default=32, metadata={
        "help": "most requests run as one ORT call by the micro-batcher; 1 = no batching, one ORT call "
                "per request"})
    batch_window_ms: float = field(default=0.0, metadata={
        "help": "how long the micro-batcher waits for more requests before an ORT call that is not "
                "full (never past a waiting request's deadline less twice the last call's time, at least 50 ms); "
                "0 = batch only what queued up while the previous call ran"})
    workers: int = field(default=1, metadata={
        "help": "ORT calls that may run at once when batching is off (--max-batch-size 1)"})
    max_queue: int = field(default=1024, metadata={
        "help": "requests that may wait for the model at once (queued or in an ORT call); one more is refused "
                "with RESOURCE_EXHAUSTED at once instead of waiting behind them (0 = no limit)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("threads", "chunk_size", "max_batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0 = no limit), got {self.max_queue}")
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {self.max_k}")
        check_finite("batch_window_ms", self.batch_window_ms)  # inf would hold a lone request forever
