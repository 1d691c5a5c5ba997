"""The loop that keeps GitHub and the nodes in step.

Webhooks make it quick: a `queued` job wakes the demand step at once. The REST pass
every `reconcile-interval` makes it right whatever was missed: it lists the queued
jobs (a webhook lost while this process was down or GitHub could not reach it), removes
our runners that GitHub still lists offline with no node behind them (ghosts: the
process died, a node vanished, an old registration), and takes away runners that sat
idle past `idle-timeout` with no job left for their labels.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from freshpool.core.backoff import CI_SERVER
from freshpool.integrations import metrics
from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.github.api import GithubApi
from freshpool.integrations.github.auth import AuthError
from freshpool.integrations.github.config import Settings
from freshpool.integrations.github.fleet import INTEGRATION, Fleet, Labels
from freshpool.integrations.github.runners import Launcher

log = logging.getLogger("freshpool.integrations.github")


class Reconciler:
    def __init__(self, settings: Settings, api: GithubApi, fleet: Fleet,
                 launcher: Launcher) -> None:  # fmt: skip
        self.settings = settings
        self.api = api
        self.fleet = fleet
        self.launcher = launcher
        self.passes = 0
        self.last_pass_at: float | None = None
        self.last_error = ""
        # A label set whose last runner failed to start waits the backoff before the
        # next, so a broken image does not burn through nodes.
        self._failures: dict[Labels, int] = {}
        self._not_before: dict[Labels, float] = {}

    def run(self, stop: threading.Event) -> None:
        due = 0.0
        while not stop.is_set():
            if time.monotonic() >= due:
                self.pass_once()
                due = time.monotonic() + self.settings.reconcile_interval
            else:
                self.meet_demand()
            self.fleet.changed.wait(timeout=max(0.05, min(1.0, due - time.monotonic())))
            self.fleet.changed.clear()

    def pass_once(self) -> None:
        since = time.time()
        try:
            listed = self.api.queued_jobs(self.api.repositories(self.settings.github.repositories))
            added = self.fleet.from_rest(listed, since)
            if added:
                log.info("github: reconcile found %d queued job(s) no webhook told of", added)
            self.remove_ghosts()
            self.retire_idle()
        except (CiServerError, AuthError) as exc:
            self.last_error = str(exc)
            log.warning("github: reconcile: %s", exc)
        else:
            self.last_error = ""
            self.last_pass_at = time.time()
            self.passes += 1
        self.meet_demand()

    def remove_ghosts(self) -> None:
        prefix = self.settings.runner.name_prefix
        listed = self.api.runners()
        # Read after the listing: a runner registered meanwhile already has its name here.
        live = self.fleet.names()
        for runner in listed:
            name = runner.get("name", "")
            if not name.startswith(prefix) or name in live:
                continue
            if runner.get("status") != "offline" or runner.get("busy"):
                continue
            if self.api.delete_runner(int(runner["id"])):
                with self.fleet.lock:
                    self.fleet.orphans_removed += 1
                metrics.ORPHANS_REMOVED.labels(INTEGRATION).inc()
                log.info("github: removed runner %s (offline, no node of ours)", name)

    def retire_idle(self) -> None:
        queued = self.fleet.queued()
        now = time.time()
        for runner in list(self.fleet.runners.values()):
            idle_since = runner.online_at
            if runner.state != "idle" or idle_since is None or queued.get(runner.labels):
                continue
            if now - idle_since > self.settings.idle_timeout:
                log.info("github: runner %s idle %.0f s with no job; removing it", runner.name,
                         now - idle_since)  # fmt: skip
                self.launcher.stop(runner)

    def meet_demand(self) -> None:
        now = time.monotonic()
        for labels, count in self.fleet.demand().items():
            if self._not_before.get(labels, 0.0) > now:
                continue
            for _ in range(count):
                self.launcher.launch(labels, self._outcome)

    def _outcome(self, labels: Labels, ok: bool) -> None:
        if ok:
            self._failures.pop(labels, None)
            self._not_before.pop(labels, None)
            return
        failures = self._failures.get(labels, 0)
        self._failures[labels] = failures + 1
        self._not_before[labels] = time.monotonic() + CI_SERVER.delay(failures)

    def status(self) -> dict[str, Any]:
        last = {"passes": self.passes, "last_pass_at": self.last_pass_at}
        return {"reconcile": {**last, "last_error": self.last_error}}
