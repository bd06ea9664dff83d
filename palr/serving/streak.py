"""The one rule both tiers turn NOT_SERVING by: model calls (ORT calls, forward passes) failing in a row. One failure
between successes is its requests'; `LIMIT` in a row and the model or device is what is broken (a sticky CUDA error,
an allocation failing at the pod's memory limit on every call)."""

from __future__ import annotations

import threading

LIMIT = 3


class FailureStreak:
    """Model calls failed in a row; thread-safe (the retrieval tier's ORT calls run in worker threads)."""

    def __init__(self, limit: int = LIMIT):
        self.limit = limit
        self._count = 0
        self._tripped = False
        self._lock = threading.Lock()

    def failed(self) -> bool:
        """One more failure; True exactly once, when the streak reaches `limit`."""
        with self._lock:
            self._count += 1
            self._tripped = self._tripped or self._count >= self.limit
            return self._count == self.limit

    @property
    def tripped(self) -> bool:
        """The streak has reached `limit`, ever: health is NOT_SERVING for good then, and a success later
        (calls run in parallel threads) does not make the model trusted again."""
        return self._tripped

    def succeeded(self) -> None:
        with self._lock:
            self._count = 0
