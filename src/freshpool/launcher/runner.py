"""The launcher's loop: one thread passes over every controller, then sleeps until
something is due or the store changed. Each controller sits behind its own error
boundary: an exception is logged, counted, and the controller sits out its passes
for the one backoff's wait; `serve` goes on.

Wake-ups (the whole launcher side of the map in serve/__init__.py):
- the store's change counter, polled while sleeping: another process committed
  (a release, a new request, a CLI's change), so look now;
- `wake()`, from any thread: the API process asked (over the link), or a build
  finished in its worker thread;
- each controller's `due()`: an operation's next step, a rate limit's next token;
- `interval` seconds at the latest.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from freshpool import metrics
from freshpool.core.backoff import CONTROLLER
from freshpool.store import Store

log = logging.getLogger("freshpool.launcher")

# Passes that change nothing, started by a change or a wake, take at most this
# share of the time: under a stream of hand-outs every commit is a change, and
# back-to-back idle passes would take the interpreter from the hand-outs.
CHANGE_SHARE = 0.2
# How often, while sleeping, the store's change counter is looked at.
POLL = 0.02
# A pass longer than this is logged with each controller's share: every wait in it
# delays the lease renewals and the wake-ups that come after it.
SLOW_PASS = 1.0


class Controller(Protocol):
    """One part of the launcher's work. No method may block for long."""

    name: str

    def start(self) -> None:
        """Once, before the first pass (recovery after a restart)."""

    def tick(self) -> None:
        """One pass."""

    def due(self) -> float:
        """The monotonic time by which it wants its next pass (inf: no hurry)."""

    def stop(self, deadline: float) -> None:
        """`serve` is stopping: finish or undo what is in flight by `deadline`."""


class Runner:
    def __init__(
        self,
        store: Store,
        controllers: Sequence[Controller],
        interval: float = 1.0,
        after_pass: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.store = store
        self.controllers = list(controllers)
        self.interval = interval
        self.after_pass = list(after_pass)
        self._woken = threading.Event()
        self._started: set[str] = set()
        self._failures: dict[str, int] = {}
        self._resume_at: dict[str, float] = {}
        self._last_pass = 0.0
        self._last_took = 0.0
        self._last_wrote = False

    def wake(self) -> None:
        """Start the next pass now (thread-safe)."""
        self._woken.set()

    @property
    def started(self) -> set[str]:
        """The controllers whose start has run."""
        return self._started

    def controller(self, name: str) -> Controller:
        return next(c for c in self.controllers if c.name == name)

    def run(self, stop: threading.Event, stop_timeout: float = 30.0) -> None:
        """Pass and sleep until `stop` is set; then stop every controller."""
        try:
            self.drive(stop)
        finally:
            self.stop(stop_timeout)

    def drive(self, stop: threading.Event, until: Callable[[], bool] = lambda: False) -> None:
        """Pass and sleep as `serve` does until `stop` is set or `until()` is true."""
        watcher = self.store.change_watcher()
        try:
            while not stop.is_set() and not until():
                self.pass_once()
                self._sleep(stop, watcher.changed)
        finally:
            watcher.close()

    def pass_once(self) -> None:
        """Every controller's pass (each after its start), then the after-pass hooks."""
        self._last_pass = time.monotonic()
        writes = self.store.writes_here()
        took: dict[str, float] = {}
        for controller in self.controllers:
            began = time.monotonic()
            if controller.name not in self._started:
                if self._guarded(controller, controller.start):
                    self._started.add(controller.name)
                else:
                    continue
            ticked = time.monotonic()
            self._guarded(controller, controller.tick)
            metrics.controller_pass(controller.name, time.monotonic() - ticked)
            took[controller.name] = time.monotonic() - began
        self._last_took = time.monotonic() - self._last_pass
        if self._last_took > SLOW_PASS:
            shares = ", ".join(f"{name} {s:.2f} s" for name, s in took.items() if s >= 0.05)
            log.warning("a pass took %.2f s (%s)", self._last_took, shares or "no one controller")
        self._last_wrote = self.store.writes_here() != writes
        for hook in self.after_pass:
            hook()

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for controller in reversed(self.controllers):
            if controller.name in self._started:
                self._guarded(controller, functools.partial(controller.stop, deadline), always=True)

    def _guarded(
        self, controller: Controller, call: Callable[[], None], always: bool = False
    ) -> bool:
        """Run `call`; False if it raised (or the controller sits out its backoff)."""
        name = controller.name
        now = time.monotonic()
        if not always and now < self._resume_at.get(name, 0.0):
            return False
        try:
            call()
        except Exception:
            failures = self._failures.get(name, 0) + 1
            self._failures[name] = failures
            pause = CONTROLLER.delay(failures - 1)
            self._resume_at[name] = now + pause
            metrics.controller_error(name)
            log.exception("%s: failed (%d in a row); next try in %.1f s", name, failures, pause)
            return False
        self._failures.pop(name, None)
        return True

    def _due(self) -> float:
        now = time.monotonic()
        due = now + self.interval
        for controller in self.controllers:
            if controller.name in self._started:
                due = min(
                    due, max(now, controller.due(), self._resume_at.get(controller.name, 0.0))
                )
        return due

    def _sleep(self, stop: threading.Event, changed: Callable[[], bool]) -> None:
        wake = self._due()
        # After a pass that wrote nothing, a change or a wake starts the next pass no
        # sooner than keeps such passes within CHANGE_SHARE of the time. A pass that
        # wrote made progress, and the next one follows at once.
        idle_gap = 0.0 if self._last_wrote else self._last_took / CHANGE_SHARE
        soonest = self._last_pass + idle_gap
        poked = False
        while not stop.is_set():
            now = time.monotonic()
            if now >= wake:
                return
            if not poked:
                poked = changed()
                if not poked and self._woken.wait(min(POLL, wake - now)):
                    self._woken.clear()
                    poked = True
            if poked:
                if now >= soonest:
                    return
                stop.wait(min(soonest, wake) - now)
