"""`ModeRouter`: one `RankingEngine` over two, each request going to the engine of its mode.

The ortgenai CPU build wins only some ranking modes on a given machine (measured by
`compile build --target ortgenai-cpu`, recorded as `serves_modes`): those modes go to it and the
others stay on the torch engine, behind the one interface the server holds. The factory has the two
compute in turns on the one CPU (`ranking_server.engines.loop.DeviceTurns`), under one queue bound (`max_queue`,
here); `--context-cache-mb` bounds the torch engine's user contexts (ortgenai weighs none in bytes: it keeps
idle generators, at most `--max-batch-size`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from palr.ranking import MODES
from ranking_server.engines.base import (EngineOverloaded, EngineRequest, EngineResult, EngineStats, InvalidRequest,
                                         RankingEngine)


class ModeRouter(RankingEngine):
    """`max_queue`: requests waiting in all the engines together (the server's `--max-queue`, one bound for the
    caller whatever engine a mode goes to); beyond it EngineOverloaded at once. 0: each engine's own bound only."""

    def __init__(self, by_mode: dict[str, RankingEngine], max_queue: int = 0):
        missing = [m for m in MODES if m not in by_mode]
        if missing:
            raise ValueError(f"ModeRouter needs an engine for every mode; missing {missing}")
        self.by_mode = dict(by_mode)
        self.engines = list({id(e): e for e in self.by_mode.values()}.values())
        self.max_queue = max_queue
        self.rejected = 0
        modes = {id(e): ",".join(m for m, x in self.by_mode.items() if x is e) for e in self.engines}
        self.name = "+".join(f"{e.name}({modes[id(e)]})" for e in self.engines)
        self.version = "+".join(f"{e.version or 'unversioned'}({modes[id(e)]})" for e in self.engines)

    async def rank(self, request: EngineRequest) -> EngineResult:
        engine = self.by_mode.get(request.mode)
        if engine is None:
            raise InvalidRequest(f"mode must be one of {MODES}, got {request.mode!r}")
        # exact on one event loop: an engine's rank() queues the request before its first await, and the engine
        # threads only ever shorten the queues
        if request.reads_prompt and self.max_queue and self.queued() >= self.max_queue:  # else: answered at rank()
            self.rejected += 1
            raise EngineOverloaded(f"{self.name}: the engines' queues are full ({self.max_queue} waiting in all)")
        return await engine.rank(request)

    def queued(self) -> int:
        """Requests waiting for a batch slot in all the engines."""
        return sum(engine.stats().queued for engine in self.engines)

    def abort(self, request_id: str) -> bool:
        return any([engine.abort(request_id) for engine in self.engines])

    def check_health(self) -> bool:
        return all(engine.check_health() for engine in self.engines)

    def stats(self) -> EngineStats:
        """Counters summed over the engines; maxima are the largest of theirs."""
        parts = [engine.stats() for engine in self.engines]
        summed = {}
        for f in dataclasses.fields(EngineStats):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "engine":
                summed[f.name] = self.name
            elif f.name == "healthy":
                summed[f.name] = all(values)
            elif f.name.startswith("max_"):
                summed[f.name] = max(values)
            elif f.name.endswith("_hist"):
                summed[f.name] = dict(sum((Counter(v) for v in values), Counter()))
            else:
                summed[f.name] = sum(values)
        summed["rejected"] += self.rejected
        return EngineStats(**summed)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
