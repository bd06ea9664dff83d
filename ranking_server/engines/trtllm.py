"""`trtllm` engine: a TensorRT-LLM engine (`compile build --target trtllm`) behind `RankingEngine`,
through the LLM API with the TensorRT backend.

    LLM(model=engine_dir, kv_cache_config=KvCacheConfig(enable_block_reuse=True, ...),
        gather_generation_logits=True)                 # tensorrt_llm._tensorrt_engine.LLM in 1.x
    out = llm.generate_async(prompt_token_ids, SamplingParams(...), streaming=...)  # in our event loop
    await out / async for part in out;  out.abort() on cancel or deadline

TensorRT-LLM does the in-flight batching (its executor admits and retires requests every
iteration), the paged KV cache and KV block reuse (our shared instruction prefix fills whole blocks
that later requests reuse; the engine is built with paged context FMHA, which reuse needs). What a
request becomes is `trtllm_requests` (score: one step with generation logits; generate: greedy
under a per-request logits processor) — tested on CPU; this file is the wiring, and it needs an
NVIDIA GPU with TensorRT-LLM (tests/gpu/test_trtllm_engine.py runs it there).

TensorRT-LLM is imported when the engine is constructed, never at module import, and a clear
EngineError says what to install when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from palr.decoding import LabelConstraint, TitleConstraint
from palr.llm import label_log_probs
from palr.ranking import decoding_bias
from palr.trtllm_runtime import import_trtllm, read_engine_config, trt_backend_llm_class
from ranking_server.engines.base import (
    EngineAborted, EngineError, EngineOverloaded, EngineRequest, EngineResult, EngineStats, EngineTimings,
    InvalidRequest, RankingEngine, answer_by_bias)
from ranking_server.engines.config import EngineConfig
from ranking_server.engines.trtllm_requests import (ConstraintLogitsProcessor, emitted_order, label_scores,
                                                   readout_from_context, sampling_kwargs)

log = logging.getLogger(__name__)


def register_ipc_classes() -> None:
    """TensorRT-LLM unpickles requests in its executor worker only for allow-listed classes (1.x);
    our logits processor and the constraints it carries travel that way."""
    try:
        from tensorrt_llm.executor.serialization import register_approved_ipc_class
    except ImportError:
        return
    for cls in (ConstraintLogitsProcessor, LabelConstraint, TitleConstraint):
        register_approved_ipc_class(cls)


@dataclass
class TrtllmConfig(EngineConfig):
    """The engine limits (max_batch_size: requests in flight in the executor, <= the built value;
    max_queue: requests beyond it waiting, more: EngineOverloaded) plus what only TensorRT-LLM has."""

    max_num_tokens: int | None = field(default=None, metadata={"help": "tokens per iteration (<= built; None: built)"})
    free_gpu_memory_fraction: float = field(default=0.85, metadata={"help": "share of free GPU memory for the KV cache"})
    enable_block_reuse: bool = field(default=True, metadata={"help": "KV block reuse across requests (shared prefix)"})


class TrtllmEngine(RankingEngine):
    name = "trtllm"

    def __init__(self, engine_dir: str | Path, config: TrtllmConfig | None = None):
        config = config or TrtllmConfig()
        engine_dir = Path(engine_dir)
        engine_config = read_engine_config(engine_dir)
        build = engine_config["build_config"]
        llm_class = trt_backend_llm_class()
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        register_ipc_classes()
        started = time.perf_counter()
        llm = llm_class(
            model=str(engine_dir), tokenizer=str(engine_dir),
            kv_cache_config=KvCacheConfig(enable_block_reuse=config.enable_block_reuse,
                                          free_gpu_memory_fraction=config.free_gpu_memory_fraction),
            gather_generation_logits=True, max_batch_size=config.max_batch_size,
            **({"max_num_tokens": config.max_num_tokens} if config.max_num_tokens else {}))
        self._attach(llm, SamplingParams, int(engine_config["pretrained_config"]["vocab_size"]),
                     int(build["max_seq_len"]), build.get("max_input_len"), config)
        log.info("trtllm engine %s (TensorRT-LLM %s, engine version %s) loaded in %.1f s; batch <= %d, block reuse %s",
                 engine_dir, import_trtllm().__version__, engine_config.get("version"), time.perf_counter() - started,
                 self.config.max_batch_size, "on" if self.config.enable_block_reuse else "off")

    @classmethod
    def around(cls, llm, sampling_params, vocab_size: int, max_seq_len: int, config: TrtllmConfig | None = None):
        """The engine around an LLM already made: `llm` answers `generate_async` as `tensorrt_llm.LLM` does and
        `sampling_params` is its SamplingParams class (tests: a stand-in for TensorRT-LLM, which needs an NVIDIA GPU)."""
        engine = cls.__new__(cls)
        engine._attach(llm, sampling_params, vocab_size, max_seq_len, None, config or TrtllmConfig())
        return engine

    def _attach(self, llm, sampling_params, vocab_size: int, max_seq_len: int, max_input_len: int | None,
                config: TrtllmConfig) -> None:
        self.config = config
        self.llm = llm
        self._sampling_params = sampling_params
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len - 1  # one position is kept for the end token a finished generate request emits
        self.max_input_len = int(max_input_len or self.max_seq_len)
        self.end_id = int(llm.tokenizer.eos_token_id)
        self._outputs: dict[str, object] = {}  # request id → RequestOutput in flight
        self._between: set[str] = set()  # generate requests between their score pass and their generate pass
        self._aborted: set[str] = set()  # of those, the ones aborted there: their generate pass is not submitted
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._closed = False

    async def rank(self, request: EngineRequest) -> EngineResult:
        if not self.check_health():
            raise EngineError("trtllm engine is not running")
        constraint = request.validate(self.vocab_size, self.max_seq_len)
        if len(request.input_ids) > self.max_input_len:
            raise InvalidRequest(f"prompt of {len(request.input_ids)} tokens exceeds the engine's max_input_len "
                                 f"{self.max_input_len}")
        started = time.perf_counter()
        if request.mode == "generate" and request.readout is not None:
            # the readouts of a first (score) pass join the decoding bias: two prefills (see trtllm_requests)
            score_pass = dataclasses.replace(request, mode="score")
            with self._lock:
                self._between.add(request.request_id)  # abort() finds it between the two passes too
            try:
                scored, _ = await self._run(score_pass, None)
                self._check_not_aborted(request, scored)
                self._count(prompt_tokens=len(score_pass.run_ids))  # a pass of its own, before the generate one
                with self._failures_counted():  # non-finite readouts too (palr.ranking.finite_readout)
                    read = readout_from_context(scored.context_logits, len(score_pass.run_ids), request.readout)
                    request = dataclasses.replace(request, bias=decoding_bias(request.bias, read), readout=None)
                with self._lock:
                    aborted = request.request_id in self._aborted
                if aborted:
                    self._count("aborted")
                    raise EngineAborted(f"request {request.request_id} aborted after its score pass")
            finally:
                with self._lock:
                    self._between.discard(request.request_id)
                    self._aborted.discard(request.request_id)
        if request.mode == "generate" and not request.decodes:
            # weight 0: the answer is the bias's order (palr.llm.emit_by_bias), with the readouts joined above; a
            # label-readout ranker reads nothing from the prompt, so no pass runs at all (EngineRequest.reads_prompt;
            # a decode here would run up to max_new_tokens steps for the same answer)
            return self._by_bias(request, constraint, started)
        output, first_token = await self._run(request, constraint, streaming=request.mode == "generate")
        with self._failures_counted():
            return self._result(request, output, started, first_token)

    @contextlib.contextmanager
    def _failures_counted(self):
        """Counts an EngineError raised reading a finished pass's output (`_run` counts its own) as failed."""
        try:
            yield
        except EngineAborted:  # counted as aborted where it is raised
            raise
        except EngineError:
            self._count("failed")
            raise

    async def _run(self, request: EngineRequest, constraint, streaming: bool = False):
        """Submit one request to the executor and wait for it: (RequestOutput, time of the first streamed
        part or None)."""
        with self._lock:
            if len(self._outputs) >= self.config.max_batch_size + self.config.max_queue:
                self._counts["rejected"] += 1
                raise EngineOverloaded(f"trtllm engine has {len(self._outputs)} requests in flight")
            if request.request_id in self._outputs:
                raise InvalidRequest(f"request_id {request.request_id!r} is already in flight")
            try:
                params = self._sampling_params(**sampling_kwargs(request, constraint, self.end_id))
                # a request that ends with its prompt stops at its last readout (EngineRequest.run_ids); one that
                # decodes runs the whole prompt
                output = self.llm.generate_async(request.run_ids, sampling_params=params, streaming=streaming)
            except EngineError:
                self._counts["failed"] += 1
                raise
            except ValueError as e:  # TensorRT-LLM's own argument checks: the request this server built is refused
                self._counts["failed"] += 1
                raise InvalidRequest(f"TensorRT-LLM refused request {request.request_id}: {e}") from e
            except Exception as e:  # noqa: BLE001 - any other failure to submit is this request's
                self._counts["failed"] += 1
                raise EngineError(f"trtllm could not submit request {request.request_id}: {e!r}") from e
            self._outputs[request.request_id] = output
        first_token = None
        try:
            if streaming:
                async for _ in output:  # streaming: the first part marks the end of prefill
                    first_token = first_token or time.perf_counter()
            else:
                await output.aresult()
        except asyncio.CancelledError:
            output.abort()
            self._count("aborted")
            raise
        except Exception as e:  # noqa: BLE001 - TensorRT-LLM's errors become ours
            self._count("failed")
            raise EngineError(f"trtllm request {request.request_id} failed: {e!r}") from e
        finally:
            with self._lock:
                self._outputs.pop(request.request_id, None)
        return output, first_token

    def _by_bias(self, request: EngineRequest, constraint, started: float) -> EngineResult:
        """Generate mode at logit weight 0: the constrained answer in the bias's order, after the score pass (its
        prompt tokens counted when it ran) or without any pass (a label-readout ranker)."""
        with self._failures_counted():
            result = answer_by_bias(request, constraint, started)
        self._count("completed", written_tokens=result.generated_tokens)  # no decode pass: not the model's tokens
        return result

    def _result(self, request: EngineRequest, output, started: float, first_token: float | None) -> EngineResult:
        self._check_not_aborted(request, output)
        completion = output.outputs[0]
        now = time.perf_counter()
        if request.mode == "score":
            if request.readout is not None:
                scores = label_log_probs(torch.tensor(readout_from_context(
                    output.context_logits, len(request.run_ids), request.readout)))
            else:
                scores = label_scores(completion.generation_logits, request.label_token_ids)
            order, generated, prefilled = sorted(range(len(scores)), key=lambda c: -scores[c]), 0, now
        else:
            order, generated = emitted_order(request.validate(self.vocab_size, self.max_seq_len),
                                             list(completion.token_ids))
            scores, prefilled = None, first_token or now
        self._count("completed", prompt_tokens=len(request.run_ids), generated_tokens=generated)
        # queue time is inside TensorRT-LLM's executor and not reported per request: prefill_ms includes it
        timings = EngineTimings(queue_ms=0.0, prefill_ms=1e3 * (prefilled - started),
                                decode_ms=1e3 * (now - prefilled), total_ms=1e3 * (now - started))
        return EngineResult(request.request_id, request.mode, order, scores, prompt_tokens=len(request.input_ids),
                            cached_tokens=0, generated_tokens=generated, timings=timings)

    def _check_not_aborted(self, request: EngineRequest, output) -> None:
        if output.outputs[0].finish_reason == "cancelled" or getattr(output, "aborted", lambda: False)():
            self._count("aborted")
            raise EngineAborted(f"request {request.request_id} aborted")

    def abort(self, request_id: str) -> bool:
        with self._lock:
            output = self._outputs.get(request_id)
            if output is None and request_id in self._between:  # between its two passes: the second is not run
                self._aborted.add(request_id)
                return True
        if output is None:
            return False
        output.abort()
        return True

    def check_health(self) -> bool:
        if self._closed:
            return False
        check = getattr(self.llm, "_check_health", None)  # 1.x; older releases have no health call
        return bool(check()) if check else True

    def stats(self) -> EngineStats:
        with self._lock:
            c = self._counts
            return EngineStats(engine=self.name, healthy=self.check_health(), active=len(self._outputs),
                               completed=c["completed"], failed=c["failed"], aborted=c["aborted"],
                               rejected=c["rejected"], prompt_tokens=c["prompt_tokens"],
                               generated_tokens=c["generated_tokens"], written_tokens=c["written_tokens"])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            outputs = list(self._outputs.values())
        for output in outputs:
            output.abort()
        self.llm.shutdown()

    def _count(self, name: str | None = None, **amounts: int) -> None:
        """One more `name` (an outcome; None: none) and the token `amounts`."""
        with self._lock:
            if name:
                self._counts[name] += 1
            self._counts.update(amounts)
