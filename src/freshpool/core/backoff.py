"""The one backoff: how long to wait before trying again, everywhere freshpool retries.

Driver calls, uploads, image downloads, failed image builds, a provider's breaker,
a dying API process and a failing controller all wait `base * 2**attempt`, capped.
With jitter the wait is a random point in the upper half of that, so many nodes
that failed together do not retry together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    base: float
    cap: float
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number `attempt + 1` (attempt counts from 0)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 60))
        if not self.jitter:
            return ceiling
        draw = rng.uniform if rng is not None else random.uniform
        return draw(ceiling / 2, ceiling)


def with_retries(
    attempt: Callable[[], T],
    tries: int,
    backoff: Backoff,
    retryable: Callable[[Exception], bool],
    on_retry: Callable[[int, float, Exception], None] = lambda _n, _delay, _exc: None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`attempt()`, tried up to `tries` times while it raises a retryable error; the
    last error is raised. `on_retry(try number, delay, error)` is told before each wait."""
    for number in range(1, tries + 1):
        try:
            return attempt()
        except Exception as exc:
            if number >= tries or not retryable(exc):
                raise
            delay = backoff.delay(number - 1)
            on_retry(number, delay, exc)
            sleep(delay)
    raise AssertionError("unreachable")


# Driver calls that failed (creates, deletes): seconds, then minutes.
DRIVER = Backoff(base=1.0, cap=300.0)
# A build's upload to a provider that failed.
UPLOAD = Backoff(base=30.0, cap=3600.0)
# A failed image build is tried again after this long (no jitter: an operator reads it).
FAILED_BUILD = Backoff(base=300.0, cap=6 * 3600.0, jitter=False)
# A launcher controller that raised: it sits out its passes this long.
CONTROLLER = Backoff(base=1.0, cap=60.0)
# The API process died young: the next one starts after this long.
API_RESTART = Backoff(base=1.0, cap=30.0, jitter=False)
# A CI server (or freshpool's API, seen from an integration) that failed or was busy.
CI_SERVER = Backoff(base=0.5, cap=60.0)
