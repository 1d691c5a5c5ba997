"""Per-provider admission: a rate limit on driver calls and a circuit breaker.

One place decides whether the launcher may call a provider now: at most `rate`
calls per second (a token bucket), and none at all while the breaker is open after
`breaker-threshold` consecutive failures. The pause doubles on each re-trip (the one
backoff, from `breaker-cooldown` up to `cap`), and one trial call is let through
when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from freshpool.config import Provider
from freshpool.core.backoff import Backoff

log = logging.getLogger("freshpool.gate")


class ProviderGate:
    def __init__(
        self, provider: Provider, clock: Callable[[], float] = time.monotonic, cap: float = 600.0
    ) -> None:
        self.name = provider.name
        self.rate = provider.rate
        self.burst = max(1.0, provider.rate)
        self.threshold = provider.breaker_threshold
        self.pauses = Backoff(base=provider.breaker_cooldown, cap=cap, jitter=False)
        self._clock = clock
        self._tokens = self.burst
        self._refilled = clock()
        self._failures = 0
        self._trips = 0
        self.open_until = 0.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def is_open(self) -> bool:
        return self._clock() < self.open_until

    def take(self) -> bool:
        """Spend one call if the breaker is closed and the rate allows it now."""
        now = self._clock()
        if now < self.open_until:
            return False
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def next_token_in(self) -> float:
        """Seconds until take() can succeed again (0 if it can now)."""
        now = self._clock()
        if now < self.open_until:
            return self.open_until - now
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def success(self) -> None:
        self._failures = 0
        self._trips = 0

    def failure(self, why: str) -> None:
        self._failures += 1
        if self._failures < self.threshold:
            return
        pause = self.pauses.delay(self._trips)
        self._trips += 1
        self._failures = self.threshold - 1  # the trial call after the pause decides
        self.open_until = self._clock() + pause
        log.warning(
            "provider %s: paused for %.0f s after repeated failures (last: %s)",
            self.name,
            pause,
            why,
        )
