"""What the API's handlers use: config, store, scheduler, waiters, what the observer
published, token checks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from freshpool.api.changes import ChangeFeed
from freshpool.api.tokens import TokenChecker
from freshpool.config import Config
from freshpool.core.nodesets import Problem, check
from freshpool.dispatch.scheduler import Scheduler
from freshpool.dispatch.waiters import Waiters
from freshpool.observed import Published
from freshpool.store import Store


@dataclass
class Services:
    config: Config
    store: Store
    scheduler: Scheduler
    # Starts the launcher's next pass at once (to delete released nodes promptly...).
    wake: Callable[[], None]
    # The longest a long-poll or an event stream is held open, in seconds.
    max_wait: float = 60.0
    max_stream: float = 3600.0
    observed: Published = field(init=False)
    tokens: TokenChecker = field(init=False)
    changes: ChangeFeed = field(init=False)
    # core.nodesets.check against this config, remembered per node set: CI asks for
    # the same few sets over and over, and the config does not change while serving.
    check_set: Callable[[tuple[str, ...], int | None], list[Problem]] = field(init=False)

    def __post_init__(self) -> None:
        self.observed = Published(self.config.state_dir)
        self.tokens = TokenChecker(self.store)
        self.changes = ChangeFeed(self.store)
        known = [x.name for x in self.config.labels]
        self.check_set = functools.lru_cache(maxsize=1024)(
            lambda labels, quota: check(labels, known, self.config.providers, quota)
        )

    @property
    def waiters(self) -> Waiters:
        return self.scheduler.waiters
