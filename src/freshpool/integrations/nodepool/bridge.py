"""The bridge: one thread that keeps ZooKeeper a view of the store for Zuul.

Each pass registers us as a launcher pool (an ephemeral znode), takes new request
znodes, answers the ones the store has settled, and syncs the node znodes. A pass
runs when a ZooKeeper watch fires, when the store changes, and at least every
second. A lost session takes our locks, watches and registration with it: the next
pass starts over from the store, which never forgot what it handed to whom.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooState

from freshpool.config import Config
from freshpool.core.backoff import Backoff
from freshpool.integrations.nodepool import wire
from freshpool.integrations.nodepool.desk import Desk
from freshpool.integrations.nodepool.view import View
from freshpool.integrations.nodepool.zkclient import connect
from freshpool.store import Store

log = logging.getLogger("freshpool.integrations.nodepool")
# Longest wait between passes when nothing wakes the bridge.
IDLE = 1.0
# How often the store's change counter is looked at while waiting.
POLL = 0.005
# After a failed pass (the ensemble restarting, say): short, as reconnects are.
RETRY = Backoff(base=0.2, cap=5.0)
# Between sweeps for znodes of ours that no node stands behind.
CLEANUP_EVERY = 60.0
# The longest a thread that wants the interpreter waits for a busy one (Python's
# default is 5 ms): every ZooKeeper answer crosses from kazoo's thread to the
# bridge's while the launcher's passes run Python in this process.
SWITCH_INTERVAL = 0.0005


class Bridge:
    def __init__(self, config: Config, store: Store, poke: Callable[[], None]) -> None:
        assert config.nodepool_compat is not None
        self.settings = config.nodepool_compat
        self.config, self.store = config, store
        self.launcher = self.settings.launcher_id
        self.zk = connect(self.settings)
        self.zk.add_listener(self._on_state)
        self._wake = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered: str | None = None
        self.view = View(self.zk, store, self.launcher, self.wake)
        self.desk = Desk(self.zk, store, config, self.launcher, self.wake, poke, self.view.allocate)
        self.view.between = self._requests_arrived
        self.view.wanted = self.desk.waiting_labels
        self.desk.vanished = self.view.requests_deleted
        self.passes = 0

    def start(self, timeout: float = 30.0) -> None:
        """Connect (raises if the ensemble cannot be reached in `timeout`) and run."""
        self.zk.start(timeout=timeout)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="nodepool-compat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.zk.stop()
        self.zk.close()

    def wake(self, *_args: Any) -> None:
        self._wake.set()

    def launcher_passed(self) -> None:
        """The launcher's after-pass hook: the store now matches the providers, so the
        desk may hand out (as the scheduler does from the launcher's first pass)."""
        self.desk.serving.set()

    def _on_state(self, state: str) -> None:
        # Called on kazoo's own thread: only flags here.
        if state == KazooState.LOST:
            self._lost.set()
        self._wake.set()

    def _run(self) -> None:
        watcher = self.store.change_watcher()
        failures = 0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    self.pass_once()
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = RETRY.delay(failures)
                    log.warning("nodepool-compat pass failed (%s); again in %.1f s", exc, delay)
                    self._stop.wait(delay)
                    continue
                self._sleep(watcher.changed)
        finally:
            watcher.close()

    def _sleep(self, changed: Callable[[], bool]) -> None:
        until = time.monotonic() + IDLE
        while not self._wake.is_set() and time.monotonic() < until:
            if changed():
                return
            self._wake.wait(POLL)

    def pass_once(self) -> None:
        if self._lost.is_set():
            self._lost.clear()
            log.warning("ZooKeeper session lost: re-registering and re-reading from the store")
            self.desk.forget()
            self.view.forget()
            self._registered = None
        if not self.zk.connected:
            return
        self._register()
        self.desk.take_new()
        self.desk.follow_revisions()
        self.desk.answer()
        self.view.sync()
        self.passes += 1
        if self.passes % int(CLEANUP_EVERY / IDLE) == 0:
            self.view.cleanup(set(self.view.shown))

    def _requests_arrived(self) -> None:
        """Between the view's steps: take and answer requests that came meanwhile."""
        if self.desk.arrived.is_set() and not self._lost.is_set():
            self.desk.take_new()
            self.desk.flush()

    def _register(self) -> None:
        if self._registered is not None:
            return
        # Every parent the pass writes under, so its pipelined calls never need makepath.
        for path in (wire.REQUESTS, wire.REQUEST_LOCKS, wire.NODES):
            self.zk.ensure_path(path)
        data = {
            "kind": "pool",
            "id": self.launcher,
            "name": self.launcher,
            "hostname": socket.gethostname(),
            "provider_name": "freshpool",
            "supported_labels": sorted(x.name for x in self.config.labels),
            "state": "running",
            "priority": 100,
            "paused": False,
        }
        self._registered = self.zk.create(
            f"{wire.POOLS}/{self.launcher}-",
            wire.encode(data),
            ephemeral=True,
            sequence=True,
            makepath=True,
        )
        log.info("registered with ZooKeeper as launcher %s", self.launcher)
