"""The one retry policy for driver calls: exponential backoff with full jitter, bounded."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 1.0
    cap: float = 300.0
    max_tries: int = 20

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number `attempt + 1` (attempt counts from 0)."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 30)))
        # Full jitter spreads retries of many failed nodes so they don't stampede the provider.
        return (rng or random).uniform(ceiling / 2, ceiling)

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_tries


DRIVER_RETRY = RetryPolicy()
