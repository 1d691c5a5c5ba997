"""One just-in-time runner's life: a node, a JIT config, `run.sh`, one job, the end.

The node is requested only after the job it is for is seen still queued. The runner
is registered by name with the job's exact labels, started over SSH with its JIT
config on standard input, and counted connected once GitHub lists it online (or gives
it a job). A runner that does not connect within `agent-timeout` has its node
destroyed and replaced and its registration removed. When the runner process exits
(its one job done, its registration deleted, or its node gone) the node is released,
so destroyed, and a registration left behind is removed.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from freshpool.api.client import ApiClient
from freshpool.integrations.agent import AgentFailed, Lease, NoNode, with_agent
from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.github.api import GithubApi
from freshpool.integrations.github.config import Settings
from freshpool.integrations.github.fleet import INTEGRATION, Fleet, Labels, Runner

log = logging.getLogger("freshpool.integrations.github")

# How often a starting runner's registration is read back to see it online: a runner
# takes seconds to connect, and each look costs a REST call of the rate limit.
ONLINE_POLL = 2.0

Outcome = Callable[[Labels, bool], None]


class Launcher:
    def __init__(self, settings: Settings, api: GithubApi, client: ApiClient, fleet: Fleet,
                 group_id: int, log_dir: Path) -> None:  # fmt: skip
        self.settings = settings
        self.api = api
        self.client = client
        self.fleet = fleet
        self.group_id = group_id
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def launch(self, labels: Labels, outcome: Outcome = lambda _labels, _ok: None) -> None:
        """Start one runner for `labels` in a thread of its own; `outcome(labels, ok)` is
        told whether a runner got online."""
        key = self.fleet.add_runner(self._new_name(), labels)
        threading.Thread(target=self._life, args=(key, labels, outcome), daemon=True,
                         name=f"github-runner-{key}").start()  # fmt: skip

    def _new_name(self) -> str:
        return f"{self.settings.runner.name_prefix}{secrets.token_hex(5)}"

    def _life(self, key: int, labels: Labels, outcome: Outcome) -> None:
        try:
            if not self._still_queued(key, labels):
                return
            lease = self._connected_lease(key, labels)
            outcome(labels, lease is not None)
            if lease is not None:
                self._watch(key, lease)
        except Exception:
            outcome(labels, False)
            log.exception("github: runner %d for %s", key, sorted(labels))
        finally:
            self.fleet.drop_runner(key)

    def _still_queued(self, key: int, labels: Labels) -> bool:
        """Whether a job of the set still waits with no other runner of ours to take it,
        asked of GitHub itself: a webhook or listing may be minutes old (a job another
        runner already took still shows queued here), and a node is not taken for nothing."""
        others = self.fleet.waiting(labels, but=key)
        confirmed = 0
        for job in self.fleet.queued().get(labels, []):
            try:
                now = self.api.job(job.repo, job.id)
            except CiServerError as exc:
                log.warning("github: job %d: cannot re-check: %s", job.id, exc)
                return False
            if now is not None and now.get("status") == "queued":
                confirmed += 1
                if confirmed > others:
                    return True
                continue
            log.info("github: job %d is no longer queued (%s)", job.id,
                     now.get("status") if now else "gone")  # fmt: skip
            self.fleet.forget(job.id)
        return False

    def _connected_lease(self, key: int, labels: Labels) -> Lease | None:
        kind = self.settings.kind_for(labels)
        assert kind is not None  # only jobs of a runners entry are queued in the fleet
        registered: list[int] = []
        timeout = self.settings.freshpool.request_timeout

        def acquire() -> Lease:
            return Lease.acquire(self.client, INTEGRATION, [kind.node_label], timeout,
                                 requestor=f"github {','.join(sorted(labels))}")  # fmt: skip

        def start(lease: Lease) -> Callable[[], bool]:
            return self._start(key, lease, labels, registered)

        try:
            lease = with_agent(acquire, start, self.settings.agent_timeout)
        except (NoNode, AgentFailed) as exc:
            log.warning("github: no runner for %s: %s", sorted(labels), exc)
            self._unregister(registered)
            return None
        return lease

    def _start(self, key: int, lease: Lease, labels: Labels,
               registered: list[int]) -> Callable[[], bool]:  # fmt: skip
        runner = self.fleet.runners[key]
        # A try before this one lost its node: its registration goes with it.
        self._unregister(registered)
        registered.clear()
        with self.fleet.lock:
            runner.name, runner.lease, runner.state = self._new_name(), lease, "starting"
            self.fleet.mark_ours(runner.name)
        setup = self.settings.runner.setup
        if setup:
            done = lease.run(setup, timeout=self.settings.agent_timeout)
            if done.returncode != 0:
                raise AgentFailed(f"runner setup failed on node {lease.node_ids} (exit "
                                  f"{done.returncode}): {done.stderr.strip()[-300:]}")  # fmt: skip
        try:
            registration, jit = self.api.generate_jitconfig(
                runner.name, self.group_id, sorted(labels), self.settings.runner.work_folder
            )
        except CiServerError as exc:
            raise AgentFailed(f"generate-jitconfig for {runner.name}: {exc}") from None
        runner.runner_id = int(registration["id"])
        registered.append(runner.runner_id)
        with open(self.log_dir / f"{runner.name}.log", "ab") as output:
            lease.start(self.settings.runner.command, output=output, stdin=jit.encode())
        log.info("github: runner %s starting on node %s for %s", runner.name, lease.node_ids,
                 sorted(labels))  # fmt: skip
        return self._online_check(runner)

    def _online_check(self, runner: Runner) -> Callable[[], bool]:
        last = [0.0]

        def connected() -> bool:
            if runner.state == "busy" or runner.job_id is not None:
                return True
            if runner.runner_id is None:
                return False
            # Throttled while the runner process lives; once it exited, GitHub is asked.
            alive = runner.lease is None or runner.lease.agents_alive()
            if alive and time.monotonic() - last[0] < ONLINE_POLL:
                return False
            last[0] = time.monotonic()
            try:
                seen = self.api.runner(runner.runner_id)
            except CiServerError:
                return False
            # A JIT runner that already ran its job is deleted by GitHub: it did connect.
            return seen is None or seen.get("status") == "online"

        return connected

    def _watch(self, key: int, lease: Lease) -> None:
        runner = self.fleet.runners[key]
        with self.fleet.lock:
            if runner.state == "starting":
                runner.state = "idle"
            runner.online_at = time.time()
        lease.job_started(f"github runner {runner.name}")
        while lease.agents_alive():
            time.sleep(0.5)
        log.info("github: runner %s exited (%s); releasing node %s", runner.name, runner.state,
                 lease.node_ids)  # fmt: skip
        lease.release()
        if runner.runner_id is not None and runner.state not in ("done", "stopping"):
            self._unregister([runner.runner_id])

    def _unregister(self, runner_ids: list[int]) -> None:
        for runner_id in runner_ids:
            try:
                self.api.delete_runner(runner_id)
            except CiServerError as exc:
                # The reconcile finds it again: an offline runner of ours with no node.
                log.warning("github: runner %d not removed yet: %s", runner_id, exc)

    def stop(self, runner: Runner) -> None:
        """Take an idle runner away: its registration first (GitHub then gives it no
        job), then its node. A runner that took a job meanwhile is left to finish."""
        if runner.runner_id is None or runner.lease is None:
            return
        if not self.api.delete_runner(runner.runner_id):
            return
        with self.fleet.lock:
            runner.state = "stopping"
        runner.lease.release()

    def stop_all(self) -> None:
        for runner in list(self.fleet.runners.values()):
            try:
                if runner.state in ("idle", "starting"):
                    self.stop(runner)
                elif runner.lease is not None:
                    runner.lease.release()
            except CiServerError as exc:
                log.warning("github: runner %s: %s", runner.name, exc)
