"""The one engine-level error type, shared by the ranking engines and the runtimes they load
(`palr.ortgenai_runtime`, `palr.trtllm_runtime`), so compile/ can raise it without importing the servers."""


class EngineError(RuntimeError):
    """The engine could not answer this request (crashed loop, closed engine, failed forward pass)."""
