"""Host-only networking of namespace nodes: per provider a bridge, per node a network
namespace joined to it by a veth pair, with an address from the provider's subnet."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import os
import re
import subprocess
import threading
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from freshpool.config import Provider
from freshpool.drivers.base import CommandFailed, DriverError
from freshpool.drivers.host import mounts
from freshpool.drivers.host.tools import Command, find_tool, run, tool
from freshpool.drivers.local.policy import Egress, NodePolicy, join

NETNS_DIR = "/run/netns"
# Linux interface names: at most 15 bytes, no '/', ':' or whitespace.
IFNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def bridge_name(provider: Provider) -> str:
    """The provider's bridge: configured, or derived from its name and subnet.

    The subnet is part of it so that two pools on one host (a test pool beside a
    real one, both with a provider called "local") never share a bridge.
    """
    if provider.network.bridge:
        return provider.network.bridge
    digest = hashlib.sha256(f"{provider.name} {provider.network.subnet}".encode()).hexdigest()
    return f"fp-{provider.name[:6].rstrip('-')}-{digest[:4]}"


def _mac(prefix: bytes, tail: bytes) -> str:
    return ":".join(f"{b:02x}" for b in prefix + tail)


def node_mac(ip: IPv4Address) -> str:
    """A node's MAC, derived from its address (as Docker does).

    When an address is reused, the host's ARP entry for it is still right, so the
    new node answers at once instead of after the stale entry times out.
    """
    return _mac(b"\x02\x66", ip.packed)


def set_joiners(providers: Iterable[Provider]) -> dict[str, Callable[[str, list[str]], None]]:
    """For each local provider, how to let one node set reach itself: (cluster, addresses)."""
    return {
        p.name: functools.partial(_join, bridge_name(p)) for p in providers if p.driver == "local"
    }


def _join(bridge: str, cluster: str, hosts: list[str]) -> None:
    join(cluster, bridge, [IPv4Address(h) for h in hosts])


def port_prefix(bridge: str) -> str:
    """What every node veth on `bridge` starts with, so the policy can match its ports."""
    return "fv" + hashlib.sha256(bridge.encode()).hexdigest()[:4]


def veth_name(bridge: str, external_id: str) -> str:
    """The host end of a node's veth pair, derived from the id so delete needs nothing else."""
    return port_prefix(bridge) + hashlib.sha256(external_id.encode()).hexdigest()[:9]


def netns_file(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_names() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def link_master(name: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{name}/master"))
    except OSError:
        return None


@dataclass(frozen=True)
class BridgeNetwork:
    """One provider's host-only network."""

    bridge: str
    subnet: IPv4Network
    outbound: bool
    host_ports: tuple[int, ...] = ()
    egress: tuple[str, ...] = ()
    # A host address each node's sshd is forwarded on, one port per address.
    publish: IPv4Address | None = None
    publish_ports: range = range(0)

    @classmethod
    def for_provider(cls, provider: Provider) -> BridgeNetwork:
        name = bridge_name(provider)
        if not IFNAME_PATTERN.match(name):
            raise DriverError(
                f"provider {provider.name!r}: bridge name {name!r} is not a valid interface"
                " name (at most 15 letters, digits, '.', '_' or '-')"
            )
        net = provider.network
        return cls(
            name,
            IPv4Network(net.subnet),
            net.outbound,
            tuple(sorted(set(net.host_ports))),
            tuple(net.egress),
            net.publish,
            net.publish_range,
        )

    @property
    def first_node(self) -> IPv4Address:
        return self.gateway + 1

    @property
    def node_count(self) -> int:
        """Node addresses: the subnet's, less its network, bridge and broadcast
        addresses; with `publish`, no more than it has ports."""
        count = max(0, int(self.subnet.broadcast_address) - int(self.first_node))
        return min(count, len(self.publish_ports)) if self.publish else count

    def publish_map(self, ips: Iterable[str]) -> dict[int, IPv4Address]:
        """Published port -> node address, for the nodes at `ips`."""
        return {p[1]: IPv4Address(ip) for ip in ips if (p := self.published(ip))}

    def published(self, ip: IPv4Address | str) -> tuple[str, int] | None:
        """Where the node at `ip` is reached from other machines, if it is published."""
        if self.publish is None:
            return None
        return str(self.publish), self.publish_ports[int(IPv4Address(ip)) - int(self.first_node)]

    @property
    def routes_out(self) -> bool:
        """Whether nodes get a default route: anything off the host is allowed at all."""
        return self.outbound or bool(self.egress)

    def policy(self, cluster: str) -> NodePolicy:
        """The provider's rules; egress names are resolved now."""
        return NodePolicy(
            cluster,
            self.bridge,
            port_prefix(self.bridge),
            self.subnet,
            self.host_ports,
            self.outbound,
            Egress.resolve(self.egress),
            self.publish,
        )

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's own address, the first of the subnet."""
        return self.subnet.network_address + 1

    @property
    def prefix(self) -> int:
        return self.subnet.prefixlen

    @property
    def mac(self) -> str:
        # A bridge without a set address takes the lowest of its ports' and changes as
        # nodes come and go, which would stale every node's ARP entry for the gateway.
        digest = hashlib.sha256(self.bridge.encode()).digest()
        return _mac(b"\x02", digest[:5])

    def node_batches(self, netns: str, veth: str, ip: IPv4Address) -> tuple[str, str]:
        """Two `ip -batch` scripts: one for the host, one to run inside the node's netns."""
        host = (
            f"netns add {netns}\n"
            # The peer is born inside the namespace, so its name cannot clash on the host.
            f"link add {veth} type veth peer name eth0 address {node_mac(ip)} netns {netns}\n"
            f"link set {veth} master {self.bridge} up\n"
        )
        inside = f"addr add {ip}/{self.prefix} dev eth0\nlink set lo up\nlink set eth0 up\n"
        if self.routes_out:
            inside += f"route add default via {self.gateway}\n"
        return host, inside


def subnet_clash(net: BridgeNetwork) -> str | None:
    """A host address (other than our bridge's) inside the subnet, as 'device address'.

    Such an overlap would route part of the host's own network into the bridge.
    """
    ip = find_tool("ip")
    if ip is None:
        return None
    listing = subprocess.run(
        [ip, "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[1] == net.bridge:
            continue
        interface = ipaddress.ip_interface(fields[3])
        if isinstance(interface.network, IPv4Network) and interface.network.overlaps(net.subnet):
            return f"{fields[1]} {fields[3]}"
    return None


_bridge_lock = threading.Lock()


def ensure_bridge(net: BridgeNetwork, policy: NodePolicy) -> None:
    """Create and configure the bridge and its policy; safe to repeat.

    The policy goes in before the bridge is up, so no node is ever on an open bridge.
    """
    with _bridge_lock:
        ip = tool("ip")
        if not link_exists(net.bridge):
            try:
                run([ip, "link", "add", "name", net.bridge, "address", net.mac,
                     "type", "bridge", "stp_state", "0", "forward_delay", "0"])  # fmt: skip
            except CommandFailed:
                # Another launcher may have just made it; only its absence is an error.
                if not link_exists(net.bridge):
                    raise
        if not os.path.isdir(f"/sys/class/net/{net.bridge}/bridge"):
            raise DriverError(f"{net.bridge} exists and is not a bridge; set network.bridge")
        policy.apply()
        run([ip, "-batch", "-"],
            stdin=f"addr replace {net.gateway}/{net.prefix} dev {net.bridge}\n"
                  f"link set {net.bridge} up\n")  # fmt: skip


def remove_bridge(net: BridgeNetwork, policy: NodePolicy) -> None:
    """Delete the bridge and its rules; ip_forward is left as it is (others may need it)."""
    with _bridge_lock:
        if link_exists(net.bridge):
            try:
                run([tool("ip"), "link", "del", net.bridge])
            except CommandFailed:
                if link_exists(net.bridge):
                    raise
        if find_tool("nft") is not None:
            policy.remove()


def remove_node_network(netns: str, veth: str) -> Generator[float, None, None]:
    """Steps that delete a node's veth pair and namespace; what is already gone is skipped."""
    # Deleting the host end takes the peer with it at once; leaving it to the netns
    # teardown would let the veth linger while the kernel frees the namespace. It
    # waits for an RCU grace period, so it runs as a Command beside other work.
    if link_exists(veth):
        try:
            yield from Command([tool("ip"), "link", "del", veth]).wait()
        except CommandFailed:
            if link_exists(veth):
                raise
    # What `ip netns del` does, without a process: drop the bind mount, then the file.
    path = netns_file(netns)
    if os.path.lexists(path):
        mounts.unmount(path, detach=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class AddressPool:
    """Node addresses of a subnet, handed out round-robin so a freed one rests a while."""

    def __init__(self, net: BridgeNetwork) -> None:
        self._first = int(net.first_node)
        self._count = net.node_count
        self._used: set[int] = set()
        self._cursor = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._count

    def reserve(self, ip: IPv4Address | str) -> None:
        with self._lock:
            self._used.add(int(ipaddress.ip_address(ip)))

    def release(self, ip: IPv4Address | str) -> None:
        with self._lock:
            self._used.discard(int(ipaddress.ip_address(ip)))

    def allocate(self) -> IPv4Address:
        with self._lock:
            for step in range(self._count):
                offset = (self._cursor + step) % self._count
                if self._first + offset not in self._used:
                    self._cursor = offset + 1
                    self._used.add(self._first + offset)
                    return IPv4Address(self._first + offset)
        raise DriverError(
            f"no free address left: all {self._count} node addresses are in use"
            " (a larger network.subnet allows more nodes)"
        )
