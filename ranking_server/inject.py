"""Test-only fault injection, read in this one place:
- RANKING_INJECT_DELAY_MS=N makes the ranking server sleep N ms in every Recommend before answering (a
  server "slowed down" on purpose, so a test can show that the calibrated SLO gate catches a regression;
  see loadtest/calibrate.py);
- RANKING_INJECT_LOAD_DELAY_MS=N makes its model load take N ms longer, blocking its load thread as a
  big model's load does (so a test can stop a server that is still loading).
Unset or 0 (the default): nothing is added. Never set them in production; the server logs a warning
at start when one is set."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "RANKING_INJECT_DELAY_MS"
LOAD_ENV = "RANKING_INJECT_LOAD_DELAY_MS"


def injected_delay_s() -> float:
    """Seconds to add to every Recommend (0.0 unless RANKING_INJECT_DELAY_MS is set)."""
    return _delay_s(ENV, "every Recommend is delayed")


def injected_load_delay_s() -> float:
    """Seconds to add to the model load (0.0 unless RANKING_INJECT_LOAD_DELAY_MS is set)."""
    return _delay_s(LOAD_ENV, "the model load is delayed")


def _delay_s(env: str, what: str) -> float:
    try:
        delay_ms = float(os.environ.get(env, "0") or 0)
    except ValueError:
        raise ValueError(f"{env} must be a number of milliseconds, got {os.environ[env]!r}") from None
    if delay_ms < 0:
        raise ValueError(f"{env} must be >= 0, got {delay_ms}")
    if delay_ms:
        log.warning("%s=%g: %s on purpose (test-only fault injection)", env, delay_ms, what)
    return delay_ms / 1e3
