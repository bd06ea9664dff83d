"""Which user each request is for, in the benchmark and the Locust user alike.

uniform: no user is preferred. zipf: P(user of rank k) proportional to 1 / k^exponent (rank 1 = the first
user of the list): a few users come back often, as feeds refreshing and pages reloading do, which is what
the ranking engine's per-user context KV cache serves."""

from __future__ import annotations

PATTERNS = ("uniform", "zipf")


def zipf_weights(users: int, exponent: float) -> list[float]:
    """The Zipf weight of each user rank 1 .. users."""
    if exponent <= 0:
        raise ValueError(f"the Zipf exponent must be > 0, got {exponent}")
    return [1.0 / (k ** exponent) for k in range(1, users + 1)]
