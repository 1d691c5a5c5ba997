"""One Jenkins agent's life: a node, an agent registered for it, one build, the end.

The agent is registered (one executor, exclusive to its label, a name never reused)
before it starts, started on the node over SSH with its secret on standard input,
and counted connected once Jenkins lists it online. From then on it is looked at
every `poll-interval`: the moment Jenkins gives it a build it is taken offline and
relabelled `<label>-used`, so Jenkins schedules nothing else on it; when the build
ends (or runs past the label's `job-timeout`, when it is aborted) the agent is deleted,
confirmed, and the node released, so destroyed. An agent that does not connect within
`agent-timeout` loses its node and registration and is replaced.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freshpool.api.client import ApiClient
from freshpool.integrations import metrics
from freshpool.integrations.agent import AgentFailed, Lease, NoNode, with_agent
from freshpool.integrations.ciserver import CiServerError
from freshpool.integrations.jenkins.api import INTEGRATION, JenkinsApi
from freshpool.integrations.jenkins.config import LabelKind, Settings

log = logging.getLogger("freshpool.integrations.jenkins")

# A running build is looked at this often: only its end is waited for.
BUSY_POLL = 1.0
# How long an aborted build may take to stop before its agent is deleted anyway.
ABORT_GRACE = 30.0
RESULTS = {"SUCCESS": "passed", "UNSTABLE": "failed", "FAILURE": "failed"}


@dataclass
class Agent:
    """`starting` (node being got, agent connecting), `idle` (online, no build),
    `busy` (its one build runs), `ending` (being deleted)."""

    name: str
    label: str
    state: str = "starting"
    started_at: float = field(default_factory=time.time)
    online_at: float | None = None
    build_url: str | None = None
    build_started_at: float | None = None
    lease: Lease | None = None
    retire: threading.Event = field(default_factory=threading.Event)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "state": self.state,
            "build": self.build_url, "nodes": self.lease.node_ids if self.lease else [],
            "started_at": self.started_at, "online_at": self.online_at,
        }  # fmt: skip


def current_build(info: dict[str, Any]) -> dict[str, Any] | None:
    for executor in info.get("executors") or []:
        running = (executor or {}).get("currentExecutable")
        if running:
            return dict(running)
    return None


class AgentLife:
    """Starts agents, each in a thread of its own, and carries each through its life."""

    def __init__(self, settings: Settings, api: JenkinsApi, client: ApiClient, log_dir: Path,
                 queued_since: Callable[[int], float | None]) -> None:  # fmt: skip
        self.settings = settings
        self.api = api
        self.client = client
        self.log_dir = log_dir
        self.queued_since = queued_since
        log_dir.mkdir(parents=True, exist_ok=True)

    def new_name(self, label: str) -> str:
        return f"{self.settings.agent.name_prefix}{label}-{secrets.token_hex(4)}"

    def run(self, agent: Agent, done: Callable[[Agent, bool], None]) -> None:
        """The agent's whole life; `done(agent, connected)` is told at its end."""
        kind = self.settings.kind(agent.label)
        assert kind is not None
        connected = False
        try:
            lease = self._connected(agent, kind)
            connected = lease is not None
            if lease is not None:
                self._serve(agent, kind, lease)
        except Exception:
            log.exception("jenkins: agent %s", agent.name)
        finally:
            self._end(agent)
            done(agent, connected)

    def _connected(self, agent: Agent, kind: LabelKind) -> Lease | None:
        def acquire() -> Lease:
            return Lease.acquire(self.client, INTEGRATION, [kind.node_label],
                                 self.settings.freshpool.request_timeout,
                                 requestor=f"jenkins {kind.label}")  # fmt: skip

        def start(lease: Lease) -> Callable[[], bool]:
            return self._start(agent, lease)

        try:
            return with_agent(acquire, start, self.settings.agent_timeout)
        except (NoNode, AgentFailed) as exc:
            log.warning("jenkins: no agent for %s: %s", kind.label, exc)
            return None

    def _start(self, agent: Agent, lease: Lease) -> Callable[[], bool]:
        if agent.lease is not None:
            # A try before this one lost its node: its registration goes with it.
            self._delete(agent.name)
            agent.name = self.new_name(agent.label)
        agent.lease = lease
        setup = self.settings.agent.setup
        if setup:
            done = lease.run(setup, timeout=self.settings.agent_timeout)
            if done.returncode != 0:
                raise AgentFailed(f"agent setup failed on node {lease.node_ids} (exit "
                                  f"{done.returncode}): {done.stderr.strip()[-300:]}")  # fmt: skip
        remote_fs = self.settings.agent.remote_fs
        try:
            self.api.create_agent(agent.name, agent.label,
                                  f"freshpool node {lease.node_ids[0]}", remote_fs)  # fmt: skip
            secret = self.api.secret(agent.name)
        except CiServerError as exc:
            raise AgentFailed(f"registering agent {agent.name}: {exc}") from None
        command = self.settings.agent.command.format(
            url=self.settings.jenkins.url_for_nodes, name=agent.name, remote_fs=remote_fs
        )
        with open(self.log_dir / f"{agent.name}.log", "ab") as output:
            lease.start(command, output=output, stdin=secret.encode() + b"\n")
        log.info("jenkins: agent %s starting on node %s", agent.name, lease.node_ids)

        def online() -> bool:
            try:
                info = self.api.computer(agent.name)
            except CiServerError:
                return False
            return info is not None and not info.get("offline")

        return online

    def _serve(self, agent: Agent, kind: LabelKind, lease: Lease) -> None:
        agent.state, agent.online_at = "idle", time.time()
        build = self._first_build(agent, kind, lease)
        if build is None:
            return
        agent.state, agent.build_url = "busy", str(build.get("url") or "")
        agent.build_started_at = time.time()
        self._observe_queued(build)
        lease.job_started(f"jenkins {agent.build_url}")
        log.info("jenkins: agent %s runs %s", agent.name, agent.build_url)
        self._wait_build(agent, kind, lease)

    def _first_build(self, agent: Agent, kind: LabelKind, lease: Lease) -> dict[str, Any] | None:
        """Wait for Jenkins to give the agent a build, and take the agent out of its
        label at once. None when the agent ends first (retired, died, deleted)."""
        while lease.agents_alive():
            try:
                info = self.api.computer(agent.name)
            except CiServerError:
                time.sleep(self.settings.poll_interval)
                continue
            if info is None:
                log.warning("jenkins: agent %s was deleted in Jenkins", agent.name)
                return None
            build = current_build(info)
            if build is not None or info.get("idle") is False:
                self.api.take_out(agent.name, kind.label)
                return build or self._build_after_take_out(agent)
            if info.get("offline") and not info.get("temporarilyOffline"):
                log.warning("jenkins: agent %s disconnected before any build", agent.name)
                return None
            if agent.retire.is_set():
                self.api.take_out(agent.name, kind.label)
                # A build Jenkins gave it just before it went offline is its one build.
                return self._build_after_take_out(agent)
            time.sleep(self.settings.poll_interval)
        return None

    def _build_after_take_out(self, agent: Agent) -> dict[str, Any] | None:
        info = self.api.computer(agent.name)
        return current_build(info) if info is not None else None

    def _observe_queued(self, build: dict[str, Any]) -> None:
        queued = self.queued_since(int(build.get("queueId") or -1))
        started = float(build.get("timestamp") or time.time() * 1000) / 1000
        if queued is not None:
            metrics.QUEUED_TO_RUNNING.labels(INTEGRATION).observe(max(0.0, started - queued))

    def _wait_build(self, agent: Agent, kind: LabelKind, lease: Lease) -> None:
        assert agent.build_started_at is not None
        deadline = agent.build_started_at + kind.job_timeout
        aborted_at: float | None = None
        while lease.agents_alive():
            try:
                info = self.api.computer(agent.name)
            except CiServerError:
                info = {}
            if info is None or (info and current_build(info) is None):
                break
            now = time.time()
            if aborted_at is None and now > deadline:
                log.warning("jenkins: %s ran past %g s; aborting it", agent.build_url,
                            kind.job_timeout)  # fmt: skip
                aborted_at = now
                self._quietly(lambda: self.api.stop_build(str(agent.build_url)))
            elif aborted_at is not None and now - aborted_at > ABORT_GRACE:
                break
            time.sleep(BUSY_POLL)
        self._count_result(agent)

    def _count_result(self, agent: Agent) -> None:
        result = "error"
        try:
            build = self.api.build(str(agent.build_url))
            if build is not None and not build.get("building"):
                result = RESULTS.get(str(build.get("result")), "error")
        except CiServerError as exc:
            log.warning("jenkins: result of %s: %s", agent.build_url, exc)
        metrics.JOBS.labels(INTEGRATION, result).inc()

    def _end(self, agent: Agent) -> None:
        agent.state = "ending"
        self._delete(agent.name)
        if agent.lease is not None:
            agent.lease.release()

    def _delete(self, name: str) -> None:
        """Delete the registration; one Jenkins will not remove now is found again by
        the orphan sweep (an agent of ours with no node behind it)."""
        self._quietly(lambda: self.api.delete_agent(name))

    @staticmethod
    def _quietly(call: Callable[[], None]) -> None:
        try:
            call()
        except CiServerError as exc:
            log.warning("jenkins: %s", exc)
