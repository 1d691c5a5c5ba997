"""The qemu driver against real QEMU: a Debian image with its own kernel boots as a VM
(TCG here), answers SSH on a loopback forward, runs a job, and leaves nothing behind.

VM boots under TCG are slow, so the default suite boots two; the round trip through
`image commit` and a second boot is marked slow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from freshpool.config import Config, ConfigError, Provider, parse
from freshpool.config import load as load_config
from freshpool.core.states import NodeState
from freshpool.drivers import ssh
from freshpool.drivers.base import (
    DriverError,
    ImageUpload,
    Instance,
    NodeSpec,
    StepOperation,
    load_driver,
)
from freshpool.drivers.host import processes, tools
from freshpool.drivers.host.processes import MARK_CLUSTER, MARK_NODE
from freshpool.drivers.qemu import QEMU, QEMU_OVERHEAD_MIB, QemuDriver
from freshpool.drivers.qemu.accel import cache_key, kvm_usable
from freshpool.drivers.qemu.vmbase import VmBase
from freshpool.launcher.vmcommit import CommitRefused, commit_node
from freshpool.store import Store

# The smallest image a VM boots: the kernel and initramfs come from linux-image-amd64,
# the init brings up the network with iproute2.

T = TypeVar("T")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the qemu driver needs root"),
    pytest.mark.skipif(
        tools.find_tool(QEMU) is None, reason="apt-get install qemu-system-x86 qemu-utils"
    ),
]


# A host service listed in network.host-ports: VMs reach it at 10.0.2.100:LISTED_PORT.
LISTED_PORT = 47123


def _provider(**qemu: object) -> Provider:
    return Provider.model_validate(
        {
            "name": "vms",
            "driver": "qemu",
            "network": {"host-ports": [LISTED_PORT]},
            # Generous: TCG boots slow down a lot while other tests load both cores.
            "boot_timeout": 240.0,
            "delete_timeout": 60.0,
            "qemu": {"memory": 512, "powerdown-timeout": 20, "disk-size": 2, **qemu},
        }
    )


@pytest.fixture(scope="module")
def uploaded(vm_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A provider state dir holding the image's VM base, and the base's external id."""
    state = tmp_path_factory.mktemp("qemu") / "providers" / "vms"
    driver = QemuDriver(_provider(), "upload", state)
    upload = ImageUpload("vm-build-1", "debian-vm", (vm_image / "rootfs",))
    return state, driver.upload_image(upload).wait(600)


def _purge(driver: QemuDriver) -> None:
    fresh = QemuDriver(driver.provider, driver.cluster, driver.state_dir)
    for instance in fresh.list_instances():
        fresh.delete(instance.external_id).wait(120)
    assert not fresh.list_instances()


@pytest.fixture
def driver(uploaded: tuple[Path, str]) -> Iterator[QemuDriver]:
    state, _ = uploaded
    driver = QemuDriver(_provider(), f"t{uuid.uuid4().hex[:10]}", state)
    yield driver
    _purge(driver)


def _spec(driver: QemuDriver, node_id: int, base: str, build_id: str = "vm-build-1") -> NodeSpec:
    return NodeSpec(
        node_id=node_id,
        cluster=driver.cluster,
        label="debian-vm",
        hostname=f"vm-{node_id}",
        build_id=build_id,
        layers=(),
        image_external_id=base,
    )


def _run(instance: Instance, command: str) -> str:
    assert instance.access is not None
    done = ssh.run(instance.access, command, timeout=120)
    assert done.returncode == 0, f"{command!r} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def _steps(steps: Generator[float, None, T]) -> T:
    """Drive a driver's steps to their result, as an operation would."""
    return StepOperation(steps).wait(120)


def _qemu_pids(cluster: str, node_id: int) -> set[int]:
    marks = {MARK_CLUSTER: cluster, MARK_NODE: str(node_id)}
    return set(processes.marked_processes(marks, (QEMU[:15],)))


# ------------------------------------------------------------------ no VM boots


def test_base_is_a_bootable_disk_without_secrets(uploaded: tuple[Path, str]) -> None:
    _, external_id = uploaded
    base = VmBase.load(Path(external_id))
    assert base is not None and base.kernel_version
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(base.disk)], capture_output=True, text=True
    )
    assert '"format": "qcow2"' in info.stdout
    assert '"backing-filename"' not in info.stdout
    assert base.kernel.stat().st_size > 1_000_000 and base.initrd.stat().st_size > 1_000_000


def test_an_image_without_a_kernel_is_refused_by_name(image_rootfs: Path, tmp_path: Path) -> None:
    driver = QemuDriver(_provider(), "nokernel", tmp_path / "state")
    upload = ImageUpload("plain-1", "debian-bookworm", (image_rootfs,))
    with pytest.raises(DriverError, match="linux-image-amd64"):
        driver.upload_image(upload).wait(120)
    assert not list((tmp_path / "state" / "images").iterdir()), "a partial base was left"


def test_probe_decides_and_is_cached(uploaded: tuple[Path, str], tmp_path: Path) -> None:
    _, external_id = uploaded
    base = VmBase.load(Path(external_id))
    assert base is not None
    driver = QemuDriver(_provider(), "probe", tmp_path / "state")
    first = _steps(driver._accel(base))
    assert first.accel in ("kvm", "tcg")
    assert first.probed or kvm_usable() is not None
    if Path("/sys/module/kvm_pvm").exists():
        # This machine: /dev/kvm is PVM, which a stock Debian kernel cannot use.
        assert first.accel == "tcg", first
    again = _steps(driver._accel(base))
    assert again.accel == first.accel
    if first.probed:
        assert not again.probed and again.reason.startswith("cached:")
    # Another kernel (or QEMU, or a host reboot) is probed afresh.
    qemu = tools.tool(QEMU)
    assert cache_key(qemu, base.kernel_digest) != cache_key(qemu, "other")
    forced = QemuDriver(_provider(accel="tcg"), "probe", tmp_path / "state")
    assert _steps(forced._accel(base)).accel == "tcg"


def test_vm_sizes_and_memory_limit(uploaded: tuple[Path, str], tmp_path: Path) -> None:
    config = parse(
        """
providers:
  - name: vms
    driver: qemu
    qemu: {vcpus: 2, memory: 768, sizes: {big: {vcpus: 4, memory: 4096}}}
labels: [{name: small, image: x}, {name: big, image: x}]
images: [{name: x}]
"""
    )
    settings = config.providers[0].qemu
    assert (settings.size_of("small").vcpus, settings.size_of("small").memory) == (2, 768)
    assert (settings.size_of("big").vcpus, settings.size_of("big").memory) == (4, 4096)
    with pytest.raises(ConfigError, match="no label named 'nope'"):
        parse(
            "providers: [{name: v, driver: qemu, qemu: {sizes: {nope: {memory: 512}}}}]\n"
            "labels: [{name: a, image: x}]\nimages: [{name: x}]\n"
        )
    # A tiny share of host RAM: the quota drops to what fits, and a create is refused
    # before anything is made.
    _, base = uploaded
    tight = QemuDriver(_provider(**{"memory-share": 0.01}), "tight", tmp_path / "state")
    assert tight.limits().max_nodes == tight.memory_budget_mib() // (512 + QEMU_OVERHEAD_MIB)
    if tight.limits().max_nodes == 0:
        with pytest.raises(DriverError, match="not enough host memory"):
            tight.create(_spec(tight, 1, base)).wait(30)
        assert not tight.list_instances()


# ------------------------------------------------------------------- VM boots


def test_boot_run_a_job_and_delete(driver: QemuDriver, uploaded: tuple[Path, str]) -> None:
    _, base = uploaded
    instance = driver.create(_spec(driver, 1, base)).wait(300)
    assert instance.alive and instance.access is not None
    assert instance.access.host == "127.0.0.1"
    vm_base = VmBase.load(Path(base))
    assert vm_base is not None
    expected = _steps(driver._accel(vm_base))
    assert instance.details["accel"] == expected.accel
    node_dir = Path(instance.details["node_dir"])
    overlay = node_dir / "overlay.qcow2"
    # A thin overlay on the shared base, and no host private key left on the host.
    info = subprocess.run(["qemu-img", "info", "-U", str(overlay)], capture_output=True, text=True)
    assert f"backing file: {Path(base) / 'disk.qcow2'}" in info.stdout
    assert not (node_dir / "ssh_host_ed25519_key").exists()
    with tarfile.open(node_dir / "config.tar") as drive:
        assert "ssh_host_ed25519_key" in drive.getnames()

    out = _run(instance, "hostname; nproc; cat /proc/meminfo | head -1; id -un")
    assert out.split()[0] == "vm-1"
    assert out.split()[1] == "1"
    assert int(out.split()[3]) > 300_000  # kB: the label's 512 MiB, less the kernel's share
    # A job: build something on the node's own disk, as a CI step would.
    assert _run(instance, "echo 'int main(){return 0;}' > /tmp/a.c && wc -c < /tmp/a.c").strip()
    # Host-only: the guest has no route out, not even to the host's own services ...
    reach = ssh.run(
        instance.access, "timeout 5 bash -c 'echo > /dev/tcp/10.0.2.2/22' && echo reached"
    )
    assert "reached" not in reach.stdout
    # ... except a listed host port, forwarded to the host's loopback.
    with socket.create_server(("127.0.0.1", LISTED_PORT)) as listed:
        listed.settimeout(30)
        reach = ssh.run(
            instance.access,
            f"timeout 10 bash -c 'echo hello > /dev/tcp/10.0.2.100/{LISTED_PORT}' && echo reached",
        )
        assert "reached" in reach.stdout, reach.stderr
        conn, _ = listed.accept()
        with conn:
            assert conn.recv(16).startswith(b"hello")
    assert instance.access.host_keys and instance.access.host_keys[0].startswith("ssh-ed25519")

    pids = _qemu_pids(driver.cluster, 1)
    assert pids, "no QEMU process carries the node's marks"
    driver.delete(instance.external_id).wait(120)
    assert not any(processes.start_time(p) is not None for p in pids), "QEMU still runs"
    assert not overlay.exists() and not node_dir.exists()
    assert not driver.list_instances()
    # Deleting what is gone succeeds.
    driver.delete(instance.external_id).wait(30)


def test_a_new_driver_finds_and_removes_strays(
    driver: QemuDriver, uploaded: tuple[Path, str]
) -> None:
    _, base = uploaded
    instance = driver.create(_spec(driver, 7, base)).wait(300)
    pids = _qemu_pids(driver.cluster, 7)
    assert pids
    # The launcher crashes, and its node's runtime file is lost with it: only the
    # tags on the running QEMU are left to find it by.
    (Path(instance.details["node_dir"]) / "node.json").unlink()
    after_crash = load_driver(driver.provider, driver.cluster, driver.state_dir.parent.parent)
    assert isinstance(after_crash, QemuDriver)
    found = {i.external_id: i for i in after_crash.list_instances()}
    assert set(found) == {instance.external_id}
    stray = found[instance.external_id]
    assert stray.tags is not None and stray.tags.node_id == 7
    assert not stray.alive and "no runtime record" in stray.details["problems"]
    # Another cluster's driver on the same provider sees nothing of it.
    assert not QemuDriver(driver.provider, "other", driver.state_dir).list_instances()
    after_crash.delete(stray.external_id).wait(120)
    assert not any(processes.start_time(p) is not None for p in pids)
    assert not after_crash.list_instances()
    assert not Path(instance.details["node_dir"]).exists()


def _vm_pool(tmp_path: Path, extra: str = "") -> tuple[Path, Config, Store]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "freshpool.yaml"
    path.write_text(f"""
state-dir: {tmp_path / "state"}
providers:
  - name: vms
    driver: qemu
    boot-timeout: 240
    qemu: {{memory: 512, powerdown-timeout: 20, disk-size: 2}}
{extra}
labels: [{{name: debian-vm, image: debian-vm, min-ready: 0}}]
images: [{{name: debian-vm, packages: [linux-image-amd64, iproute2]}}]
""")
    config = load_config(path)
    return path, config, Store.open(config.state_dir)


def _node_row(store: Store, external_id: str | None, state: NodeState) -> int:
    """A node row of build vm-build-1 moved through the states up to `state`."""
    if not any(b.id == "vm-build-1" for b in store.builds()):
        store.new_build("vm-build-1", "debian-vm", "/nonexistent")
    node_id = store.new_node("debian-vm", "vms", "vm-build-1", "debian-vm").id
    current = NodeState.BUILDING
    for to in (NodeState.TESTING, NodeState.READY, NodeState.HOLD):
        values = {"external_id": external_id} if to == NodeState.TESTING else {}
        store.transition(node_id, current, to, "test", **values)
        current = to
        if to == state:
            break
    return node_id


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "freshpool", "--config", str(config_path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_commit_refuses_what_it_cannot_commit(tmp_path: Path) -> None:
    path, config, store = _vm_pool(tmp_path)
    try:
        ready = _node_row(store, "fp-x-1", NodeState.READY)
        with pytest.raises(CommitRefused, match="only a held node"):
            commit_node(config, store, ready)
        held = _node_row(store, None, NodeState.HOLD)
        with pytest.raises(CommitRefused, match="no instance"):
            commit_node(config, store, held)
        # Through the CLI: a clear message and exit 1, and no build row left behind.
        done = _cli(path, "image", "commit", str(ready))
        assert done.returncode == 1 and "only a held node" in done.stderr
        assert [b.id for b in store.builds()] == ["vm-build-1"]
    finally:
        store.close()
    # An image that a local provider also serves cannot take a VM disk.
    local = "  - {name: here, driver: local, network: {subnet: 10.219.1.0/24}}"
    _, config, store = _vm_pool(tmp_path / "mixed", local)
    try:
        held = _node_row(store, "fp-x-1", NodeState.HOLD)
        with pytest.raises(CommitRefused, match="cannot boot a VM disk"):
            commit_node(config, store, held)
    finally:
        store.close()


@pytest.mark.slow
def test_commit_folds_a_held_node_into_a_build_that_boots(
    uploaded: tuple[Path, str], tmp_path: Path
) -> None:
    _, base = uploaded
    path, config, store = _vm_pool(tmp_path)
    driver = load_driver(config.providers[0], store.cluster_id, config.state_dir)
    assert isinstance(driver, QemuDriver)
    try:
        row = store.new_node("debian-vm", "vms", "vm-build-1", "debian-vm")
        store.new_build("vm-build-1", "debian-vm", "/nonexistent")
        instance = driver.create(_spec(driver, row.id, base)).wait(300)
        _run(instance, "echo fixed-by-hand > /etc/freshpool-marker && sync")
        store.transition(
            row.id, NodeState.BUILDING, NodeState.TESTING, "up", external_id=instance.external_id
        )
        store.transition(row.id, NodeState.TESTING, NodeState.READY, "test")
        store.transition(row.id, NodeState.READY, NodeState.HOLD, "an operator fixes it")
        done = _cli(path, "image", "commit", str(row.id))
        assert done.returncode == 0, done.stderr
        build = store.builds("debian-vm")[0]
        assert build.state == "ready" and build.parent_build == "vm-build-1"
        assert store.node(row.id).state == "used"
        assert not _qemu_pids(driver.cluster, row.id), "the VM was not shut down for the commit"
        disk = Path(build.path) / "disk.qcow2"
        info = subprocess.run(["qemu-img", "info", str(disk)], capture_output=True, text=True)
        assert "backing file" not in info.stdout, "the committed disk depends on the old base"
        driver.delete(instance.external_id).wait(120)
        # A node of the new build (found from its layers' directory, as the launcher
        # gives them) boots from it and has the change made by hand.
        spec = NodeSpec(
            node_id=row.id + 1,
            cluster=driver.cluster,
            label="debian-vm",
            hostname="vm-next",
            build_id=build.id,
            layers=build.layer_paths(),
        )
        second = driver.create(spec).wait(300)
        assert _run(second, "cat /etc/freshpool-marker").strip() == "fixed-by-hand"
    finally:
        _purge(driver)
        store.close()
