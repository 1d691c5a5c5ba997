"""Blocking SDK calls (boto3, openstacksdk) run on a few threads of the driver's own,
so the launcher's one loop only ever polls them; and calls batched across nodes, so a
pass makes one listing call for all the launches waiting on it, not one per node."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Blocking:
    def __init__(self, workers: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def submit(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool.submit(call, *args, **kwargs)

    def call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> Generator[float, None, T]:
        """Steps until `call(*args, **kwargs)` returns on a worker thread; its result or
        its exception."""
        return wait_future(self.submit(call, *args, **kwargs))


def wait_future(future: Future[T]) -> Generator[float, None, T]:
    pause = 0.002
    while not future.done():
        yield pause
        pause = min(pause * 2, 0.05)
    return future.result()


@dataclass
class _Round(Generic[T]):
    keys: frozenset[str]
    future: Future[dict[str, T]]
    started: float = field(default_factory=time.monotonic)


# A call waits this long for the other keys asked for in the same pass to join it.
GATHER = 0.02


class Batch(Generic[T]):
    """`get(key)` answers from one `call(keys)` made for every key asked for since the
    last call; calls start at most every `every` seconds."""

    def __init__(self, blocking: Blocking, call: Callable[[list[str]], dict[str, T]],
                 every: float) -> None:  # fmt: skip
        self._blocking = blocking
        self._call = call
        self.every = every
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._wanted_since = 0.0
        self._round: _Round[T] | None = None

    def get(self, key: str) -> Generator[float, None, T | None]:
        """Steps until a call that included `key` is done; its answer for `key` (None
        when the answer has none), or the call's exception."""
        mine: _Round[T] | None = None
        with self._lock:
            asked = time.monotonic()
            if not self._wanted:
                self._wanted_since = asked
            self._wanted.add(key)
        while mine is None or not mine.future.done():
            with self._lock:
                if mine is None:
                    mine = self._join(key, asked)
            yield 0.01 if mine is not None else self._wait_left()
        return mine.future.result().get(key)

    def _join(self, key: str, asked: float) -> _Round[T] | None:
        """The call `key` is answered by: one started since it was asked for (an earlier
        call's answer may be stale), started now when none is in flight."""
        current = self._round
        now = time.monotonic()
        idle = current is None or (current.future.done() and now >= current.started + self.every)
        if idle and key in self._wanted and now >= self._wanted_since + GATHER:
            keys = frozenset(self._wanted)
            self._wanted.clear()
            current = self._round = _Round(keys, self._blocking.submit(self._call, sorted(keys)))
        if current is not None and key in current.keys and current.started >= asked:
            return current
        return None

    def _wait_left(self) -> float:
        current = self._round
        start = self._wanted_since + GATHER
        if current is not None:
            start = max(start, current.started + self.every)
        return max(0.005, start - time.monotonic())
