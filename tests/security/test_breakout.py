"""Break-out attempts from inside real local nodes, as a job running as root would try.

Every attempt must fail; each test is named for what it tries. The positive side is
here too: a node set's peers reach each other, a listed host port is reached.
Traffic stays on this module's own bridge and subnet and on the host's loopback
services that the tests start; nothing is sent off the machine (the "internet"
attempt connects to an address of a network namespace this test made, reachable
only through the host's forwarding, which the policy must refuse).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from freshpool.config import LocalNetwork, Provider
from freshpool.drivers import ssh
from freshpool.drivers.base import Instance, NodeSpec
from freshpool.drivers.local import LocalDriver
from freshpool.drivers.local.policy import set_pairs

SUBNET = "10.214.90.0/24"
BRIDGE = "fp-test-sec"
OUTSIDE_NS = "fp-test-sec-out"
OUTSIDE_IP = "10.214.91.2"
# The host's end of the link to that namespace: the address nodes are published on.
HOST_OUTSIDE_IP = "10.214.91.1"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real nodes need root")


def _provider(host_ports: list[int]) -> Provider:
    network = LocalNetwork.model_validate(
        {
            "subnet": SUBNET,
            "bridge": BRIDGE,
            "host_ports": host_ports,
            "egress": [f"{OUTSIDE_IP}:22"],
            "publish": HOST_OUTSIDE_IP,
            "publish_ports": "41900-41999",
        }
    )
    return Provider.model_validate(
        {
            "name": "test-sec",
            "network": network,
            "boot_timeout": 20.0,
            "delete_timeout": 20.0,
        }
    )


class _Server(threading.Thread):
    """An HTTP server on all the host's addresses, as a database or agent would be."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.httpd = http.server.HTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
        self.port = self.httpd.server_address[1]

    def run(self) -> None:
        self.httpd.serve_forever()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[_Server, _Server]]:
    listed, unlisted = _Server(), _Server()
    listed.start()
    unlisted.start()
    yield listed, unlisted
    listed.httpd.shutdown()
    unlisted.httpd.shutdown()


@pytest.fixture(scope="module")
def pool(
    servers: tuple[_Server, _Server],
    outside: str,
    image_build_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalDriver, list[Instance]]]:
    listed, _ = servers
    driver = LocalDriver(
        _provider([listed.port]), f"s{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("sec")
    )
    nodes = []
    try:
        for node_id in (1, 2, 3):
            layers = (image_build_dir / "rootfs",)
            spec = NodeSpec(node_id, driver.cluster, "debian", f"node-{node_id}", "b", layers)
            nodes.append(driver.create(spec).wait(60))
        yield driver, nodes
    finally:
        for instance in driver.list_instances():
            driver.delete(instance.external_id).wait(60)
        driver.remove_network(force=True)


def _ip(instance: Instance) -> str:
    assert instance.access is not None
    return instance.access.host


def _on(instance: Instance, command: str) -> subprocess.CompletedProcess[str]:
    assert instance.access is not None
    return ssh.run(instance.access, command, timeout=30)


def _connects(instance: Instance, host: str, port: int) -> bool:
    probe = (
        "import socket,sys\n"
        f"try: socket.create_connection(({host!r}, {port}), timeout=1.5).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    done = _on(instance, f"python3 -c {_quote(probe)}")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _gateway() -> str:
    return str(IPv4Address(SUBNET.split("/")[0]) + 1)


# ---- the network


def test_cannot_reach_another_requests_node(pool: tuple[LocalDriver, list[Instance]]) -> None:
    _, (a, b, _c) = pool
    assert not _connects(a, _ip(b), 22)


def test_node_set_peers_reach_each_other_and_only_each_other(
    pool: tuple[LocalDriver, list[Instance]],
) -> None:
    driver, (a, b, c) = pool
    driver.reconcile(lambda: [[a.external_id, b.external_id]])
    try:
        assert _connects(a, _ip(b), 22)
        assert _connects(b, _ip(a), 22)
        assert not _connects(a, _ip(c), 22)
        assert not _connects(c, _ip(a), 22)
    finally:
        driver.reconcile(lambda: [])
    assert not _connects(a, _ip(b), 22)


def test_cannot_reach_an_unlisted_host_port(
    pool: tuple[LocalDriver, list[Instance]], servers: tuple[_Server, _Server]
) -> None:
    _, (a, _b, _c) = pool
    _, unlisted = servers
    assert not _connects(a, _gateway(), unlisted.port)
    # Nor through the host's other addresses.
    for address in _host_addresses():
        assert not _connects(a, address, unlisted.port), address


def test_reaches_a_listed_host_port(
    pool: tuple[LocalDriver, list[Instance]], servers: tuple[_Server, _Server]
) -> None:
    _, (a, _b, _c) = pool
    listed, _ = servers
    assert _connects(a, _gateway(), listed.port)


def test_egress_reaches_only_what_is_allowed(
    pool: tuple[LocalDriver, list[Instance]], outside: str
) -> None:
    _, (a, _b, _c) = pool
    # egress lists OUTSIDE_IP:22; the same host's other port is refused.
    assert _connects(a, outside, 22)
    assert not _connects(a, outside, 2222)


def test_cannot_change_its_own_network(pool: tuple[LocalDriver, list[Instance]]) -> None:
    _, (a, _b, _c) = pool
    # No CAP_NET_ADMIN: no new route, no address of another node.
    assert _on(a, f"ip route add 10.214.92.0/24 via {_gateway()}").returncode != 0
    assert _on(a, "ip addr add 10.214.90.200/24 dev eth0").returncode != 0


def test_deleted_nodes_pairs_are_gone(pool: tuple[LocalDriver, list[Instance]]) -> None:
    driver, (a, b, _c) = pool
    policy = driver._policy(resolve=False)
    pairs = set_pairs([IPv4Address(_ip(a)), IPv4Address(_ip(b))])
    policy.update(add=pairs)
    policy.forget(IPv4Address(_ip(b)))
    assert not policy.pairs()


def test_repair_restores_removed_rules(pool: tuple[LocalDriver, list[Instance]]) -> None:
    driver, (a, b, _c) = pool
    table = driver._policy(resolve=False).table
    subprocess.run(["nft", "flush", "chain", "bridge", table, f"fwd-{BRIDGE}"], check=True)
    # Someone flushed our rules: the next leak sweep puts them back.
    driver.reconcile(lambda: [])
    assert not _connects(a, _ip(b), 22)


# ---- the host


@pytest.mark.parametrize(
    ("attempt", "command"),
    [
        ("mount a file system", "mount -t tmpfs none /mnt"),
        ("mknod a block device", "mknod /tmp/sda b 8 0"),
        ("load a kernel module", "modprobe dummy || insmod /nonexistent.ko"),
        ("write /proc/sys", "echo 1 > /proc/sys/net/ipv4/ip_forward"),
        ("write /sys", "echo 1 > /sys/kernel/mm/ksm/run"),
        ("read /proc/kcore", "head -c 1 /proc/kcore"),
        ("set the clock", "date -s '2000-01-01'"),
        ("take its interface down", "ip link set eth0 down"),
        ("reach the host's kernel log", "dmesg"),
    ],
)  # fmt: skip
def test_host_attempt_fails(
    pool: tuple[LocalDriver, list[Instance]], attempt: str, command: str
) -> None:
    _, (a, _b, _c) = pool
    done = _on(a, command)
    assert done.returncode != 0, f"{attempt} succeeded: {done.stdout}"


def test_a_file_capability_grants_nothing(pool: tuple[LocalDriver, list[Instance]]) -> None:
    _, (a, _b, _c) = pool
    # A copy of cat given CAP_SYS_ADMIN (bit 21) as a file capability, effective; the
    # node may set it (it keeps CAP_SETFCAP), but exec must not raise anything.
    grant = (
        "import os, shutil, struct\n"
        "shutil.copy('/bin/cat', '/root/capcat')\n"
        "os.setxattr('/root/capcat', 'security.capability',"
        " struct.pack('<IIIII', 0x02000001, 1 << 21, 0, 0, 0))\n"
    )
    done = _on(a, f"python3 -c {_quote(grant)} && /root/capcat /proc/self/status")
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    for kind in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert not int(status[kind], 16) & (1 << 21), (kind, status[kind])
    # What makes a file capability inert: exec cannot raise privileges at all. (The
    # bounding set stays the host's: bubblewrap running as root does not narrow it.)
    assert status["NoNewPrivs"].strip() == "1"


def test_cannot_read_the_hosts_state(pool: tuple[LocalDriver, list[Instance]]) -> None:
    driver, (a, _b, _c) = pool
    # The pool's own state dir (keys, records) is there on the host ...
    assert driver.state_dir.is_dir()
    # ... and not in the node, whose root is the image.
    assert _on(a, f"ls {driver.state_dir}").returncode != 0


def test_cannot_signal_or_trace_a_host_process(pool: tuple[LocalDriver, list[Instance]]) -> None:
    _, (a, _b, _c) = pool
    # The node has its own PID namespace: the host's processes are not there to touch.
    listing = _on(a, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "-m pytest" not in listing, listing
    assert _on(a, f"kill -0 {os.getpid()} && echo reached").stdout.strip() != "reached"


# ---- a namespace standing for "the internet": only through the host's forwarding


@pytest.fixture(scope="module")
def outside() -> Iterator[str]:
    host_end = "fpsecout0"
    batch = (
        f"netns add {OUTSIDE_NS}\n"
        f"link add {host_end} type veth peer name eth0 netns {OUTSIDE_NS}\n"
        f"addr add {HOST_OUTSIDE_IP}/24 dev {host_end}\n"
        f"link set {host_end} up\n"
    )
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    inside = f"addr add {OUTSIDE_IP}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
    subprocess.run(["ip", "-n", OUTSIDE_NS, "-batch", "-"], input=inside, text=True, check=True)
    listener = subprocess.Popen(
        ["ip", "netns", "exec", OUTSIDE_NS, "python3", "-c",
         "import selectors,socket\nsel=selectors.DefaultSelector()\n"
         "for port in (22, 2222):\n"
         "    s=socket.socket(); s.bind(('0.0.0.0', port)); s.listen(); sel.register(s, 1)\n"
         "while True:\n"
         "    for key, _ in sel.select(): key.fileobj.accept()[0].close()"],
    )  # fmt: skip
    try:
        yield OUTSIDE_IP
    finally:
        listener.kill()
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["ip", "link", "del", host_end], check=True)
        subprocess.run(["ip", "netns", "del", OUTSIDE_NS], check=False)


def _host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address = fields[3].split("/")[0]
        if fields[1] != BRIDGE and not address.startswith("127."):
            found.append(address)
    return found


def _banner_from_outside(host: str, port: int) -> str:
    """What a client on another machine (the outside namespace) reads at host:port."""
    probe = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(({host!r}, {port}), timeout=3)\n"
        "    print(s.recv(64).decode(errors='replace'))\n"
        "except OSError as exc:\n"
        "    print('refused', exc)\n"
    )
    return subprocess.run(
        ["ip", "netns", "exec", OUTSIDE_NS, "python3", "-c", probe],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip


def test_a_published_node_is_reached_from_another_machine(
    pool: tuple[LocalDriver, list[Instance]],
) -> None:
    _, (a, b, _c) = pool
    assert a.access is not None and b.access is not None
    assert a.access.public_host == HOST_OUTSIDE_IP
    assert a.access.public_port != b.access.public_port
    for node in (a, b):
        assert node.access is not None and node.access.public_port is not None
        assert _banner_from_outside(HOST_OUTSIDE_IP, node.access.public_port).startswith("SSH-2.0")
    # The host key a remote client pins is the node's own.
    host_key = _on(a, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    assert list(a.access.host_keys) == [" ".join(host_key)]
    # A port of the range with no node behind it reaches nothing.
    assert "refused" in _banner_from_outside(HOST_OUTSIDE_IP, 41999)


def test_a_deleted_nodes_published_port_is_gone(
    pool: tuple[LocalDriver, list[Instance]], image_build_dir: Path
) -> None:
    driver, _ = pool
    spec = NodeSpec(9, driver.cluster, "debian", "node-9", "b", (image_build_dir / "rootfs",))
    node = driver.create(spec).wait(60)
    assert node.access is not None and node.access.public_port is not None
    port = node.access.public_port
    assert port in driver._policy(resolve=False).published_ports()
    driver.delete(node.external_id).wait(60)
    assert port not in driver._policy(resolve=False).published_ports()
    assert "refused" in _banner_from_outside(HOST_OUTSIDE_IP, port)


def test_the_outside_namespace_answers_from_the_host(outside: str) -> None:
    # The refusals above mean something only if both ports answer at all.
    for port in (22, 2222):
        with socket.create_connection((outside, port), timeout=2):
            pass
