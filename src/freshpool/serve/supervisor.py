"""The launcher's side of the API process: starts it, relays its wakes, tells it of
each launcher pass, and replaces it when it dies."""

from __future__ import annotations

import logging
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable

from freshpool.config import Config
from freshpool.core.backoff import API_RESTART
from freshpool.core.errors import Unavailable
from freshpool.serve import apiprocess
from freshpool.serve.link import FAILED, PASS, UNREACHABLE, UP, WAKE, Link, pair

log = logging.getLogger("freshpool.serve")
# An API process that lived this long died of old age, not of a fault at start.
YOUNG = 10.0


class StartError(Unavailable):
    """The API process did not come up."""


class DatabaseUnreachable(StartError):
    """The API process could not connect to the database."""


class ApiProcess:
    def __init__(
        self, config: Config, listener: socket.socket | None, wake: Callable[[], None]
    ) -> None:
        self.config = config
        self.listener = listener
        self.wake = wake
        self.process: multiprocessing.process.BaseProcess | None = None
        self._link: Link | None = None
        self._passed = False
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._started_at = 0.0
        self._deaths = 0

    def start(self, timeout: float = 120.0) -> None:
        """Start it; return once the API answers. Raises StartError: at once for a
        fault of its own, after `timeout` for a database it cannot reach (a launcher
        starting while its database is failing over waits for it)."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            try:
                self._spawn(max(1.0, deadline - time.monotonic()))
                break
            except DatabaseUnreachable as exc:
                tries += 1
                delay = API_RESTART.delay(tries)
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: trying again in %.0f s", exc, delay)
                time.sleep(delay)
        self._supervisor = threading.Thread(target=self._supervise, name="api-process", daemon=True)
        self._supervisor.start()

    def after_pass(self) -> None:
        """The launcher's after-pass hook: nodes may be ready now."""
        self._passed = True
        if self._link is not None:
            self._link.send(PASS)

    def poke(self) -> None:
        """Requests were queued in the store by a front door of this process (not the
        API's handlers): the scheduler passes now, once the launcher has passed."""
        if self._passed and self._link is not None:
            self._link.send(PASS)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._link is not None:
            self._link.close()  # it reads EOF and stops
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._link is not None:
            self._link.close()  # a replacement started while stopping
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the API process did not stop in %.0f s: killing it", timeout)
                self.process.kill()
                self.process.join(10)

    def _spawn(self, timeout: float) -> None:
        link, theirs = pair()
        # spawn, not fork: this process has threads (a fork would copy their locks
        # mid-use); the API process imports what it needs afresh.
        process = multiprocessing.get_context("spawn").Process(
            target=apiprocess.main,
            args=(self.config, self.listener, theirs),
            name="freshpool-api",
            daemon=True,
        )
        process.start()
        theirs.close()
        first = link.receive(timeout)
        if first != UP:
            link.close()
            process.kill()
            process.join(10)
            if first.startswith(UNREACHABLE):
                why = first.removeprefix(UNREACHABLE).strip().decode(errors="replace")
                raise DatabaseUnreachable(f"the API process cannot reach the database: {why}")
            why = first.removeprefix(FAILED).strip().decode(errors="replace")
            raise StartError(
                f"the API process did not start: {why}"
                if why
                else f"the API process did not start (exit code {process.exitcode})"
            )
        self.process, self._link = process, link
        self._started_at = time.monotonic()
        if self._passed:
            # A replacement: the launcher has passed before, so hand out at once.
            self.after_pass()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            assert self._link is not None
            while message := self._link.receive():
                if message == WAKE:
                    self.wake()
            if self._stopping.is_set():
                return
            self._replace()

    def _replace(self) -> None:
        assert self.process is not None and self._link is not None
        self.process.join(5)
        if self.process.is_alive():
            # It closed its end but lingers: one API process at a time, one scheduler.
            self.process.kill()
            self.process.join(10)
        self._link.close()
        young = time.monotonic() - self._started_at < YOUNG
        self._deaths = self._deaths + 1 if young else 0
        delay = API_RESTART.delay(self._deaths)
        log.error(
            "the API process exited (exit code %s): starting a new one in %.0f s",
            self.process.exitcode,
            delay,
        )
        while not self._stopping.wait(delay):
            try:
                self._spawn(timeout=120.0)
                return
            except StartError as exc:
                self._deaths += 1
                delay = API_RESTART.delay(self._deaths)
                log.error("%s; trying again in %.0f s", exc, delay)
