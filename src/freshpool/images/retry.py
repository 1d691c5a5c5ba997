"""Try a build command again, after the project's one backoff, while the network fails it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from freshpool.core.backoff import Backoff, with_retries
from freshpool.images.errors import CommandFailed

ATTEMPTS = 3
DEFAULT_RETRY_DELAY = 2.0
# The base delay for a whole process (a test run that wants fast retries), with no
# parameter on every path that leads to a build.
RETRY_DELAY_ENV = "FRESHPOOL_BUILD_RETRY_DELAY"
# A mirror that fails for longer than this between tries is down, not flaky: waiting
# longer would only put off the failure report.
RETRY_CAP = 60.0

T = TypeVar("T")


def base_delay(given: float | None = None) -> float:
    """The base delay between tries: `given`, else the environment's, else the default."""
    if given is not None:
        return given
    return float(os.environ.get(RETRY_DELAY_ENV, DEFAULT_RETRY_DELAY))


class DownloadRetry:
    """The tries of one command; `tries` says how many were made when it gave up."""

    def __init__(self, attempts: int, delay: float, say: Callable[[str], None]) -> None:
        self.attempts = max(1, attempts)
        self.backoff = Backoff(base=delay, cap=RETRY_CAP)
        self.say = say
        self.tries = 0

    def run(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, tried again while it raises a CommandFailed of kind "network".

        The caller classifies the failure (sets `kind`) inside `attempt`, while what the
        command left behind can still show why it failed.
        """
        self.tries = 1

        def on_retry(number: int, delay: float, exc: Exception) -> None:
            self.tries = number + 1
            what = exc.what if isinstance(exc, CommandFailed) else type(exc).__name__
            self.say(
                f"{what} could not download (try {number} of {self.attempts});"
                f" trying again in {delay:.1f} s"
            )

        return with_retries(attempt, self.attempts, self.backoff, _network_failure, on_retry)


def _network_failure(exc: Exception) -> bool:
    return isinstance(exc, CommandFailed) and exc.kind == "network"
