"""Test-only fault injection, read in this one place: RANKING_INJECT_DELAY_MS=N makes the ranking
server sleep N ms in every Recommend before answering (a server "slowed down" on purpose, so a
test can show that the calibrated SLO gate catches a regression; see loadtest/calibrate.py).
Unset or 0 (the default): nothing is added. Never set it in production; the server logs a warning
at start when it is set."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "RANKING_INJECT_DELAY_MS"


def injected_delay_s() -> float:
    """Seconds to add to every Recommend (0.0 unless RANKING_INJECT_DELAY_MS is set)."""
    try:
        delay_ms = float(os.environ.get(ENV, "0") or 0)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of milliseconds, got {os.environ[ENV]!r}") from None
    if delay_ms < 0:
        raise ValueError(f"{ENV} must be >= 0, got {delay_ms}")
    if delay_ms:
        log.warning("%s=%g: every Recommend is delayed on purpose (test-only fault injection)", ENV, delay_ms)
    return delay_ms / 1e3
