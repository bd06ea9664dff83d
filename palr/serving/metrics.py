"""Per-RPC Prometheus metrics (requests by status code, latency, in flight), shared by both servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram

from palr.serving import tracing
from palr.serving.errors import REQUEST_ID_KEY, RequestError

# When a stopping server's grace period ends (time.monotonic(); GrpcServer.drain sets it, start clears it): gRPC
# then cancels the RPCs still running, and a handler cancelled from then on was cut by the stop, not by its client.
# One per process, as a server runs one GrpcServer; where several share a process (tests), one's drain can label
# another's client cancels (only the log line; the status code is CANCELLED either way).
_grace_ends_at: float | None = None
GRACE_TIMER_SLACK_S = 0.05  # the core's timer may fire this much before the asyncio clock says so
# An answer sent more than this after the RPC's deadline is counted DEADLINE_EXCEEDED, what its client most likely
# got. On loopback the outcome flips about here: sent 0.5 ms late, 14 of 15 arrived OK; 1 ms, 3 of 15; 2 ms and
# later, none (`context.time_remaining()` reads 0 for all of them, so the lateness is taken from the clock).
LATE_ANSWER_SLACK_S = 0.001


def note_grace_end(at: float | None) -> None:
    """Records when the stopping server's grace period ends (None: serving, no stop under way)."""
    global _grace_ends_at
    _grace_ends_at = at


def answered_code(late_s: float) -> grpc.StatusCode:
    """The status an answer sent `late_s` seconds after its deadline (negative: before it) is counted with."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if late_s > LATE_ANSWER_SLACK_S else grpc.StatusCode.OK


# The server's deadline starts when the request reaches it, after its client's: the request's time in transit (and
# the client's cancel's, the other way) is a few ms on loopback, more on a busy machine or a network. At most a tenth
# of the timeout, so a client that cancels a short call early is still counted CANCELLED.
DEADLINE_TRANSIT_SLACK_S = 0.025


def deadline_skew_s(timeout_s: float) -> float:
    """How much later than its client's the server's deadline may be: gRPC sends a timeout rounded up to three
    significant figures of milliseconds (1.011 s goes as 1.02 s, 12.345 s as 12.4 s), so by up to 1 %, and at least
    the millisecond it rounds to; plus the request's and the cancel's transit. A client that cancels on its own
    that close to its deadline is counted DEADLINE_EXCEEDED too."""
    return max(0.001, 0.01 * timeout_s) + min(DEADLINE_TRANSIT_SLACK_S, 0.1 * timeout_s)


def _cut_by_stop() -> bool:
    return _grace_ends_at is not None and time.monotonic() >= _grace_ends_at - GRACE_TIMER_SLACK_S


# what this process's health says, for a dashboard or an alert (the transitions were in the log only)
SERVING = Gauge("recsys_health_serving", "1 while this server's health says SERVING; 0 while it loads, after its "
                "model failed, and while it drains")
CERT_EXPIRY = Gauge("recsys_tls_certificate_expiry_timestamp_seconds", "when the TLS certificate in use stops being "
                    "valid (unix time; alert when it is a few days from time()): role server, the one this server "
                    "presents (re-read when its files change); client, the one it presents to the tier it calls "
                    "(read at start-up: renewing it needs a restart)", ["role"])


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.032, 0.04, 0.05,
                   0.064, 0.075, 0.1, 0.128, 0.15, 0.2, 0.256, 0.3, 0.4, 0.512, 0.75,
                   1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)  # up to past the longest deadlines in use (30 s by
# default, 120 s for generate in the load test): a quantile falling in +Inf reads as the last edge, so 16 s flattened
# every p95/p99 panel under overload. Dense where the tiers answer (retrieval 1-10 ms, ranking 20-300 ms on CPU):
# with edges only at powers of two, a ranking p95 of 71 ms read as 92 ms (histogram_quantile interpolates linearly
# inside a bucket)


def _ended_code(context: grpc.aio.ServicerContext, remaining: float | None, rid: str,
                logger: logging.Logger) -> grpc.StatusCode:
    """The code of a call that ended before its handler did: DEADLINE_EXCEEDED or CANCELLED (logged)."""
    left = context.time_remaining()
    # gRPC cancels a handler whose deadline passed too; the client's own deadline came up to the rounding of its
    # timeout and the transit earlier (it cancelled then, while the server's deadline had a little left)
    if left is not None and left <= deadline_skew_s(remaining):
        logger.info("rid=%s deadline exceeded", rid)
        return grpc.StatusCode.DEADLINE_EXCEEDED
    logger.info("rid=%s cancelled %s", rid, "by the server's stop: its --grace period ended before this RPC did"
                if _cut_by_stop() else "by the client")
    return grpc.StatusCode.CANCELLED


class Answered:
    """What a handler counts about its answer (how it was answered, its stages' latencies), run once the call is
    counted OK: an answer sent after its deadline never reached the client, so it is not counted as answered."""

    def __init__(self):
        self._counts: list[Callable[[], None]] = []

    def then(self, count: Callable[[], None]) -> None:
        self._counts.append(count)

    def run(self) -> None:
        for count in self._counts:
            count()


class RpcMetrics:
    """Prometheus metrics for one RPC: requests by status code, latency, requests in flight.

    Create one per RPC per process (prometheus_client registers names process-wide)."""

    def __init__(self, prefix: str, rpc: str):
        self.rpc = rpc
        self.requests = Counter(f"{prefix}_requests", f"{rpc} RPCs by final status code", ["code"])
        # by code: a refusal (RESOURCE_EXHAUSTED under overload, INVALID_ARGUMENT) takes microseconds, so one
        # histogram over every outcome read lower the more calls were refused; latency panels read code="OK"
        self.latency = Histogram(f"{prefix}_request_seconds", f"{rpc} latency from handler start to last message, "
                                 "by final status code", ["code"], buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge(f"{prefix}_requests_in_flight", f"{rpc} RPCs being handled now")
        self.requests.labels("OK")  # the answered series exist, at 0, from start-up: a rate() or an SLO ratio over
        self.latency.labels("OK")  # them reads 0 before the first call, not "no data"

    @contextlib.asynccontextmanager
    async def track(self, context: grpc.aio.ServicerContext, rid: str, logger: logging.Logger, tracer=None):
        """Wraps a handler: counts and times it (and traces it: `tracer`, palr.serving.tracing); a
        RequestError becomes its status code, any other exception INTERNAL (logged with traceback); the
        server keeps serving either way. Every answer, error or not, carries the request id its log lines
        name as trailing metadata `x-request-id` (one the server made up included). Yields an `Answered`: what
        the handler hands it runs only when the call is counted OK (an answer sent in time)."""
        started = time.perf_counter()
        rid_metadata = ((REQUEST_ID_KEY, rid),)
        context.set_trailing_metadata(rid_metadata)
        remaining = context.time_remaining()  # None: no deadline
        deadline = None if remaining is None else time.monotonic() + remaining
        code = grpc.StatusCode.OK
        span_scope = tracing.server_span(tracer or tracing.tracer(None, ""), self.rpc, context, rid)
        span = span_scope.__enter__()
        self.in_flight.inc()  # after the span started (that may raise): the finally below always takes it back
        answered = Answered()
        try:
            yield answered
        except RequestError as e:
            code = e.code
            logger.info("rid=%s %s: %s", rid, code.name, e)
            await context.abort(code, str(e), trailing_metadata=(*e.trailing_metadata, *rid_metadata))
        except asyncio.CancelledError:
            code = _ended_code(context, remaining, rid, logger)
            raise
        except Exception:
            if context.cancelled():  # the call ended (the client cancelled, its deadline passed) while the handler
                code = _ended_code(context, remaining, rid, logger)  # waited in a write, which gRPC failed with its
                raise  # own error before it cancelled the handler: no bug, no status to send (gRPC drops it)
            code = grpc.StatusCode.INTERNAL
            logger.exception("rid=%s failed", rid)
            await context.abort(code, f"internal error (request id {rid}); see the server log",
                                trailing_metadata=rid_metadata)
        else:  # answered; but an answer after the deadline (a stretch without an await ran past it) never arrives
            late_s = time.monotonic() - deadline if deadline is not None else 0.0
            code = answered_code(late_s)
            if code != grpc.StatusCode.OK:
                logger.info("rid=%s answered %.0f ms after its deadline: the client got DEADLINE_EXCEEDED", rid,
                            1e3 * late_s)
            else:
                try:
                    answered.run()
                except Exception:  # a bug in counting: the answer has gone out all the same
                    logger.exception("rid=%s counting its answer failed", rid)
        finally:
            tracing.end_status(span, code.name)
            span_scope.__exit__(None, None, None)
            self.requests.labels(code.name).inc()
            self.latency.labels(code.name).observe(time.perf_counter() - started)
            self.in_flight.dec()  # last: a scrape that sees it done sees it counted
