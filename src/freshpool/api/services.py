"""What the API's handlers use: config, store, scheduler, waiters, observer, token checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from freshpool.api.changes import ChangeFeed
from freshpool.config import Config
from freshpool.service.observer import Observer
from freshpool.service.scheduler import Scheduler
from freshpool.service.tokens import TokenChecker
from freshpool.service.waiters import Waiters
from freshpool.store import Store


@dataclass
class Services:
    config: Config
    store: Store
    scheduler: Scheduler
    observer: Observer
    # Starts the launcher's next pass at once (to delete released nodes promptly...).
    wake: Callable[[], None]
    # The longest a long-poll or an event stream is held open, in seconds.
    max_wait: float = 60.0
    max_stream: float = 3600.0
    tokens: TokenChecker = field(init=False)
    changes: ChangeFeed = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenChecker(self.store)
        self.changes = ChangeFeed(self.store)

    @property
    def waiters(self) -> Waiters:
        return self.scheduler.waiters
