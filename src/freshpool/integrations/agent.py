"""The life of a CI agent on freshpool nodes, the same for every CI system.

A `Lease` is one CI job's node set: it is requested with an SSH key made for the job
(the public half goes to the nodes at hand-out, the private half never leaves this
host), the nodes' host keys are pinned from the API's answer, the agent is started
and commands run over SSH, and the set is released once however the job ends. The
lease works the same whether the client runs on the pool's host or on another
machine (then it uses each node's published address).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from freshpool.api.client import ApiClient, ApiError, RequestFailed
from freshpool.core.backoff import CI_SERVER, with_retries
from freshpool.drivers.ssh import SshAccess, ssh_argv
from freshpool.integrations import metrics
from freshpool.store import NodeRow

log = logging.getLogger("freshpool.integrations")


class NoNode(Exception):
    """No node set for the job: the pool had none in time, or the request failed."""


class AgentFailed(Exception):
    """The CI agent could not be started on its node, or never connected."""


class JobKey:
    """An ed25519 key pair made for one CI job, in a private directory of its own."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="freshpool-job-"))
        self.path = self.dir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "freshpool-job", "-f",
             str(self.path)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip
        self.public = self.path.with_suffix(".pub").read_text().strip()

    @classmethod
    def at(cls, directory: Path) -> JobKey:
        """The key another process of the same job made (a CI system that runs each
        stage as a process of its own: GitLab's custom executor)."""
        key = cls.__new__(cls)
        key.dir = directory
        key.path = directory / "id_ed25519"
        key.public = key.path.with_suffix(".pub").read_text().strip()
        return key

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class LeasedNode:
    node: NodeRow
    # How this process reaches the node: the job's key, the node's pinned host keys.
    access: SshAccess

    @property
    def host_from_node(self) -> str:
        """The host's address as the node sees it: where a CI master on the pool's host
        listens for agents (the provider's network.host-ports)."""
        if not self.access.host_from_node:
            raise AgentFailed(f"node {self.node.id}: the API did not say how it reaches the host")
        return self.access.host_from_node


def _reach(node: NodeRow, key: JobKey) -> SshAccess:
    if not node.access:
        raise AgentFailed(f"node {node.id} came without access details")
    given = SshAccess(**node.access)
    host, port = given.host, given.port
    if given.public_host and given.public_port:
        host, port = given.public_host, given.public_port
    known = key.dir / f"known_hosts-{node.id}"
    where = host if port == 22 else f"[{host}]:{port}"
    known.write_text("".join(f"{where} {hk}\n" for hk in given.host_keys))
    return replace(given, host=host, port=port, key_path=str(key.path),
                   known_hosts_path=str(known))  # fmt: skip


def _transient(exc: Exception) -> bool:
    return isinstance(exc, ApiError) and (exc.status is None or exc.status >= 500)


class Lease:
    """One CI job's node set, from its request to its release."""

    def __init__(self, client: ApiClient, integration: str, nodes: Sequence[NodeRow],
                 key: JobKey) -> None:  # fmt: skip
        self.client = client
        self.integration = integration
        self.key = key
        self.rows = list(nodes)
        self.nodes = [LeasedNode(n, _reach(n, key)) for n in nodes]
        self._agents: list[subprocess.Popen[bytes]] = []
        self._released = False
        self._lock = threading.Lock()

    @classmethod
    def acquire(
        cls,
        client: ApiClient,
        integration: str,
        labels: Sequence[str],
        timeout: float,
        requestor: str = "",
        priority: int = 0,
    ) -> Lease:
        """Ask the pool for `labels` (one node each) and wait up to `timeout` seconds."""
        key = JobKey()
        try:
            nodes = with_retries(
                lambda: client.request_nodes(
                    labels, timeout, requestor=requestor or integration, priority=priority,
                    ssh_keys=[key.public],
                ),
                tries=4, backoff=CI_SERVER, retryable=_transient,
            )  # fmt: skip
        except RequestFailed as exc:
            key.close()
            why = exc.request.get("reason") or exc.request.get("state", "")
            raise NoNode(f"no {', '.join(labels)} node set within {timeout:g} s ({why})") from None
        except ApiError as exc:
            key.close()
            raise NoNode(f"freshpool refused the request: {exc}") from None
        lease = cls(client, integration, nodes, key)
        log.info("%s: nodes %s for %s", integration, lease.node_ids, ", ".join(labels))
        return lease

    def save(self) -> dict[str, Any]:
        """What `restore` needs to take the lease up in another process."""
        return {"key_dir": str(self.key.dir), "nodes": [dataclasses.asdict(n) for n in self.rows]}

    @classmethod
    def restore(cls, client: ApiClient, integration: str, saved: dict[str, Any]) -> Lease:
        nodes = [NodeRow(**n) for n in saved["nodes"]]
        return cls(client, integration, nodes, JobKey.at(Path(saved["key_dir"])))

    @property
    def node_ids(self) -> list[int]:
        return [n.node.id for n in self.nodes]

    def agents_alive(self) -> bool:
        """Whether every agent started on the nodes still runs."""
        return all(proc.poll() is None for proc in self._agents)

    @property
    def released(self) -> bool:
        return self._released

    def ssh(self, command: str, node: int = 0) -> list[str]:
        return ssh_argv(self.nodes[node].access, command)

    def run(self, command: str, node: int = 0, timeout: float = 120.0,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `command` on a node (as its user, in sh) and wait for it."""
        return subprocess.run(
            self.ssh(command, node), input=stdin, capture_output=True, text=True,
            timeout=timeout, check=False,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )  # fmt: skip

    def start(self, command: str, node: int = 0, output: IO[Any] | None = None,
              stdin: bytes | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start the agent: `command` runs on the node for as long as its SSH session
        lives, so the agent's exit (or the node's death) is this process's exit."""
        proc = subprocess.Popen(
            self.ssh(command, node), stdin=subprocess.PIPE,
            stdout=output or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if proc.stdin is not None:
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        self._agents.append(proc)
        return proc

    def job_started(self, job: str) -> None:
        """Tell the pool the nodes run a job now (in-use, with the job's name)."""
        for leased in self.nodes:
            try:
                self.client.job_started(leased.node.id, job)
            except ApiError as exc:
                log.warning("%s: node %d: in-use not recorded: %s", self.integration,
                            leased.node.id, exc)  # fmt: skip

    def release(self) -> None:
        """Stop the agents and give the nodes back to be destroyed; once, retried while
        the API is unreachable; safe to call again and from any thread."""
        with self._lock:
            if self._released:
                return
            self._released = True
        for proc in self._agents:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for leased in self.nodes:
            try:
                with_retries(functools.partial(self.client.release, leased.node.id), tries=6,
                             backoff=CI_SERVER, retryable=_transient)  # fmt: skip
            except ApiError as exc:
                # Gone already (404) or not ours to release: the pool deletes it anyway.
                log.warning("%s: node %d: release: %s", self.integration, leased.node.id, exc)
        self.key.close()
        log.info("%s: released nodes %s", self.integration, self.node_ids)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def wait_until(connected: Callable[[], bool], timeout: float,
               alive: Callable[[], bool] = lambda: True, every: float = 0.2) -> bool:  # fmt: skip
    """Poll `connected()` until it is true (True), or `timeout` passes or `alive()` turns
    false (False). An agent that exited is asked about once more: one that took its one
    job and finished between two polls did connect."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connected():
            return True
        if not alive():
            return connected()
        time.sleep(every)
    return connected()


def with_agent(
    acquire: Callable[[], Lease],
    start: Callable[[Lease], Callable[[], bool]],
    agent_timeout: float,
    tries: int = 3,
) -> Lease:
    """A lease whose agent is connected to its CI server. `start(lease)` starts the
    agent and returns how to tell it connected; a node whose agent does not connect
    within `agent_timeout` is released (so destroyed) and replaced, up to `tries` times."""
    problem = ""
    for _ in range(tries):
        lease = acquire()
        try:
            connected = start(lease)
            if wait_until(connected, agent_timeout, lease.agents_alive):
                return lease
            problem = (
                f"the agent on node {lease.node_ids} did not connect within {agent_timeout:g} s"
                if lease.agents_alive()
                else f"the agent on node {lease.node_ids} exited before connecting"
            )
        except AgentFailed as exc:
            problem = str(exc)
        except BaseException:
            lease.release()
            raise
        metrics.AGENT_START_FAILURES.labels(lease.integration).inc()
        log.warning("%s: %s; replacing the node", lease.integration, problem)
        lease.release()
    raise AgentFailed(f"{problem} ({tries} tries)")
