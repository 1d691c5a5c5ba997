"""The loop that keeps Jenkins' queue and the agents in step.

Every `queue-interval` (and at once when an agent ends) it reads the build queue,
starts agents for each label so that `min-idle` stay idle beyond the builds waiting
for it (up to `max`), retires idle agents past `idle-timeout` beyond `min-idle`, and
sweeps agents of ours that Jenkins lists with no node behind them (this process
died, a node vanished): each is taken out of its label at once and deleted when no
build runs on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from freshpool.core.backoff import CI_SERVER
from freshpool.integrations import metrics
from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.jenkins.agents import Agent, AgentLife, current_build
from freshpool.integrations.jenkins.api import INTEGRATION, JenkinsApi, queued_label
from freshpool.integrations.jenkins.config import Settings

log = logging.getLogger("freshpool.integrations.jenkins")
# Queue items remembered for their time of queueing, to time queued-to-running.
REMEMBERED_ITEMS = 10_000


class Fleet:
    def __init__(self, settings: Settings, api: JenkinsApi, life: AgentLife) -> None:
        self.settings = settings
        self.api = api
        self.life = life
        self.agents: dict[int, Agent] = {}
        self.waiting: dict[str, int] = {}
        self.orphans_removed = 0
        self.builds_run = 0
        self.passes = 0
        self.last_pass_at: float | None = None
        self.last_error = ""
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self._serial = 0
        self._queued_at: OrderedDict[int, float] = OrderedDict()
        # A label whose last agent failed to connect waits the backoff before the next,
        # so a broken image does not burn through nodes.
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}

    def queued_since(self, queue_id: int) -> float | None:
        with self.lock:
            return self._queued_at.get(queue_id)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pass_once()
            self.changed.wait(timeout=self.settings.queue_interval)
            self.changed.clear()

    def pass_once(self) -> None:
        try:
            self._read_queue()
            self._sweep_orphans()
        except CiServerError as exc:
            self.last_error = str(exc)
            log.warning("jenkins: %s", exc)
            return
        self.last_error = ""
        self.last_pass_at = time.time()
        self.passes += 1
        self._retire_idle()
        self._meet_demand()

    def _read_queue(self) -> None:
        waiting: Counter[str] = Counter()
        for item in self.api.queue():
            label = queued_label(item)
            if label is None or self.settings.kind(label) is None:
                continue
            waiting[label] += 1
            with self.lock:
                if int(item["id"]) not in self._queued_at:
                    self._queued_at[int(item["id"])] = float(item.get("inQueueSince", 0)) / 1000
                    if len(self._queued_at) > REMEMBERED_ITEMS:
                        self._queued_at.popitem(last=False)
        self.waiting = dict(waiting)

    def demand(self) -> dict[str, int]:
        """Agents to start per label: builds waiting plus `min-idle`, less the agents
        that can still take a build (starting or idle), within `max`."""
        wanted = {}
        with self.lock:
            for kind in self.settings.labels:
                mine = [a for a in self.agents.values() if a.label == kind.label]
                free = sum(1 for a in mine if a.state in ("starting", "idle")
                           and not a.retire.is_set())  # fmt: skip
                need = self.waiting.get(kind.label, 0) + kind.min_idle - free
                count = min(need, kind.max - len(mine))
                if count > 0:
                    wanted[kind.label] = count
        return wanted

    def _meet_demand(self) -> None:
        now = time.monotonic()
        for label, count in self.demand().items():
            if self._not_before.get(label, 0.0) > now:
                continue
            for _ in range(count):
                self.launch(label)

    def launch(self, label: str) -> Agent:
        agent = Agent(self.life.new_name(label), label)
        with self.lock:
            self._serial += 1
            key = self._serial
            self.agents[key] = agent
        threading.Thread(target=self.life.run, args=(agent, lambda a, ok: self._ended(key, ok)),
                         daemon=True, name=f"jenkins-agent-{key}").start()  # fmt: skip
        return agent

    def _ended(self, key: int, connected: bool) -> None:
        with self.lock:
            agent = self.agents.pop(key)
            self.builds_run += agent.build_url is not None
        if connected:
            self._failures.pop(agent.label, None)
            self._not_before.pop(agent.label, None)
        elif not agent.retire.is_set():
            failures = self._failures.get(agent.label, 0)
            self._failures[agent.label] = failures + 1
            self._not_before[agent.label] = time.monotonic() + CI_SERVER.delay(failures)
        self.changed.set()

    def _retire_idle(self) -> None:
        now = time.time()
        with self.lock:
            for kind in self.settings.labels:
                if self.waiting.get(kind.label):
                    continue
                idle = sorted((a for a in self.agents.values() if a.label == kind.label
                               and a.state == "idle" and not a.retire.is_set()),
                              key=lambda a: a.online_at or now)  # fmt: skip
                for agent in idle[: max(0, len(idle) - kind.min_idle)]:
                    if now - (agent.online_at or now) > self.settings.idle_timeout:
                        log.info("jenkins: agent %s idle past idle-timeout; removing it",
                                 agent.name)  # fmt: skip
                        agent.retire.set()

    def _sweep_orphans(self) -> None:
        prefix = self.settings.agent.name_prefix
        listed = self.api.computers()
        # Read after the listing: an agent registered meanwhile already has its name here.
        with self.lock:
            live = {a.name for a in self.agents.values()}
        for computer in listed:
            name = str(computer.get("displayName") or "")
            if not name.startswith(prefix) or name in live:
                continue
            label = name[len(prefix) :].rsplit("-", 1)[0]
            self.api.take_out(name, label)
            if current_build(computer) is not None:
                continue  # taken out of its label; deleted once its build ends
            self.api.delete_agent(name)
            with self.lock:
                self.orphans_removed += 1
            metrics.ORPHANS_REMOVED.labels(INTEGRATION).inc()
            log.info("jenkins: removed agent %s (no node of ours behind it)", name)

    def stop_all(self, wait: float = 30.0) -> None:
        """Shutting down: idle and starting agents are removed; a build still running
        loses its node (Jenkins reports it failed) rather than outliving this process
        on a node nobody would destroy."""
        with self.lock:
            agents = list(self.agents.values())
        for agent in agents:
            agent.retire.set()
            if agent.state == "busy" and agent.lease is not None:
                agent.lease.release()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.lock:
                if not self.agents:
                    return
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        with self.lock:
            agents = [a.as_dict() for a in self.agents.values()]
        return {
            "agents": agents,
            "waiting_builds": dict(self.waiting),
            "orphans_removed": self.orphans_removed,
            "builds_run": self.builds_run,
            "queue": {"passes": self.passes, "last_pass_at": self.last_pass_at,
                      "last_error": self.last_error},
        }  # fmt: skip
