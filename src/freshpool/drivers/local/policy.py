"""The network policy of a local provider's nodes, in nftables tables of our own.

Default deny. A node reaches:
- the nodes of its own node set, and no other node (a ready node, in no set yet,
  reaches nobody): the bridge family's forward hook sees every frame between two
  ports of the bridge, and lets IPv4 through only for address pairs in `peers`;
- on the host, only the ports the provider lists in `network.host-ports`, plus the
  replies to connections the host opened (the launcher's SSH);
- off the host, nothing, or everything with `outbound: true`, or what
  `network.egress` allows (CIDRs, or host:port resolved when the rules are made);
  both masqueraded behind the host.

Every rule lives in tables named `freshpool-<cluster>` (bridge, inet and ip
families), in chains and sets named after the provider's bridge, so nothing of
anyone else is touched and two providers (or two clusters) never share a rule. The
chains are rebuilt in one atomic batch, so a repair never opens a gap. Rules match
the bridge's own ports by their name prefix, which network.py derives from the
bridge, so traffic on any other bridge passes through untouched.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from freshpool.drivers.base import CommandFailed, DriverError
from freshpool.drivers.host.tools import run, tool


def table_name(cluster: str) -> str:
    return f"freshpool-{cluster}"


@dataclass(frozen=True)
class Egress:
    """What nodes may reach off the host: networks, and (address, port) pairs."""

    networks: tuple[IPv4Network, ...] = ()
    services: tuple[tuple[IPv4Address, int], ...] = ()

    @classmethod
    def resolve(cls, entries: Sequence[str]) -> Egress:
        """Entries as the config has them ("10.1.0.0/16", "pypi.org:443"), names resolved now."""
        networks: list[IPv4Network] = []
        services: list[tuple[IPv4Address, int]] = []
        for entry in entries:
            host, _, port = entry.rpartition(":")
            if not host:
                networks.append(IPv4Network(entry, strict=False))
                continue
            try:
                infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise DriverError(f"network.egress: cannot resolve {host!r}: {exc}") from exc
            for info in infos:
                services.append((IPv4Address(info[4][0]), int(port)))
        return cls(tuple(dict.fromkeys(networks)), tuple(dict.fromkeys(services)))


@dataclass(frozen=True)
class NodePolicy:
    """One local provider's rules."""

    cluster: str
    bridge: str
    # Every node's host-side veth name starts with this (see network.veth_name).
    port_prefix: str
    subnet: IPv4Network
    host_ports: tuple[int, ...]
    outbound: bool
    egress: Egress
    # The host address nodes' sshd ports are published on (DNAT), if any.
    publish: IPv4Address | None = None

    @property
    def table(self) -> str:
        return table_name(self.cluster)

    @property
    def peers(self) -> str:
        return f"peers-{self.bridge}"

    @property
    def published(self) -> str:
        return f"pub-{self.bridge}"

    @property
    def routes_out(self) -> bool:
        """Whether nodes get a default route (anything off the host is allowed at all)."""
        return self.outbound or bool(self.egress.networks or self.egress.services)

    def _chains(self) -> list[str]:
        t, b = self.table, self.bridge
        br, inp, out, nat = (f"bridge {t} fwd-{b}", f"inet {t} in-{b}", f"inet {t} out-{b}",
                             f"ip {t} nat-{b}")  # fmt: skip
        ours, others = f'iifname "{b}"', f'iifname != "{b}"'
        lines = [
            f"add table bridge {t}",
            f"add set bridge {t} {self.peers} {{ type ipv4_addr . ipv4_addr; }}",
            *_base_chain(br, "filter", "forward", "0"),
            f'add rule {br} iifname != "{self.port_prefix}*" accept',
            f"add rule {br} ether type arp accept",
            f"add rule {br} ip saddr . ip daddr @{self.peers} accept",
            f"add rule {br} drop",
            f"add table inet {t}",
            *_base_chain(inp, "filter", "input", "0"),
            f"add rule {inp} {others} accept",
            f"add rule {inp} ct state established,related accept",
        ]
        if self.host_ports:
            listed = ", ".join(str(p) for p in self.host_ports)
            lines.append(
                f"add rule {inp} meta l4proto {{ tcp, udp }} th dport {{ {listed} }} accept"
            )
        lines += [
            f"add rule {inp} drop",
            *_base_chain(out, "filter", "forward", "0"),
            # From elsewhere to the nodes: only replies to what a node opened.
            f'add rule {out} oifname "{b}" {others} ct state established,related accept',
            # A published port, forwarded to a node's sshd (and nothing else of it).
            f'add rule {out} oifname "{b}" {others} ct status dnat tcp dport 22 accept',
            f'add rule {out} oifname "{b}" {others} drop',
            f"add rule {out} {others} accept",
            # Between two of the bridge's ports (br_netfilter): the bridge chain decides.
            f'add rule {out} oifname "{b}" accept',
            # Replies: to a published port's connections, and to allowed egress.
            f"add rule {out} {ours} ct state established,related accept",
            *self._egress_rules(f"add rule {out} {ours}"),
            f"add rule {out} drop",
            f"add table ip {t}",
            *_base_chain(nat, "nat", "postrouting", "srcnat"),
        ]
        if self.routes_out:
            lines.append(f'add rule {nat} ip saddr {self.subnet} oifname != "{b}" masquerade')
        if self.publish is not None:
            lines += self._publish_rules()
        return lines

    def _publish_rules(self) -> list[str]:
        """Each published port (an element of the map, one per node) to its node's sshd;
        the connection comes from the bridge's address, which nodes answer."""
        t, b = self.table, self.bridge
        lines = [
            f"add map ip {t} {self.published} {{ type inet_service : ipv4_addr . inet_service; }}",
            f'add rule ip {t} nat-{b} oifname "{b}" ct status dnat tcp dport 22 masquerade',
        ]
        # From elsewhere (prerouting), and from this host itself (output).
        for chain, hook in ((f"ip {t} dnat-{b}", "prerouting"), (f"ip {t} local-{b}", "output")):
            lines += [
                # -100 is dstnat's priority; nft has the name for prerouting only.
                *_base_chain(chain, "nat", hook, "-100"),
                f"add rule {chain} ip daddr {self.publish}"
                f" dnat ip to tcp dport map @{self.published}",
            ]
        return lines

    def publish_node(self, port: int, ip: IPv4Address) -> None:
        _nft_batch([f"add element ip {self.table} {self.published} {{ {port} : {ip} . 22 }}"])

    def published_ports(self) -> dict[int, IPv4Address]:
        found: dict[int, IPv4Address] = {}
        if self.publish is None:
            return found
        for item in _nft_json(["list", "map", "ip", self.table, self.published]):
            for port, target in item.get("map", {}).get("elem", []):
                found[int(port)] = IPv4Address(target["concat"][0])
        return found

    def _egress_rules(self, prefix: str) -> list[str]:
        if self.outbound:
            return [f"{prefix} accept"]
        rules = []
        if self.egress.networks:
            nets = ", ".join(str(n) for n in self.egress.networks)
            rules.append(f"{prefix} ip daddr {{ {nets} }} accept")
        if self.egress.services:
            pairs = ", ".join(f"{a} . {p}" for a, p in self.egress.services)
            rules.append(
                f"{prefix} meta l4proto {{ tcp, udp }} ip daddr . th dport {{ {pairs} }} accept"
            )
        return rules

    def apply(self) -> None:
        """Create the rules, or put them back as they should be; one atomic batch."""
        if self.routes_out:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as forward:
                forward.write("1\n")
        _nft_batch(self._chains())

    def remove(self) -> None:
        """Remove this provider's chains and set, and each table once nothing is left in it."""
        lines = []
        for family, objects in _tables(self.table).items():
            mine = {(k, n) for k, n in objects if n.endswith(f"-{self.bridge}")}
            lines += [f"delete {k} {family} {self.table} {n}" for k, n in sorted(mine)]
            if objects <= mine:
                lines.append(f"delete table {family} {self.table}")
        if lines:
            _nft_batch(lines)

    def pairs(self) -> set[tuple[IPv4Address, IPv4Address]]:
        """The address pairs let through now."""
        found: set[tuple[IPv4Address, IPv4Address]] = set()
        for item in _nft_json(["list", "set", "bridge", self.table, self.peers]):
            for elem in item.get("set", {}).get("elem", []):
                a, b = elem["concat"]
                found.add((IPv4Address(a), IPv4Address(b)))
        return found

    def update(
        self,
        add: Iterable[tuple[IPv4Address, IPv4Address]] = (),
        remove: Iterable[tuple[IPv4Address, IPv4Address]] = (),
    ) -> None:
        """Let pairs through, or stop them, in one batch (`remove`: pairs that are there)."""
        lines = []
        for verb, pairs in (("delete", remove), ("add", add)):
            elems = ", ".join(f"{a} . {b}" for a, b in pairs)
            if elems:
                lines.append(f"{verb} element bridge {self.table} {self.peers} {{ {elems} }}")
        if lines:
            _nft_batch(lines)

    def reconcile(
        self,
        node_sets: Callable[[], Sequence[Sequence[IPv4Address]]],
        published: dict[int, IPv4Address],
    ) -> None:
        """Repair the rules, let through exactly the pairs of the node sets in use, and
        publish exactly the nodes that exist (`published`: port -> node address).

        The pairs are listed before the sets are read, so a set handed out meanwhile
        is in the sets, or not yet among the pairs: never wrongly dropped.
        """
        self.apply()
        now = self.pairs()
        wanted = {pair for ips in node_sets() for pair in set_pairs(ips)}
        self.update(add=wanted - now, remove=now - wanted)
        if self.publish is not None:
            there = self.published_ports()
            stale = [str(p) for p, ip in there.items() if published.get(p) != ip]
            lines = [f"delete element ip {self.table} {self.published} {{ {', '.join(stale)} }}"]
            lines = lines if stale else []
            lines += [
                f"add element ip {self.table} {self.published} {{ {p} : {ip} . 22 }}"
                for p, ip in published.items()
                if there.get(p) != ip
            ]
            if lines:
                _nft_batch(lines)

    def forget(self, ip: IPv4Address) -> None:
        """Stop every pair with `ip` in it, and its published port: its node is gone, and
        the address comes back."""
        self.update(remove=[p for p in self.pairs() if ip in p])
        ports = [str(port) for port, to in self.published_ports().items() if to == ip]
        if ports:
            _nft_batch(
                [f"delete element ip {self.table} {self.published} {{ {', '.join(ports)} }}"]
            )


def set_pairs(ips: Sequence[IPv4Address]) -> list[tuple[IPv4Address, IPv4Address]]:
    """Both directions between every two nodes of one node set."""
    return [(a, b) for a in ips for b in ips if a != b]


def join(cluster: str, bridge: str, ips: Sequence[IPv4Address]) -> None:
    """Let the nodes at `ips` (one node set, just handed out) reach each other."""
    pairs = ", ".join(f"{a} . {b}" for a, b in set_pairs(ips))
    if pairs:
        _nft_batch([f"add element bridge {table_name(cluster)} peers-{bridge} {{ {pairs} }}"])


def _base_chain(chain: str, kind: str, hook: str, priority: str) -> list[str]:
    """Lines that make a base chain if missing and empty it (the batch refills it)."""
    spec = f"type {kind} hook {hook} priority {priority}; policy accept;"
    return [f"add chain {chain} {{ {spec} }}", f"flush chain {chain}"]


def _tables(table: str) -> dict[str, set[tuple[str, str]]]:
    """Each family's table of this name that exists, with its chains and sets."""
    found: dict[str, set[tuple[str, str]]] = {}
    for item in _nft_json(["list", "tables"]):
        t = item.get("table")
        if t and t["name"] == table:
            objects = found.setdefault(t["family"], set())
            for inner in _nft_json(["list", "table", t["family"], table]):
                for kind in ("chain", "set"):
                    if kind in inner:
                        objects.add((kind, inner[kind]["name"]))
    return found


def _nft_json(args: list[str]) -> list[dict[str, Any]]:
    try:
        text = run([tool("nft"), "-j", *args])
    except CommandFailed as exc:
        if "No such file or directory" in str(exc):
            return []
        raise
    return [x for x in json.loads(text or "{}").get("nftables", []) if "metainfo" not in x]


def _nft_batch(lines: list[str]) -> None:
    run([tool("nft"), "-f", "-"], stdin="\n".join(lines) + "\n")
