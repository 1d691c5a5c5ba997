"""LocalDriver: each node is a Linux-namespace container on this host.

A node is an overlayfs root over the image layers, its own network namespace joined
to the provider's host-only bridge, and bubblewrap running sshd as the node's only
service. Everything a node owns is named after its external id, so a node can be
found and deleted from the id alone, even after the launcher or the host restarted.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import freshpool.drivers.local.network as network
import freshpool.drivers.local.rootfs as rootfs
from freshpool.config import Provider
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    Operation,
    OutOfSpace,
    Quota,
    SshAccess,
    StepOperation,
)
from freshpool.drivers.host import cgroups, mounts, processes
from freshpool.drivers.host.driver import HostNodeDriver, NodeLaunch, tail
from freshpool.drivers.host.processes import MARK_NODE
from freshpool.drivers.host.tools import Command, find_tool, keygen, tool
from freshpool.drivers.local.limits import NodeLimiter
from freshpool.drivers.local.policy import NodePolicy
from freshpool.drivers.local.records import NodePaths, NodeRecord
from freshpool.drivers.local.sandbox import HOST_KEY, NODE_PATH, SSHD, node_argv
from freshpool.drivers.ssh import host_keys_in, wait_for_banner

# Refuse to start a node on a nearly full disk: it would fail its job anyway.
MIN_FREE_BYTES = 64 * 2**20

# Host tool -> the Debian package that provides it.
REQUIRED_TOOLS = {
    "bwrap": "bubblewrap",
    "ip": "iproute2",
    "nft": "nftables",
    "nsenter": "util-linux",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
}

_STEPS = {
    "files": "making the node's files and root",
    "disk": "making its disk",
    "network": "setting up its network",
    "keys": "generating its SSH keys",
    "access": "installing SSH access",
    "spawn": "starting it",
    "ssh": "waiting for sshd",
}


@dataclass
class _Launch(NodeLaunch[NodePaths, NodeRecord]):
    # The node's address on the bridge, allocated before anything is made.
    ip: IPv4Address


class LocalDriver(HostNodeDriver[_Launch, NodeRecord]):
    """Nodes as namespace containers on this host, reached over a host-only bridge."""

    min_free_bytes: int = MIN_FREE_BYTES
    kind = "local"
    steps = _STEPS
    noun = "node"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        self.network = network.BridgeNetwork.for_provider(provider)
        self._addresses = network.AddressPool(self.network)
        self._bridge_ready = False
        self._policy_now: NodePolicy | None = None
        self.limiter = NodeLimiter(cgroups.detect(provider.name))
        for eid in self._node_dirs():
            record = NodeRecord.load(self._paths(eid).record)
            if record is not None and ip_address(record.ip) in self.network.subnet:
                self._addresses.reserve(record.ip)

    # ---- identity and layout

    def _paths(self, external_id: str) -> NodePaths:
        return NodePaths(self.nodes_dir / external_id)

    # ---- host checks

    def check(self) -> None:
        problems = []
        if os.geteuid() != 0:
            problems.append(
                "it must run as root (it mounts overlays and creates network namespaces)"
            )
        missing = [
            f"{name} (apt-get install {package})"
            for name, package in REQUIRED_TOOLS.items()
            if find_tool(name) is None
        ]
        if missing:
            problems.append("missing " + ", ".join(missing))
        clash = network.subnet_clash(self.network)
        if clash:
            problems.append(
                f"network.subnet {self.network.subnet} overlaps {clash}: choose another subnet"
            )
        if not mounts.overlay_available():
            problems.append(
                "the kernel has no overlayfs: run `modprobe overlay`"
                " (and add `overlay` to /etc/modules to keep it)"
            )
        try:
            self.limiter.check(self.provider.limits, "limits")
        except DriverUnavailable as exc:
            problems.append(str(exc))
        if problems:
            raise DriverUnavailable(
                f"local provider {self.provider.name!r} cannot run nodes here: "
                + "; ".join(problems)
            )

    def limits(self) -> Quota:
        return Quota(max_nodes=min(self.provider.max_nodes, self._addresses.capacity))

    # ---- create

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        return StepOperation(self._create(spec))

    def _validate(self, spec: NodeSpec, external_id: str, paths: NodePaths) -> None:
        self._check_spec(spec)
        if not spec.layers:
            raise DriverError(f"{external_id}: no image layers given")
        for layer in spec.layers:
            if not Path(layer).is_dir():
                raise DriverError(f"{external_id}: image layer {layer} is not a directory")
        if os.path.lexists(paths.dir) or os.path.lexists(network.netns_file(external_id)):
            raise DriverError(
                f"{external_id} already exists (leftovers of an earlier launch?): delete it first"
            )
        self._check_free_space(external_id)
        self.limiter.check(spec.limits, f"{external_id}: label {spec.label}")

    def _create(self, spec: NodeSpec) -> Generator[float, None, Instance]:
        external_id = self.external_id_for(spec.tags)
        paths = self._paths(external_id)
        # Nothing is made before these pass, so a refusal leaves nothing to undo.
        self._validate(spec, external_id, paths)
        launch = _Launch(spec, external_id, paths, self._addresses.allocate())
        self._creating.add(external_id)
        try:
            return (yield from self._build(launch))
        finally:
            self._creating.discard(external_id)

    def _launch_steps(self, launch: _Launch) -> Generator[float, None, None]:
        launch.mark("files")
        self._make_record(launch)
        if launch.spec.limits.disk is not None:
            launch.mark("disk")
            disk = self.limiter.make_disk(launch.paths, int(launch.spec.limits.disk))
            launch.commands += yield from disk
        self._make_root(launch)
        launch.mark("network")
        yield from self._make_network(launch)
        launch.mark("keys")
        for command in launch.commands:
            yield from command.wait()
        launch.mark("access")
        self._install_access(launch)
        launch.mark("spawn")
        self._spawn(launch)
        # sshd cannot be listening yet: let other operations have the loop first.
        yield 0.005
        launch.mark("ssh")
        yield from self._wait_ssh(launch)

    def _undo(self, launch: _Launch) -> Generator[float, None, None]:
        # The address is released even if the record holding it was never written.
        yield from self._remove(launch.external_id, launch.ip)

    def _make_record(self, launch: _Launch) -> None:
        """The node dir and its record."""
        spec, paths = launch.spec, launch.paths
        paths.dir.mkdir(mode=0o700)
        for sub in (paths.rw, paths.root):
            sub.mkdir(mode=0o755)
        # The record goes first: from here on, a crash leaves a node that list_instances
        # finds, and its address stays reserved for the next driver instance.
        launch.record = NodeRecord(
            external_id=launch.external_id,
            cluster=spec.cluster,
            node_id=spec.node_id,
            build_id=spec.build_id,
            provider=self.provider.name,
            hostname=spec.hostname,
            user=spec.user,
            ip=str(launch.ip),
            netns=launch.external_id,
            veth=network.veth_name(self.network.bridge, launch.external_id),
            bridge=self.network.bridge,
            layers=[str(p) for p in spec.layers],
            created=time.time(),
        )
        launch.record.save(paths.record)

    def _make_root(self, launch: _Launch) -> None:
        """The overlay root; starts the key generators."""
        spec, paths = launch.spec, launch.paths
        for sub in (paths.upper, paths.work):
            sub.mkdir(mode=0o755)
        layers = [Path(os.path.abspath(layer)) for layer in spec.layers]
        mounts.mount_overlay(layers, paths.upper, paths.work, paths.root)
        if mounts.is_read_only(paths.root):
            # overlayfs mounts read-only when it cannot create its work dir: a full disk.
            raise OutOfSpace(f"{launch.external_id}: the overlay came up read-only (disk full?)")
        if not os.path.isfile(rootfs.inside(paths.root, SSHD)):
            raise DriverError(f"the image has no {SSHD}: install openssh-server in it")
        etc_ssh = rootfs.clean_ssh_dir(paths.root)
        for key, role in ((etc_ssh / "ssh_host_ed25519_key", "host"), (paths.key, "client")):
            launch.commands.append(keygen(key, role, launch.external_id))

    def _make_network(self, launch: _Launch) -> Generator[float, None, None]:
        if not self._bridge_ready or not network.link_exists(self.network.bridge):
            # One create at a time reaches this (the loop is single-threaded and this
            # step does not yield), so the bridge is set up once.
            network.ensure_bridge(self.network, self._policy())
            self._bridge_ready = True
        host, inside = self.network.node_batches(
            launch.external_id,
            network.veth_name(self.network.bridge, launch.external_id),
            launch.ip,
        )
        ip = tool("ip")
        command = Command([ip, "-batch", "-"], stdin=host)
        launch.commands.append(command)
        yield from command.wait()
        command = Command([ip, "-n", launch.external_id, "-batch", "-"], stdin=inside)
        launch.commands.append(command)
        yield from command.wait()
        published = self.network.published(launch.ip)
        if published:
            self._policy(resolve=False).publish_node(published[1], launch.ip)

    def _install_access(self, launch: _Launch) -> None:
        """Client key into the user's authorized_keys; pinned host key; sshd's needs."""
        spec, paths, root = launch.spec, launch.paths, launch.paths.root
        rootfs.authorize_key(root, spec.user, paths.key.with_suffix(".pub").read_text())
        host_pub = rootfs.inside(root, f"{HOST_KEY}.pub").read_text().split()
        rootfs.write_file(paths.known_hosts, f"{launch.ip} {host_pub[0]} {host_pub[1]}\n", 0o644)
        # sshd refuses to start without its privilege separation directory.
        rootfs.make_dir(rootfs.inside(root, "/run/sshd"), 0o755)
        rootfs.write_identity(root, spec.hostname, launch.ip)

    def _spawn(self, launch: _Launch) -> None:
        spec, paths, record = launch.spec, launch.paths, launch.record
        assert record is not None
        argv = self.limiter.command(
            self.limiter.make_group(launch.external_id, spec.limits),
            node_argv(network.netns_file(launch.external_id), str(paths.root), spec.hostname),
        )
        env = {"PATH": NODE_PATH, **self._marks(spec.node_id)}
        with open(paths.log, "ab") as log:
            # Its own session and no --die-with-parent: the node outlives the launcher,
            # which adopts it again after a restart.
            launch.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self._adopt(launch)

    def _wait_ssh(self, launch: _Launch) -> Generator[float, None, None]:
        """Poll the SSH banner without blocking; a node that dies says why at once."""
        assert launch.proc is not None
        eid, address, log = launch.external_id, f"{launch.ip}:22", launch.paths.log
        timeout = self.provider.boot_timeout
        yield from wait_for_banner(
            str(launch.ip),
            22,
            launch.proc,
            time.monotonic() + timeout,
            died=lambda status: DriverError(
                f"{eid}: the node exited with status {status} before sshd answered: {tail(log)}"
            ),
            timed_out=lambda: TimeoutError(
                f"{eid}: no SSH answer from {address} within {timeout:g} s: {tail(log)}"
            ),
            # Connected (or connecting): the banner is on its way; look again soon.
            pending=(0.002, 0.02),
            # Refused: sshd is not listening yet.
            refused=(0.002, 0.1),
        )

    # ---- delete

    def _node_pids(self, external_id: str, record: NodeRecord | None) -> set[int]:
        pids = processes.node_processes(
            network.netns_file(external_id), self._marks(self.node_id_of(external_id))
        )
        if record is not None and record.alive():
            assert record.pid is not None
            pids.add(record.pid)
        return pids

    def _remove(
        self, external_id: str, ip: IPv4Address | None = None
    ) -> Generator[float, None, None]:
        """Remove every trace of a node, whatever state it is in; the steps of delete."""
        paths = self._paths(external_id)
        record = NodeRecord.load(paths.record)
        deadline = time.monotonic() + self.provider.delete_timeout
        # Killing the node's pid 1 (the inner bwrap) takes its whole PID namespace down,
        # so once these are gone nothing of the node runs; a last scan makes sure.
        yield from self._kill(
            external_id,
            lambda: self._node_pids(external_id, record),
            deadline,
            pause=0.002,
            survivors="processes {} survive SIGKILL",
        )
        while not self.limiter.remove_group(external_id):
            if time.monotonic() > deadline:
                raise DriverError(f"{external_id}: its cgroup still holds processes")
            yield 0.01
        attempts = 0
        while points := mounts.mounts_under(paths.dir):
            for mount in points:
                try:
                    # A lazy unmount is the last resort: it hides a busy mount, not frees it.
                    mounts.unmount(mount, detach=attempts >= 20)
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise DriverError(f"{external_id}: cannot unmount {mount}: {exc}") from exc
            attempts += 1
            if mounts.mounts_under(paths.dir):
                yield 0.05
        yield from network.remove_node_network(
            external_id, network.veth_name(self.network.bridge, external_id)
        )
        addresses = {IPv4Address(a) for a in (ip, record.ip if record else None) if a is not None}
        if self._bridge_ready:
            policy = self._policy(resolve=False)
            for address in addresses:
                policy.forget(address)
        if os.path.lexists(paths.dir):
            yield from self._trash(paths.dir, external_id)
        for address in addresses:
            self._addresses.release(address)

    # ---- list

    def list_instances(self) -> list[Instance]:
        self._reap()
        records = {eid: NodeRecord.load(self._paths(eid).record) for eid in self._node_dirs()}
        mounted: set[str] = set()
        for mount in mounts.mounts_under(self.nodes_dir):
            parts = mount.relative_to(self.nodes_dir).parts
            if not parts or self.node_id_of(parts[0]) is None:
                continue
            if len(parts) == 2 and parts[1] == "root":
                mounted.add(parts[0])
            else:
                # Something else mounted in a node dir: a leftover all the same.
                records.setdefault(parts[0], None)
        netns = {n for n in network.netns_names() if self.node_id_of(n) is not None}
        marked: dict[str, list[int]] = {}
        for pid, marks in processes.marked_processes(self._marks()).items():
            marked.setdefault(f"{self._prefix}{marks.get(MARK_NODE, '')}", []).append(pid)
        found = set(records) | mounted | {e for e in marked if self.node_id_of(e) is not None}
        found |= {g for g in self.limiter.groups() if self.node_id_of(g) is not None}
        for name in netns - found:
            # A namespace alone could be another local provider's node of this cluster;
            # it is ours if its veth is on our bridge.
            if (
                network.link_master(network.veth_name(self.network.bridge, name))
                == self.network.bridge
            ):
                found.add(name)

        def problems_of(eid: str, record: NodeRecord | None) -> list[str]:
            problems = []
            if record is None:
                problems.append("no runtime record")
            elif not record.alive():
                problems.append("process gone")
            if eid not in mounted:
                problems.append("root not mounted")
            if eid not in netns:
                problems.append("netns gone")
            return problems

        instances = []
        for eid, instance in self._listed(found, records, problems_of):
            if eid not in records or records[eid] is None:
                instance.details.setdefault("netns", eid)
            if eid in marked:
                instance.details["marked_pids"] = sorted(marked[eid])
            instances.append(instance)
        return instances

    def _instance(self, record: NodeRecord, alive: bool) -> Instance:
        paths = self._paths(record.external_id)
        known = str(paths.known_hosts)
        public_host, public_port = self.network.published(record.ip) or (None, None)
        access = SshAccess(
            record.ip, 22, record.user, str(paths.key), known, host_keys_in(known),
            public_host, public_port, host_from_node=str(self.network.gateway),
        )  # fmt: skip
        details: dict[str, Any] = {
            "ip": record.ip,
            "hostname": record.hostname,
            "netns": record.netns,
            "veth": record.veth,
            "bridge": record.bridge,
            "pid": record.pid,
            "node_dir": str(paths.dir),
            "created": record.created,
        }
        return Instance(record.external_id, record.tags, alive, access, details)

    def faults(self, external_id: str) -> list[str]:
        return self.limiter.faults(external_id)

    # ---- the bridge and its policy

    def _policy(self, resolve: bool = True) -> NodePolicy:
        """The rules as the config says now (egress names resolved unless not needed)."""
        if resolve or self._policy_now is None:
            net = self.network if resolve else replace(self.network, egress=())
            self._policy_now = net.policy(self.cluster)
        return self._policy_now

    def reconcile(self, node_sets: Callable[[], Sequence[Sequence[str]]]) -> None:
        """Repair the rules; let through exactly the pairs of the node sets in use."""
        if not self._bridge_ready and not network.link_exists(self.network.bridge):
            return

        def addresses() -> list[list[IPv4Address]]:
            records = [[NodeRecord.load(self._paths(e).record) for e in s] for s in node_sets()]
            return [[IPv4Address(r.ip) for r in rs if r is not None] for rs in records]

        live = [NodeRecord.load(self._paths(e).record) for e in self._node_dirs()]
        ports = self.network.publish_map(r.ip for r in live if r is not None)
        self._policy().reconcile(addresses, ports)
        self._bridge_ready = True

    def remove_network(self, force: bool = False) -> None:
        """Delete this provider's bridge and NAT rules.

        Refuses while nodes (of any cluster) are attached to the bridge, unless `force`.
        """
        if self.bridge_ports() and not force:
            raise DriverError(
                f"bridge {self.network.bridge} still has {len(self.bridge_ports())}"
                " node(s) attached"
            )
        network.remove_bridge(self.network, self._policy(resolve=False))
        self._bridge_ready = False

    def teardown(self) -> None:
        """Remove the bridge and NAT rules if no node uses them any more; else leave them."""
        if not self.bridge_ports():
            self.remove_network()

    def bridge_ports(self) -> list[str]:
        """Host veth ends attached to this provider's bridge."""
        try:
            return os.listdir(f"/sys/class/net/{self.network.bridge}/brif")
        except OSError:
            return []
