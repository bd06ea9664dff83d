"""Wiring: a verified bundle → planner, prompts, retrieval client, engine → the servicer → a
`palr.serving.server.GrpcServer`. The tokenizer and the LLM load (and warm up) while health says NOT_SERVING."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time

from palr.bundle import Bundle
from palr.catalog import Catalog
from palr.prompt import PromptSettings
from palr.ranking import load_ranker, stale_ranker_inputs
from palr.serving import tracing
from palr.serving.loading import in_load_thread
from palr.serving.server import GrpcServer
from palr.serving.validation import MAX_ITEM_IDS
from ranking_server.config import RankingServerConfig
from ranking_server.engines.factory import LLM_ARTIFACT, build_engine
from ranking_server.engines.base import EngineRequest, InvalidRequest, RankingEngine
from ranking_server.inject import injected_load_delay_s
from ranking_server.metrics import ENGINE
from ranking_server.planner import Plan, RequestPlanner
from ranking_server.prompts import PromptBuilder, load_trends, slot_tokens, trend_moments
from ranking_server.retrieval_client import RetrievalClient
from ranking_server.servicer import SERVICE_NAME, RankingServicer
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger(__name__)

SLOT_BLOCK = 64  # --max-seq-len 0 sizes KV slots in whole blocks of this many tokens

ARTIFACTS = ["catalog", "users", "profiles", "ranker"]  # + the engine's own, verified by build_engine
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def not_weights(rel: str) -> bool:
    """llm/merged's files other than weights: tokenizer, chat template, configs (cheap to hash)."""
    return not rel.endswith(WEIGHT_SUFFIXES)


class RankingServer:
    """The ranking tier in one process; construct it inside the running event loop.
    `run()` is the whole life; tests drive the steps:
    `start()` (listening, NOT_SERVING) → `load()` (tokenizer, engine, warm-up) → `server.set_serving()`
    → `drain()`."""

    def __init__(self, config: RankingServerConfig, tracer_provider=None):
        self.config = config
        bundle = Bundle.open(config.bundle)
        bundle.verify(ARTIFACTS)
        # the tokenizer and configs the prompts are built with, also when a build serves (the weights are checked
        # by the engine that loads them; when a build serves, llm/merged's are not loaded at all)
        bundle.verify([LLM_ARTIFACT], only=not_weights)
        self.bundle = bundle
        self.ranker = load_ranker(bundle)
        stale = stale_ranker_inputs(bundle, self.ranker)
        if stale:  # served all the same: the answers are valid, their ranking may be worse
            log.warning("the ranker was fit on other inputs than the bundle holds (%s): its prompts and fused terms "
                        "now read data its weights were not fit on; rebuild it: python -m compile all --bundle %s "
                        "--preset PRESET", "; ".join(stale), bundle.root)
        self.catalog = Catalog.load(bundle.path("catalog"))
        users = json.loads(bundle.path("users").read_text())["users"]
        default_candidates, max_candidates = candidate_limits(config, self.ranker)
        self.trends = load_trends(bundle, self.ranker)  # read once: the planner's moment check and the prompts
        self.planner = RequestPlanner(self.catalog, {u: e["history"] for u, e in users.items()},
                                      default_candidates=default_candidates, max_candidates=max_candidates,
                                      as_of_span=trend_moments(self.trends, self.ranker))
        largest = largest_answer_bytes(self.catalog, max_candidates)
        if config.max_message_bytes < largest:  # gRPC would refuse the answer after the work, as a traceback
            raise ValueError(f"--max-message-bytes {config.max_message_bytes} is below the largest answer this bundle "
                             f"can give ({largest} bytes: {max_candidates} items with its longest ids and titles)")
        traces = tracer_provider or tracing.tracer_provider("ranking_server", config.otlp_endpoint)
        self.retrieval = RetrievalClient(config, max(config.max_message_bytes, largest_retrieve_bytes(self.catalog)))
        ranker = f" ranker:{bundle.version('ranker')}" if bundle.has("ranker") else ""
        self.servicer = RankingServicer(config, self.planner, self.retrieval,
                                        bundle_versions=f"llm:{bundle.version(LLM_ARTIFACT)}{ranker}",
                                        tracer=tracing.tracer(traces, "ranking_server"),
                                        retrieval_model=bundle.version("sasrec_onnx") if bundle.has("sasrec_onnx")
                                        else None)
        self.server = GrpcServer(config, [SERVICE_NAME])
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(self.servicer, self.server.grpc)
        self.engine: RankingEngine | None = None
        self._engine_watch: asyncio.Task | None = None
        self._injected_load_delay_s = injected_load_delay_s()  # test-only, 0 by default
        log.info("bundle %s verified: %d items, %d users, ranker K=%d (requests: %d candidates by default, at most "
                 "%d), fusion weight %.2f, generate format %s; retrieval tier %s (TLS %s)", bundle.root,
                 len(self.catalog), len(users), self.ranker["candidates"], default_candidates, max_candidates,
                 float(self.ranker["fusion_weight"]), self.ranker["generate_format"], config.retrieval,
                 "on" if config.retrieval_tls else "off")

    async def start(self) -> int:
        return await self.server.start()

    async def load(self) -> None:
        """Tokenizer, engine and warm-up in threads (health keeps answering; a stop does not wait for them:
        palr/serving/loading.py), then connects them."""
        if self._injected_load_delay_s:  # test-only (RANKING_INJECT_LOAD_DELAY_MS): a load that takes this long
            await in_load_thread(time.sleep, self._injected_load_delay_s)
        prompts = await in_load_thread(self._prompt_builder)
        prompts.warn_unprofiled(self.planner.stored_histories)
        longest = await in_load_thread(prompts.longest_requests, self.planner.max_candidates)
        self.engine = await in_load_thread(build_engine, self.bundle, self._sized(longest),
                                           on_abandoned=lambda engine: engine.close())  # a stop came during the build
        await self._warm_up(longest)
        self.servicer.attach(self.engine, prompts)
        ENGINE.attach(self.engine)
        if self.config.engine_check_s:
            self._engine_watch = asyncio.create_task(self._watch_engine(self.engine))
        await self._reach_retrieval()

    async def _reach_retrieval(self, every_s: float = 1.0, log_every_s: float = 30.0) -> None:
        """Returns once the retrieval tier answers SERVING through the channel Recommend uses: until then health
        stays NOT_SERVING. A rollout with a wrong --retrieval address or certificate stalls on pods that never
        turn ready, instead of replacing working pods with ones that answer every call UNAVAILABLE. Once this
        server is SERVING its health no longer follows the retrieval tier (its outage would take both tiers out)."""
        logged = -math.inf
        while (problem := await self.retrieval.unreachable()) is not None:
            if time.monotonic() - logged >= log_every_s:
                log.warning("health stays NOT_SERVING until the retrieval tier at %s answers (it cannot be reached "
                            "through this server's channel: %s)", self.config.retrieval, problem)
                logged = time.monotonic()
            await asyncio.sleep(every_s)
        if logged > -math.inf:
            log.info("the retrieval tier at %s answers now", self.config.retrieval)

    async def drain(self) -> None:
        await self.server.drain()
        await self._close()

    async def run(self) -> None:
        """Serves until SIGTERM/SIGINT, then drains (see GrpcServer.run)."""
        await self.server.run(self.load, cleanup=self._close)

    def _prompt_builder(self) -> PromptBuilder:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.bundle.path(LLM_ARTIFACT))
        return PromptBuilder.for_bundle(self.bundle, tokenizer, self.ranker, self.catalog, self.trends)

    def _sized(self, longest: list[EngineRequest]) -> RankingServerConfig:
        """The config with `--max-seq-len 0` resolved: the KV slot of the longest prompt + answer the bundle can
        build (`longest`: `PromptBuilder.longest_requests`), rounded up to a multiple of SLOT_BLOCK tokens."""
        if self.config.max_seq_len:
            return self.config
        need = slot_tokens(longest)
        size = -(-need // SLOT_BLOCK) * SLOT_BLOCK
        log.info("max_seq_len %d: the longest prompt + answer this bundle builds with %d candidates is %d tokens",
                 size, self.planner.max_candidates, need)
        return dataclasses.replace(self.config, max_seq_len=size)

    async def _warm_up(self, longest: list[EngineRequest]) -> None:
        """One score and one generate request on the longest prompt this server can be asked to build (`longest`:
        `PromptBuilder.longest_requests`, the longest titles and profile, `max_candidates` candidates, generate
        naming all). The shared prefix's KV is computed and cached, the first real request pays no first-call
        costs, and a prompt that cannot fit the engine (`--max-seq-len`) stops the server here, at start-up,
        instead of failing the users whose titles happen to be long."""
        started = time.perf_counter()
        n = self.planner.max_candidates
        for request in longest:
            try:
                await self.engine.rank(request)
            except InvalidRequest as e:
                raise ValueError(f"the longest {request.mode} prompt this bundle can build ({n} candidates, the longest "
                                 f"titles and profile) does not fit the engine: {e}. Raise --max-seq-len (the KV slot "
                                 f"of the hf/ortgenai engines; a trtllm engine's is its build's) or lower --max-k") from e
        log.info("warmed up on the longest prompt (score + generate, %d candidates, %d prompt tokens) in %.2f s", n,
                 max(len(r.input_ids) for r in longest), time.perf_counter() - started)

    async def _watch_engine(self, engine: RankingEngine) -> None:
        """Health follows the engine: once its loop has failed, NOT_SERVING for good (requests still get
        the linear term's order flagged degraded meanwhile; a restart is the way back)."""
        while engine.check_health():
            await asyncio.sleep(self.config.engine_check_s)
        await self.server.set_not_serving(f"the {engine.name} engine has failed; answering by the linear term "
                                          f"(degraded, no LLM) until this server is restarted")

    async def _close(self) -> None:
        if self._engine_watch is not None:
            self._engine_watch.cancel()
            self._engine_watch = None
        self.servicer.attach(None, None)
        ENGINE.attach(None)
        await self.retrieval.close()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
            self.engine = None


async def serve(config: RankingServerConfig) -> None:
    """The whole life of `python -m ranking_server` (the gRPC server must be made inside the loop)."""
    await RankingServer(config).run()


ANSWER_SLACK_BYTES = 4096  # an answer's fields besides its items: timings, flags, versions, ids, a degraded reason


def largest_answer_bytes(catalog: Catalog, max_items: int) -> int:
    """An upper bound on a Recommend answer's size: `max_items` items with the catalog's longest id and title."""
    longest_id = max((item.id for item in catalog.items), key=lambda x: len(x.encode()))
    longest_title = max((item.label for item in catalog.items), key=lambda x: len(x.encode()))
    item = ranking_pb2.RankedItem(item_id=longest_id, title=longest_title, score=-1.0, rank=2 ** 30,
                                  retrieval_rank=2 ** 30)
    return ranking_pb2.RecommendResponse(items=[item] * max_items).ByteSize() + ANSWER_SLACK_BYTES


def largest_retrieve_bytes(catalog: Catalog) -> int:
    """An upper bound on the Retrieve this server sends: a history and an exclude list of `MAX_ITEM_IDS` ids each
    (the planner sends a stored history in full), so the retrieval channel's limit is not the caller-facing one."""
    longest_id = max(len(item.id.encode()) for item in catalog.items)
    return 2 * MAX_ITEM_IDS * (longest_id + 3) + ANSWER_SLACK_BYTES  # per id: its bytes, a tag, a length


def candidate_limits(config: RankingServerConfig, ranker: dict) -> tuple[int, int]:
    """(candidates when a request says 0, most a request may ask for), checked against the prompt."""
    labels = len(PromptSettings.from_dict(ranker["prompt"]).label_alphabet)
    tuned = int(ranker["candidates"])
    max_candidates = config.max_k or min(tuned, labels)
    if max_candidates > labels:
        raise ValueError(f"--max-k {max_candidates} is more than the prompt has labels for ({labels})")
    default = config.candidates or min(tuned, max_candidates)
    if default > max_candidates:
        raise ValueError(f"--candidates {default} is more than --max-k {max_candidates}")
    if max_candidates > tuned:
        log.warning("--max-k %d: requests may ask for more candidates than the ranker was fit and evaluated on (%d); "
                    "its ranking of longer lists is unmeasured", max_candidates, tuned)
    return default, max_candidates
