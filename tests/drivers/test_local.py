"""The local driver against the real kernel: overlay mounts, namespaces, bridge, sshd.

Each test uses its own cluster id and state dir; the module has its own bridge and
subnet, so a pool running on the same host is never touched. Finalizers delete every
instance of the test's cluster, even when the test failed half way.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

import freshpool.drivers.local.network as network
from freshpool.config import LocalNetwork, Provider
from freshpool.drivers import ssh
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    Operation,
    OutOfSpace,
    SshAccess,
    StepOperation,
    Tags,
    load_driver,
)
from freshpool.drivers.host import mounts, processes, tools
from freshpool.drivers.host.processes import MARK_CLUSTER, MARK_NODE
from freshpool.drivers.local import LocalDriver

SUBNET = "10.214.77.0/24"
BRIDGE = "fp-test-local"
OUTBOUND_SUBNET = "10.214.78.0/24"
OUTBOUND_BRIDGE = "fp-test-out"
TEARDOWN_SUBNET = "10.214.79.0/24"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the local driver needs root")


def _provider(**overrides: object) -> Provider:
    settings: dict[str, object] = {
        "name": "test-local",
        "network": LocalNetwork(subnet=SUBNET, bridge=BRIDGE),
        "boot_timeout": 20.0,
        "delete_timeout": 20.0,
        "max_nodes": 50,
    }
    settings.update(overrides)
    return Provider.model_validate(settings)


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    provider = _provider()
    yield provider
    # Every test has removed its nodes by now; the bridge goes last.
    LocalDriver(provider, "cleanup", Path("/nonexistent")).remove_network(force=True)


def _purge(driver: LocalDriver) -> None:
    """Delete every instance of the driver's cluster, as a freshly started launcher would."""
    fresh = LocalDriver(driver.provider, driver.cluster, driver.state_dir)
    for instance in fresh.list_instances():
        fresh.delete(instance.external_id).wait(60)
    left = fresh.list_instances()
    assert not left, f"left behind: {left}"
    # The bridge goes once no node of any test is on it, and this cluster's tables with it.
    fresh.teardown()


@pytest.fixture
def driver(provider: Provider, tmp_path: Path) -> Iterator[LocalDriver]:
    driver = LocalDriver(provider, f"t{uuid.uuid4().hex[:10]}", tmp_path / "state")
    yield driver
    _purge(driver)


def _spec(
    driver: LocalDriver,
    node_id: int,
    layers: tuple[Path, ...],
    user: str = "root",
) -> NodeSpec:
    return NodeSpec(
        node_id=node_id,
        cluster=driver.cluster,
        label="debian",
        hostname=f"node-{node_id}",
        build_id="build-1",
        layers=layers,
        user=user,
    )


def _run(instance: Instance, command: str) -> str:
    assert instance.access is not None
    done = ssh.run(instance.access, command, timeout=30)
    assert done.returncode == 0, f"{command!r} failed: {done.stderr}"
    return done.stdout


def _mounted_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if f" {path}" in line]


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _marked(cluster: str, node_id: int | None = None) -> dict[int, dict[str, str]]:
    marks = {MARK_CLUSTER: cluster}
    if node_id is not None:
        marks[MARK_NODE] = str(node_id)
    return processes.marked_processes(marks)


def _kill_node(driver: LocalDriver, instance: Instance) -> None:
    """Kill a node's processes by hand, as a crash or the OOM killer would."""
    assert instance.tags is not None
    marks = {MARK_CLUSTER: driver.cluster, MARK_NODE: str(instance.tags.node_id)}
    pids = processes.node_processes(network.netns_file(instance.external_id), marks)
    assert pids
    processes.kill(pids)
    deadline = time.monotonic() + 10
    while any(processes.start_time(pid) is not None for pid in pids):
        assert time.monotonic() < deadline, "killed processes did not die"
        time.sleep(0.01)


def _assert_gone(driver: LocalDriver, external_id: str, veth: str | None = None) -> None:
    node_dir = driver.nodes_dir / external_id
    assert not node_dir.exists()
    assert not _mounted_under(node_dir)
    assert external_id not in _netns().split()
    assert driver.node_id_of(external_id) is not None
    assert not _marked(driver.cluster, driver.node_id_of(external_id))
    if veth is not None:
        assert not network.link_exists(veth)


def _drive(operations: Sequence[Operation[Any]], timeout: float = 60.0) -> None:
    """Advance many operations from one thread, the way the launcher does."""
    deadline = time.monotonic() + timeout
    while not all(op.done for op in operations):
        assert time.monotonic() < deadline, "operations did not finish"
        now = time.monotonic()
        for op in operations:
            if not op.done and now >= op.not_before:
                op.advance()
        pending = [op.not_before for op in operations if not op.done]
        if pending:
            time.sleep(max(0.0, min(min(pending) - time.monotonic(), 0.01)))


# ---- host checks


def test_check_passes_here(driver: LocalDriver) -> None:
    driver.check()


@pytest.mark.parametrize(("missing", "package"), [("bwrap", "bubblewrap"), ("ssh", "openssh")])
def test_check_names_missing_tool_and_package(
    driver: LocalDriver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    missing: str,
    package: str,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bwrap", "ip", "nsenter", "ssh-keygen", "ssh"):
        found = tools.find_tool(name)
        if name != missing and found:
            (bin_dir / name).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(DriverUnavailable) as raised:
        driver.check()
    assert f"{missing} (apt-get install {package}" in str(raised.value)


def test_check_refuses_non_root(driver: LocalDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DriverUnavailable, match="must run as root"):
        driver.check()


def test_loaded_by_entry_point(provider: Provider, tmp_path: Path) -> None:
    driver = load_driver(provider, "tloader", tmp_path)
    assert isinstance(driver, LocalDriver)
    assert driver.nodes_dir == (tmp_path / "providers" / provider.name / "nodes").resolve()


def test_bad_cluster_id_is_refused(provider: Provider, tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="cluster id"):
        LocalDriver(provider, "a/b", tmp_path)


# ---- create, use, delete


def test_create_runs_commands_over_ssh(driver: LocalDriver, image_rootfs: Path) -> None:
    spec = _spec(driver, 1, (image_rootfs,))
    instance = driver.create(spec).wait(60)

    assert instance.external_id == driver.external_id_for(spec.tags) == f"fp-{driver.cluster}-1"
    assert instance.tags == Tags(driver.cluster, 1, "build-1")
    assert instance.alive
    access = instance.access
    assert access is not None
    assert IPv4Address(access.host) in IPv4Network(SUBNET)
    assert access.host == instance.details["ip"]
    assert (access.port, access.user) == (22, "root")
    assert os.stat(access.key_path).st_mode & 0o777 == 0o600
    pinned = Path(access.known_hosts_path).read_text().split()
    assert pinned[0] == access.host and pinned[1] == "ssh-ed25519"
    # The image's baked host key is never the one that answers.
    baked = [p.read_text().split()[1] for p in (image_rootfs / "etc/ssh").glob("ssh_host_*.pub")]
    assert pinned[2] not in baked

    assert _run(instance, "hostname").strip() == "node-1"
    assert _run(instance, "id -u").strip() == "0"
    # apt needs a sticky, world-writable /tmp.
    assert _run(instance, "stat -c %a /tmp").strip() == "1777"
    assert _run(instance, "ls /run/sshd && echo ok").strip().endswith("ok")
    assert "node-1" in _run(instance, "cat /etc/hosts")

    [listed] = driver.list_instances()
    assert listed.external_id == instance.external_id and listed.alive
    assert listed.access == access


def test_nodes_are_isolated(driver: LocalDriver, image_rootfs: Path) -> None:
    ops = [driver.create(_spec(driver, n, (image_rootfs,))) for n in (1, 2)]
    _drive(ops)
    a, b = (op.wait() for op in ops)
    assert a.access is not None and b.access is not None
    assert a.access.host != b.access.host

    _run(a, "echo secret > /root/only-in-a; echo tmp > /tmp/only-in-a")
    assert _run(b, "ls /root/only-in-a /tmp/only-in-a 2>/dev/null; true").strip() == ""
    assert not (image_rootfs / "root/only-in-a").exists()
    assert not Path("/tmp/only-in-a").exists()
    # The write went to A's own upper layer, nowhere else.
    assert (driver.nodes_dir / a.external_id / "rw/upper/root/only-in-a").exists()

    assert _run(a, "hostname").strip() == "node-1"
    assert _run(b, "hostname").strip() == "node-2"

    # Own PID namespace: bwrap is pid 1, and only the node's few processes are visible.
    assert _run(a, "tr '\\0' ' ' < /proc/1/cmdline").startswith("/usr/bin/bwrap")
    pids = _run(a, "ls /proc | grep -c '^[0-9]'")
    assert int(pids) < 10, pids
    # Own network namespace: lo and eth0 only, and no way off the subnet.
    devices = _run(a, "tail -n +3 /proc/net/dev | cut -d: -f1").split()
    assert sorted(devices) == ["eth0", "lo"]
    routes = _run(a, "tail -n +2 /proc/net/route").split("\n")
    assert not any(line.split()[1:2] == ["00000000"] for line in routes if line.strip())

    # A's key does not open B: each node trusts only its own client key.
    a_key = Path(a.access.key_path).with_suffix(".pub").read_text().split()[1]
    b_authorized = _run(b, "cat /root/.ssh/authorized_keys")
    assert a_key not in b_authorized
    crossed = ssh.run(
        SshAccess(b.access.host, 22, "root", a.access.key_path, b.access.known_hosts_path),
        "true",
    )
    assert crossed.returncode == 255 and "Permission denied" in crossed.stderr
    # And from inside A, B does not even answer: two ready nodes share no node set.
    from_a = _run(
        a,
        f"ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=2"
        f" root@{b.access.host} true 2>&1; echo status=$?",
    )
    assert "status=255" in from_a and "timed out" in from_a

    # Root in a node lacks the capabilities that reach past it (mounting, modules, routes).
    denied = _run(a, "mount -t tmpfs x /mnt 2>&1; echo status=$?")
    assert "status=0" not in denied


def test_delete_removes_everything(driver: LocalDriver, image_rootfs: Path) -> None:
    instance = driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
    node_dir = driver.nodes_dir / instance.external_id
    veth = instance.details["veth"]
    pid = instance.details["pid"]
    assert _mounted_under(node_dir)
    assert instance.external_id in _netns().split()
    assert network.link_master(veth) == BRIDGE
    assert _marked(driver.cluster)

    driver.delete(instance.external_id).wait(60)

    _assert_gone(driver, instance.external_id, veth)
    assert not processes.is_alive(pid, None)
    assert driver.list_instances() == []
    # Idempotent: again, and for an id that never existed.
    driver.delete(instance.external_id).wait(60)
    driver.delete(f"fp-{driver.cluster}-999").wait(60)
    # Not ours: refused rather than guessed at.
    with pytest.raises(DriverError):
        driver.delete("fp-other-cluster/x").wait(5)


def test_non_root_user_and_stacked_layers(
    driver: LocalDriver, image_rootfs: Path, tmp_path: Path
) -> None:
    # A layer on top of the image adds a user the way `useradd` does: locked password.
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    for name, extra in (
        ("passwd", "ci:x:1000:1000::/home/ci:/bin/bash\n"),
        ("group", "ci:x:1000:\n"),
        ("shadow", "ci:!:20000:0:99999:7:::\n"),
    ):
        (layer / "etc" / name).write_text((image_rootfs / "etc" / name).read_text() + extra)
    (layer / "etc/shadow").chmod(0o640)
    (layer / "etc/motd-from-layer").write_text("top layer\n")

    instance = driver.create(_spec(driver, 1, (layer, image_rootfs), user="ci")).wait(60)

    assert _run(instance, "id -un").strip() == "ci"
    assert _run(instance, "cat /etc/motd-from-layer").strip() == "top layer"
    assert _run(instance, "stat -c %U:%a ~/.ssh ~/.ssh/authorized_keys").split() == [
        "ci:700",
        "ci:600",
    ]
    # The layers themselves are read-only to the node.
    assert "ci:!:" in (layer / "etc/shadow").read_text()


def test_many_creates_interleaved(driver: LocalDriver, image_rootfs: Path) -> None:
    count = 8
    started = time.monotonic()
    ops = [driver.create(_spec(driver, n, (image_rootfs,))) for n in range(1, count + 1)]
    _drive(ops)
    elapsed = time.monotonic() - started
    instances = [op.wait() for op in ops]
    print(f"\n{count} interleaved creates ready after {elapsed * 1000:.0f} ms")
    assert len({i.details["ip"] for i in instances}) == count
    for instance in instances:
        assert _run(instance, "hostname").strip() == instance.details["hostname"]
    assert sum(i.alive for i in driver.list_instances()) == count
    _drive([driver.delete(i.external_id) for i in instances])
    assert driver.list_instances() == []


def test_node_under_construction_is_not_a_leftover(driver: LocalDriver, image_rootfs: Path) -> None:
    operation = driver.create(_spec(driver, 1, (image_rootfs,)))
    operation.advance()  # files and overlay made, network under way
    assert not operation.done
    [listed] = driver.list_instances()
    assert listed.alive and listed.details["creating"]
    operation.wait(60)
    [listed] = driver.list_instances()
    assert listed.alive and not listed.details["creating"]


# ---- finding nodes again


def test_new_driver_adopts_running_nodes(driver: LocalDriver, image_rootfs: Path) -> None:
    first = driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)

    # The launcher "crashed": a new driver on the same state dir knows nothing else.
    again = LocalDriver(driver.provider, driver.cluster, driver.state_dir)
    [found] = again.list_instances()
    assert found.external_id == first.external_id and found.alive
    assert found.tags == first.tags and found.access == first.access
    assert _run(found, "hostname").strip() == "node-1"

    # Its address stays taken for new nodes.
    second = again.create(_spec(again, 2, (image_rootfs,))).wait(60)
    assert second.details["ip"] != first.details["ip"]

    again.delete(first.external_id).wait(60)
    again.delete(second.external_id).wait(60)
    assert again.list_instances() == []


def test_killed_node_is_a_leftover_until_deleted(driver: LocalDriver, image_rootfs: Path) -> None:
    instance = driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
    _kill_node(driver, instance)

    [found] = LocalDriver(driver.provider, driver.cluster, driver.state_dir).list_instances()
    assert found.external_id == instance.external_id
    assert not found.alive
    assert "process gone" in found.details["problems"]

    driver.delete(instance.external_id).wait(60)
    _assert_gone(driver, instance.external_id, instance.details["veth"])


def test_leftovers_are_found_from_any_trace(driver: LocalDriver, image_rootfs: Path) -> None:
    one, two, three = (driver.create(_spec(driver, n, (image_rootfs,))).wait(60) for n in (1, 2, 3))
    # One loses its runtime record (a crash while writing it); it still runs.
    (driver.nodes_dir / one.external_id / "node.json").unlink()
    # Two: as after a host reboot, only the node dir remains.
    _kill_node(driver, two)
    mounts.unmount(driver.nodes_dir / two.external_id / "root")
    StepOperation(network.remove_node_network(two.external_id, two.details["veth"])).wait(10)
    # Three: its directory was removed by hand; the netns and veth remain.
    _kill_node(driver, three)
    mounts.unmount(driver.nodes_dir / three.external_id / "root")
    subprocess.run(["rm", "-rf", str(driver.nodes_dir / three.external_id)], check=True)

    fresh = LocalDriver(driver.provider, driver.cluster, driver.state_dir)
    found = {i.external_id: i for i in fresh.list_instances()}
    assert set(found) == {one.external_id, two.external_id, three.external_id}
    assert not any(i.alive for i in found.values())
    assert "no runtime record" in found[one.external_id].details["problems"]
    assert {"process gone", "root not mounted", "netns gone"} <= set(
        found[two.external_id].details["problems"]
    )
    assert "no runtime record" in found[three.external_id].details["problems"]

    # Delete works from the external id alone.
    for instance in (one, two, three):
        fresh.delete(instance.external_id).wait(60)
        _assert_gone(fresh, instance.external_id, instance.details["veth"])
    assert fresh.list_instances() == []


# ---- failures leave nothing behind


def _fill(directory: Path, leave_bytes: int) -> None:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    if leave_bytes:
        with open(filler, "r+b") as out:
            out.truncate(max(0, filler.stat().st_size - leave_bytes))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# Measured on kernel 6.18: 0 fails writing the record, 4 and 16 in ssh-keygen, 28 while
# installing access; about 40 KiB is enough for a node.
@pytest.mark.parametrize("leave_kib", [0, 4, 16, 28])
def test_disk_full_gives_out_of_space_and_leaves_nothing(
    provider: Provider, small_disk: Path, image_rootfs: Path, leave_kib: int
) -> None:
    driver = LocalDriver(provider, f"t{uuid.uuid4().hex[:10]}", small_disk / "state")
    (small_disk / "state/nodes").mkdir(parents=True)
    # Past the up-front free-space check, so the real ENOSPC paths are taken.
    driver.min_free_bytes = 0
    _fill(small_disk, leave_kib * 1024)
    try:
        with pytest.raises(OutOfSpace, match=r"full|space"):
            driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
        _assert_gone(driver, f"fp-{driver.cluster}-1")
        assert driver.list_instances() == []
    finally:
        (small_disk / "filler").unlink()
        _purge(driver)


def test_low_disk_is_refused_up_front(
    provider: Provider, small_disk: Path, image_rootfs: Path
) -> None:
    driver = LocalDriver(provider, f"t{uuid.uuid4().hex[:10]}", small_disk / "state")
    with pytest.raises(OutOfSpace, match="MiB free"):
        driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
    assert driver.list_instances() == []
    assert not list((small_disk / "state/nodes").iterdir())


def _fake_sshd_layer(tmp_path: Path, script: str) -> Path:
    layer = tmp_path / "fake-sshd"
    (layer / "usr/sbin").mkdir(parents=True)
    sshd = layer / "usr/sbin/sshd"
    sshd.write_text(f"#!/bin/sh\n{script}\n")
    sshd.chmod(0o755)
    return layer


def test_node_that_dies_at_start_is_cleaned_up(
    driver: LocalDriver, image_rootfs: Path, tmp_path: Path
) -> None:
    layer = _fake_sshd_layer(tmp_path, "echo sshd is broken >&2; exit 3")
    with pytest.raises(DriverError, match="sshd is broken"):
        driver.create(_spec(driver, 1, (layer, image_rootfs))).wait(60)
    _assert_gone(driver, f"fp-{driver.cluster}-1")


def test_boot_timeout_kills_the_node(
    provider: Provider, tmp_path: Path, image_rootfs: Path
) -> None:
    driver = LocalDriver(
        provider.model_copy(update={"boot_timeout": 0.5}),
        f"t{uuid.uuid4().hex[:10]}",
        tmp_path / "state",
    )
    layer = _fake_sshd_layer(tmp_path, "exec sleep 600")
    try:
        with pytest.raises(TimeoutError, match="no SSH answer"):
            driver.create(_spec(driver, 1, (layer, image_rootfs))).wait(60)
        _assert_gone(driver, f"fp-{driver.cluster}-1")
    finally:
        _purge(driver)


def test_image_without_sshd_is_refused(driver: LocalDriver, tmp_path: Path) -> None:
    empty = tmp_path / "empty-image"
    empty.mkdir()
    with pytest.raises(DriverError, match="openssh-server"):
        driver.create(_spec(driver, 1, (empty,))).wait(60)
    _assert_gone(driver, f"fp-{driver.cluster}-1")


def test_existing_leftover_blocks_a_second_create(driver: LocalDriver, image_rootfs: Path) -> None:
    driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
    with pytest.raises(DriverError, match="already exists"):
        driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
    # The refusal did not harm the node that was there.
    [instance] = driver.list_instances()
    assert instance.alive


# ---- outbound


@pytest.fixture
def outbound_driver(tmp_path: Path) -> Iterator[LocalDriver]:
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    before = forward.read_text()
    provider = _provider(
        name="test-out",
        network=LocalNetwork(subnet=OUTBOUND_SUBNET, bridge=OUTBOUND_BRIDGE, outbound=True),
    )
    driver = LocalDriver(provider, f"t{uuid.uuid4().hex[:10]}", tmp_path / "state")
    try:
        yield driver
    finally:
        _purge(driver)
        driver.remove_network(force=True)
        forward.write_text(before)


def _nat_rule_exists() -> bool:
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    return any(OUTBOUND_SUBNET in line and "masquerade" in line for line in rules.splitlines())


def test_outbound_sets_route_and_nat(outbound_driver: LocalDriver, image_rootfs: Path) -> None:
    # Only the configuration is checked; no packet is sent off this machine.
    instance = outbound_driver.create(_spec(outbound_driver, 1, (image_rootfs,))).wait(60)
    gateway = IPv4Network(OUTBOUND_SUBNET).network_address + 1
    routes = _run(instance, "tail -n +2 /proc/net/route").splitlines()
    default = [line.split() for line in routes if line.split()[1] == "00000000"]
    assert default, routes
    assert IPv4Address(bytes(reversed(bytes.fromhex(default[0][2])))) == gateway
    assert _nat_rule_exists()
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"

    outbound_driver.delete(instance.external_id).wait(60)
    outbound_driver.remove_network()
    assert not _nat_rule_exists()
    assert not network.link_exists(OUTBOUND_BRIDGE)


def test_node_outlives_the_launcher_process(
    driver: LocalDriver, image_rootfs: Path, tmp_path: Path
) -> None:
    # A separate launcher process creates the node and exits.
    script = f"""
import sys
from pathlib import Path
from freshpool.config import Provider
from freshpool.drivers.base import NodeSpec
from freshpool.drivers.local import LocalDriver
provider = Provider.model_validate_json({driver.provider.model_dump_json(by_alias=True)!r})
driver = LocalDriver(provider, {driver.cluster!r}, Path({str(driver.state_dir)!r}))
spec = NodeSpec(1, {driver.cluster!r}, "debian", "node-1", "b", (Path({str(image_rootfs)!r}),))
print(driver.create(spec).wait(60).external_id)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    [instance] = driver.list_instances()
    assert instance.external_id == done.stdout.strip()
    assert instance.alive
    assert _run(instance, "hostname").strip() == "node-1"


def test_teardown_removes_only_an_idle_bridge(tmp_path: Path, image_rootfs: Path) -> None:
    provider = _provider(
        name="test-teardown", network=LocalNetwork(subnet=TEARDOWN_SUBNET, bridge="fp-test-td")
    )
    driver = LocalDriver(provider, f"t{uuid.uuid4().hex[:10]}", tmp_path / "state")
    try:
        instance = driver.create(_spec(driver, 1, (image_rootfs,))).wait(60)
        driver.teardown()
        assert network.link_exists("fp-test-td")
        assert _run(instance, "hostname").strip() == "node-1"
        driver.delete(instance.external_id).wait(60)
        driver.teardown()
        assert not network.link_exists("fp-test-td")
    finally:
        _purge(driver)
        driver.remove_network(force=True)


# ---- pure parts


def test_address_pool_round_robin_and_exhaustion() -> None:
    net = network.BridgeNetwork("fp-x", IPv4Network("10.9.9.0/28"), outbound=False)
    pool = network.AddressPool(net)
    # .0 is the network, .1 the bridge, .15 broadcast.
    assert pool.capacity == 13
    first = pool.allocate()
    assert first == IPv4Address("10.9.9.2")
    pool.release(first)
    # A freed address rests while others are free.
    assert pool.allocate() == IPv4Address("10.9.9.3")
    taken = [pool.allocate() for _ in range(12)]
    assert first in taken
    with pytest.raises(DriverError, match="no free address"):
        pool.allocate()


def test_bridge_name_fits_an_interface_name() -> None:
    short = network.bridge_name(_provider(name="lab", network=LocalNetwork()))
    assert short.startswith("fp-lab-") and len(short) <= 15
    assert network.bridge_name(_provider(name="x" * 31, network=LocalNetwork())).startswith(
        "fp-xxxxxx-"
    )
    # Same provider name, other subnet (another pool on this host): another bridge.
    other = network.bridge_name(_provider(name="lab", network=LocalNetwork(subnet="10.99.0.0/24")))
    assert other != short and len(other) <= 15
    # A configured name wins.
    assert network.bridge_name(_provider(name="lab")) == BRIDGE
    assert network.veth_name(BRIDGE, "fp-cluster-123") != network.veth_name(
        BRIDGE, "fp-cluster-124"
    )
    assert len(network.veth_name(BRIDGE, "fp-" + "x" * 64 + "-1")) == 15
    # The policy matches a bridge's node ports by this prefix: others never share it.
    assert network.veth_name(BRIDGE, "fp-c-1").startswith(network.port_prefix(BRIDGE))
    assert not network.veth_name("fp-other", "fp-c-1").startswith(network.port_prefix(BRIDGE))
