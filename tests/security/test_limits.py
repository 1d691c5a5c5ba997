"""A job that tries to take more than its node's share: memory, processes, disk, CPU.

Real nodes with limits on this host's cgroups (v1 controllers here; the v2 code is
checked at the file level below, against a tree shaped like the kernel's, because
this host's cgroup2 mount has no controllers to hand out). Each attempt must stop
at the node's limit and leave the host and the launcher untouched.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.config import LocalNetwork, NodeLimits, Provider
from freshpool.drivers import ssh
from freshpool.drivers.base import DriverError, DriverUnavailable, Instance, NodeSpec
from freshpool.drivers.host import cgroups, mounts
from freshpool.drivers.local import LocalDriver
from freshpool.drivers.local.limits import OUT_OF_MEMORY, NodeLimiter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real nodes need root")

LIMITS = NodeLimits.model_validate({"cpus": 0.5, "memory": "96MiB", "pids": 64, "disk": "64MiB"})


@pytest.fixture(scope="module")
def limited(
    image_build_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalDriver, Instance]]:
    provider = Provider.model_validate(
        {
            "name": "test-limits",
            "network": LocalNetwork(subnet="10.214.92.0/24", bridge="fp-test-lim"),
            "boot_timeout": 20.0,
            "delete_timeout": 20.0,
        }
    )
    driver = LocalDriver(provider, f"l{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("lim"))
    if driver.limiter.hierarchy is None:
        pytest.fail("this host has no cgroup controllers: the limits cannot be tried")
    spec = NodeSpec(
        1, driver.cluster, "debian", "node-1", "b", (image_build_dir / "rootfs",), limits=LIMITS
    )
    try:
        yield driver, driver.create(spec).wait(60)
    finally:
        for instance in driver.list_instances():
            driver.delete(instance.external_id).wait(60)
        driver.remove_network(force=True)


def _on(instance: Instance, command: str) -> subprocess.CompletedProcess[str]:
    assert instance.access is not None
    return ssh.run(instance.access, command, timeout=60)


def test_memory_past_the_limit_is_killed_and_reported(
    limited: tuple[LocalDriver, Instance],
) -> None:
    driver, node = limited
    assert driver.faults(node.external_id) == []
    # tail keeps a line with no newline in memory: 300 MiB of it, past the 96 MiB limit.
    done = _on(node, "head -c 300M /dev/zero | tail > /dev/null; echo status=$?")
    assert "status=0" not in done.stdout, done
    faults = driver.faults(node.external_id)
    assert faults and faults[0].startswith(OUT_OF_MEMORY), faults
    # The node itself lives on: sshd was not the process the kernel picked.
    assert _on(node, "echo alive").stdout.strip() == "alive"


def test_fork_bomb_stops_at_the_pids_limit(limited: tuple[LocalDriver, Instance]) -> None:
    _, node = limited
    bomb = (
        "import os, signal, time\n"
        "kids = []\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        kids.append(pid)\n"
        "    print(len(kids), 0)\n"
        "except OSError as exc:\n"
        "    print(len(kids), exc.errno)\n"
        "for kid in kids:\n"
        "    os.kill(kid, signal.SIGKILL)\n"
    )
    done = _on(node, "python3 -c '" + bomb + "'")
    forked, errno = (int(x) for x in done.stdout.split())
    assert errno == 11 and forked < 64, done  # EAGAIN, at the limit
    assert _on(node, "echo alive").stdout.strip() == "alive"


def test_filling_the_disk_gets_enospc_not_the_host(
    limited: tuple[LocalDriver, Instance],
) -> None:
    driver, node = limited
    done = _on(node, "dd if=/dev/zero of=/root/fill bs=1M count=200 2>&1; rm -f /root/fill")
    assert "No space left on device" in done.stdout, done
    image = driver.nodes_dir / node.external_id / "disk.img"
    # The host holds only the blocks the node wrote, never more than its disk.
    assert image.stat().st_blocks * 512 <= 64 * 2**20


def test_the_cpu_quota_is_half_a_cpu(limited: tuple[LocalDriver, Instance]) -> None:
    driver, node = limited
    hierarchy = driver.limiter.hierarchy
    assert hierarchy is not None
    cpu = hierarchy.bases["cpu"] / node.external_id
    if isinstance(hierarchy, cgroups.CgroupV2):
        assert (cpu / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50000
    # The node's first process is in its group, so everything it starts is too.
    procs = (hierarchy.bases["memory"] / node.external_id / "cgroup.procs").read_text().split()
    assert node.details["pid"] and str(node.details["pid"]) in procs


def test_a_deleted_node_leaves_no_group_mount_or_loop_device(
    limited: tuple[LocalDriver, Instance], image_build_dir: Path
) -> None:
    driver, _ = limited
    spec = NodeSpec(
        2, driver.cluster, "debian", "node-2", "b", (image_build_dir / "rootfs",), limits=LIMITS
    )
    node = driver.create(spec).wait(60)
    assert node.external_id in driver.limiter.groups()
    driver.delete(node.external_id).wait(60)
    assert node.external_id not in driver.limiter.groups()
    assert not mounts.mounts_under(driver.nodes_dir / node.external_id)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert node.external_id not in loops


def test_a_leftover_group_is_found_and_removed(limited: tuple[LocalDriver, Instance]) -> None:
    driver, _ = limited
    hierarchy = driver.limiter.hierarchy
    assert hierarchy is not None
    stray = f"fp-{driver.cluster}-99"
    hierarchy.create(stray, cgroups.Limits(pids=10))
    assert stray in {i.external_id for i in driver.list_instances()}
    driver.delete(stray).wait(30)
    assert stray not in driver.limiter.groups()


# ---- refusals: limits the host cannot give are errors that name them


def test_limits_without_cgroups_are_refused_by_name() -> None:
    with pytest.raises(DriverUnavailable, match=r"label x: limits memory, pids need cgroups"):
        NodeLimiter(None).check(
            NodeLimits.model_validate({"memory": "1GiB", "pids": 100}), "label x"
        )
    v1 = NodeLimiter(cgroups.CgroupV1({"pids": Path("/nowhere")}))
    with pytest.raises(DriverUnavailable, match=r"no cpu controller"):
        v1.check(NodeLimits(cpus=1), "label x")


def test_a_refused_cgroup_write_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    # pids' base is a file: making the node's pids group fails after memory's was made.
    (tmp_path / "pids").write_text("")
    hierarchy = cgroups.CgroupV1({"memory": tmp_path / "memory", "pids": tmp_path / "pids"})
    with pytest.raises(DriverError, match=r"cannot set up cgroup fp-c-1"):
        hierarchy.create("fp-c-1", cgroups.Limits(memory=2**27, pids=10))
    assert list((tmp_path / "memory").iterdir()) == []


def test_v2_writes_the_limits_and_enables_the_controllers(tmp_path: Path) -> None:
    # Emulated: a directory tree shaped like a cgroup2 mount (files the kernel would make).
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "cgroup.subtree_control").write_text("memory\n")
    base = mount / cgroups.BASE / "local"
    hierarchy = cgroups.CgroupV2(mount, "local", ["cpu", "memory", "pids"])
    base.mkdir(parents=True)
    for group in (mount / cgroups.BASE, base):
        (group / "cgroup.subtree_control").write_text("")
    procs = hierarchy.create("fp-c-1", cgroups.Limits(cpus=1.5, memory=2**28, pids=100))
    assert procs == [base / "fp-c-1" / "cgroup.procs"]
    assert (base / "fp-c-1" / "cpu.max").read_text() == "150000 100000"
    assert (base / "fp-c-1" / "memory.max").read_text() == str(2**28)
    assert (base / "fp-c-1" / "pids.max").read_text() == "100"
    for group in (mount, mount / cgroups.BASE, base):
        assert (group / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    (base / "fp-c-1" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert hierarchy.oom_kills("fp-c-1") == 1


def test_detect_prefers_v2_with_controllers_and_falls_back_to_v1(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("")
    info = tmp_path / "mountinfo"
    lines = [
        f"30 25 0:26 / {unified} rw,relatime shared:5 - cgroup2 cgroup2 rw",
        f"31 25 0:27 / {tmp_path}/memory rw,relatime shared:6 - cgroup cgroup rw,memory",
        f"32 25 0:28 / {tmp_path}/pids rw,relatime shared:7 - cgroup cgroup rw,pids",
        f"33 25 0:29 / {tmp_path}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
    ]
    info.write_text("\n".join(lines) + "\n")
    # The hybrid layout of this host: cgroup2 mounted, but the controllers are v1's.
    found = cgroups.detect("local", str(info))
    assert isinstance(found, cgroups.CgroupV1)
    assert found.controllers == {"cpu", "memory", "pids"}
    assert found.bases["cpu"] == tmp_path / "cpu,cpuacct" / cgroups.BASE / "local"
    # Pure v2 (most current distributions): the unified hierarchy has them all.
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    info.write_text(lines[0] + "\n")
    found = cgroups.detect("local", str(info))
    assert isinstance(found, cgroups.CgroupV2)
    assert found.controllers == {"cpu", "memory", "pids"}
    info.write_text("")
    assert cgroups.detect("local", str(info)) is None
