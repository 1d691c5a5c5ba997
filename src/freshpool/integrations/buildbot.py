"""Buildbot latent workers on freshpool nodes: one build per node, then the node goes.

In master.cfg:

    from freshpool.integrations.buildbot import FreshpoolLatentWorker
    c["workers"] = [
        FreshpoolLatentWorker(f"fp-{i}", url="http://127.0.0.1:8005", label="debian")
        for i in range(8)
    ]

Each build substantiates its worker: a node is requested for the label (long-poll),
the worker process starts on it with a password made for this build and connects to
the master's PB port at the address the node sees the host by (the provider lists
the port in `network.host-ports`; nothing else on the host is open to the node).
`max_builds=1` and `build_wait_timeout=0` are forced: after its build the worker is
insubstantiated, the node released and destroyed, and the next build gets a new node.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any

from buildbot.worker import AbstractLatentWorker
from buildbot.worker.latent import States
from twisted.internet import defer, threads

from freshpool.api.client import ApiClient
from freshpool.integrations import metrics
from freshpool.integrations.agent import AgentFailed, Lease, LeasedNode, NoNode

log = logging.getLogger("freshpool.integrations.buildbot")

INTEGRATION = "buildbot"

# Runs on the node: the worker with no tac file and no daemon, so its life is the SSH
# session's, and the password comes on stdin (never on a command line or in a file).
WORKER_PROGRAM = r"""
import os, sys
from twisted.internet import reactor
from twisted.python import log
from buildbot_worker.bot import Worker
name, host, port, basedir = sys.argv[1:5]
password = sys.stdin.readline().strip()
os.makedirs(basedir, exist_ok=True)
log.startLogging(sys.stdout)
worker = Worker(host, int(port), name, password, basedir, keepalive=600, maxRetries=5,
                allow_shutdown=None, umask=0o022, delete_leftover_dirs=True)
worker.startService()
reactor.run()
"""


def pb_port(protocols: dict[str, Any]) -> int:
    """The master's PB port from c["protocols"] ({"pb": {"port": 9989 | "tcp:9989:..."}})."""
    port = protocols.get("pb", {}).get("port")
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        for part in port.split(":"):
            if part.isdigit():
                return int(part)
    raise ValueError('c["protocols"] has no "pb" port for freshpool workers to connect to')


class FreshpoolLatentWorker(AbstractLatentWorker):
    """A Buildbot worker substantiated on a fresh freshpool node for each build."""

    def checkConfig(
        self,
        name: str,
        password: str | None = None,
        *,
        url: str,
        label: str,
        token: str | None = None,
        request_timeout: float = 600.0,
        master_address: str | None = None,
        setup: str | None = None,
        python: str = "python3",
        **kwargs: Any,
    ) -> None:
        if not label:
            raise ValueError(f"worker {name}: label is empty")
        if master_address is not None and not master_address.rpartition(":")[2].isdigit():
            raise ValueError(f"worker {name}: master_address {master_address!r} is not HOST:PORT")
        if request_timeout <= 0:
            raise ValueError(f"worker {name}: request_timeout must be positive")
        for key, forced in (("max_builds", 1), ("build_wait_timeout", 0)):
            if kwargs.get(key, forced) != forced:
                raise ValueError(f"worker {name}: {key} is always {forced} (one build per node)")
            kwargs[key] = forced
        super().checkConfig(name, password, **kwargs)

    @defer.inlineCallbacks
    def reconfigService(
        self,
        name: str,
        password: str | None = None,
        *,
        url: str,
        label: str,
        token: str | None = None,
        request_timeout: float = 600.0,
        master_address: str | None = None,
        setup: str | None = None,
        python: str = "python3",
        **kwargs: Any,
    ) -> Any:
        self.url, self.label, self.token = url, label, token or os.environ.get("FRESHPOOL_TOKEN")
        self.request_timeout = request_timeout
        self.master_address = master_address
        self.setup, self.python = setup, python
        self.lease: Lease | None = getattr(self, "lease", None)
        self.started_at: float | None = None
        kwargs.update(max_builds=1, build_wait_timeout=0)
        yield super().reconfigService(name, password or self.getRandomPass(), **kwargs)

    # ------------------------------------------------------------ lifecycle

    @defer.inlineCallbacks
    def start_instance(self, build: Any) -> Any:
        if self.lease is not None:
            raise AgentFailed(f"worker {self.name} still holds nodes {self.lease.node_ids}")
        self.started_at = time.time()
        # A password for this build only: a worker process of an earlier build (or
        # anyone who saw it) cannot attach as this one.
        self.password = self._generate_random_password()
        yield self.registration.update(self, self.master.config)
        lease = yield threads.deferToThread(self._acquire)
        self.lease = lease
        try:
            yield threads.deferToThread(self._start_worker, lease, lease.nodes[0])
        except Exception:
            metrics.AGENT_START_FAILURES.labels(INTEGRATION).inc()
            self.lease = None
            yield threads.deferToThread(lease.release)
            raise
        return True

    def _acquire(self) -> Lease:
        client = ApiClient(self.url, self.token, timeout=self.request_timeout)
        try:
            return Lease.acquire(
                client, INTEGRATION, [self.label], self.request_timeout,
                requestor=f"buildbot {self.name}",
            )  # fmt: skip
        except NoNode as exc:
            client.close()
            raise AgentFailed(f"worker {self.name}: {exc}") from None

    def _start_worker(self, lease: Lease, node: LeasedNode) -> None:
        host, port = self._master_for(node)
        if self.setup:
            done = lease.run(self.setup, timeout=self.request_timeout)
            if done.returncode != 0:
                raise AgentFailed(
                    f"worker {self.name}: setup failed on node {node.node.id} "
                    f"(exit {done.returncode}): {done.stderr.strip()[-300:]}"
                )
        command = shlex.join([self.python, "-c", WORKER_PROGRAM, self.name, host, str(port),
                              "buildbot-worker"])  # fmt: skip
        output = open(self._log_path(node), "ab")  # noqa: SIM115 - the agent's life
        lease.start(command, output=output, stdin=f"{self.password}\n".encode())
        output.close()
        log.info("worker %s: starting on node %d, master %s:%d", self.name, node.node.id,
                 host, port)  # fmt: skip

    def _master_for(self, node: LeasedNode) -> tuple[str, int]:
        if self.master_address:
            host, _, port = self.master_address.rpartition(":")
            return host, int(port)
        return node.host_from_node, pb_port(self.master.config.protocols)

    def _log_path(self, node: LeasedNode) -> str:
        directory = os.path.join(self.master.basedir, "freshpool-workers")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"{self.name}-node-{node.node.id}.log")

    def check_instance(self) -> tuple[bool, str]:
        lease = self.lease
        if lease is None or lease.agents_alive():
            return True, ""
        return False, f"the worker process on node {lease.node_ids[0]} exited"

    def buildStarted(self, wfb: Any) -> None:
        super().buildStarted(wfb)
        if self.started_at is not None:
            metrics.QUEUED_TO_RUNNING.labels(INTEGRATION).observe(time.time() - self.started_at)
            self.started_at = None
        lease = self.lease
        if lease is not None:
            self._deferwaiter.add(threads.deferToThread(lease.job_started, f"buildbot {self.name}"))

    def buildFinished(self, wfb: Any) -> None:
        metrics.JOBS.labels(INTEGRATION, "finished").inc()
        super().buildFinished(wfb)

    @defer.inlineCallbacks
    def stop_instance(self, fast: bool = False) -> Any:
        lease, self.lease = self.lease, None
        if lease is not None:
            yield threads.deferToThread(lease.release)
        return True

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        # A master that stops mid-substantiation must not keep a node.
        if self.lease is not None and self.state == States.SHUT_DOWN:
            yield self.stop_instance(fast=True)
