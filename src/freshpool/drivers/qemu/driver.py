"""QemuDriver: each node is a VM booted from its image's qcow2 base through a thin
per-node qcow2 overlay, reached over SSH on a forwarded loopback port.

A node is QEMU (KVM where a probe boot shows the guest kernel can use it, else TCG)
with user-mode networking restricted to a host-only loopback forward, and a small
config drive carrying the node's own host key, client key and name. Everything a
node owns is under <state>/nodes/<external id>/, and its QEMU process carries the
cluster, provider and node in its environment, so strays are found after a crash.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshpool.config import Provider, QemuSettings, VmSize
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    ImageUpload,
    Instance,
    NodeSpec,
    Operation,
    Quota,
    SshAccess,
    StepOperation,
)
from freshpool.drivers.host import processes
from freshpool.drivers.host.driver import HostNodeDriver, NodeLaunch, tail
from freshpool.drivers.host.processes import MARK_NODE
from freshpool.drivers.host.tools import Command, find_tool, keygen, tool
from freshpool.drivers.qemu.accel import AccelCache, AccelChoice, kvm_usable
from freshpool.drivers.qemu.commit import commit_running, commit_steps
from freshpool.drivers.qemu.configdrive import config_drive
from freshpool.drivers.qemu.images import VmImages
from freshpool.drivers.qemu.machine import (
    GUEST_HOST,
    PROCESS_NAME,
    QEMU,
    free_loopback_port,
    qemu_argv,
)
from freshpool.drivers.qemu.power import PowerButton
from freshpool.drivers.qemu.records import QMP_SOCKET, NodePaths, NodeRecord
from freshpool.drivers.qemu.vmbase import VmBase
from freshpool.drivers.ssh import host_keys_in, wait_for_banner

# The logger keeps the name it had when the driver was one module.
log = logging.getLogger("freshpool.drivers.qemu")

# Host tool -> the Debian package that provides it.
REQUIRED_TOOLS = {
    QEMU: "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "mount": "mount",
}
# QEMU's own memory beside the guest's (device emulation, TCG code cache, slirp),
# counted against the provider's share of host RAM. Measured by `python -m bench.qemu`.
QEMU_OVERHEAD_MIB = 160
MIN_FREE_BYTES = 256 * 2**20


@dataclass
class _Launch(NodeLaunch[NodePaths, NodeRecord]):
    size: VmSize


_STEPS = {
    "base": "preparing the image's VM base",
    "accel": "choosing KVM or TCG",
    "files": "making the node's overlay, keys and config drive",
    "spawn": "starting QEMU",
    "ssh": "waiting for sshd in the VM",
}


class QemuDriver(HostNodeDriver[_Launch, NodeRecord]):
    """Nodes as QEMU VMs on this host, each on a copy-on-write overlay of its image's base."""

    min_free_bytes: int = MIN_FREE_BYTES
    kind = "VM"
    steps = _STEPS
    noun = "VM"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        self.settings: QemuSettings = provider.qemu
        base = self.nodes_dir.parent
        self.images_dir = base / "images"
        self.images = VmImages(
            provider.name, self.settings, self.images_dir, AccelCache(base / "accel.json")
        )
        # MiB promised to creates in flight that have no runtime record yet.
        self._reserved: dict[str, int] = {}
        self._power = PowerButton()

    # ---- identity and layout

    def _paths(self, external_id: str) -> NodePaths:
        return NodePaths(self.nodes_dir / external_id)

    # ---- host checks and limits

    def check(self) -> None:
        problems = []
        if os.geteuid() != 0:
            problems.append("it must run as root (it mounts image layers to build VM disks)")
        if platform.machine() != "x86_64":
            problems.append(f"it runs x86_64 guests only; this host is {platform.machine()}")
        missing = [
            f"{name} (apt-get install {package})"
            for name, package in REQUIRED_TOOLS.items()
            if find_tool(name) is None
        ]
        if missing:
            problems.append("missing " + ", ".join(missing))
        if self.settings.accel == "kvm" and (why := kvm_usable()):
            problems.append(f"accel is kvm but {why}")
        if problems:
            raise DriverUnavailable(
                f"qemu provider {self.provider.name!r} cannot run VMs here: " + "; ".join(problems)
            )

    def memory_budget_mib(self) -> int:
        """MiB of host RAM that this provider's VMs may take together."""
        return int(_host_memory_mib() * self.settings.memory_share)

    def _cost_mib(self, memory: int) -> int:
        return memory + QEMU_OVERHEAD_MIB

    def committed_mib(self) -> int:
        """MiB that the VMs of this provider on this host take (or will), by their records."""
        total = 0
        recorded = set()
        for eid in self._node_dirs():
            record = NodeRecord.load(self._paths(eid).record)
            if record is not None:
                total += self._cost_mib(record.memory)
                recorded.add(eid)
        return total + sum(m for eid, m in self._reserved.items() if eid not in recorded)

    def limits(self) -> Quota:
        sizes = [self.settings.size_of(""), *self.settings.sizes.values()]
        largest = max(self._cost_mib(s.memory) for s in sizes)
        return Quota(
            max_nodes=max(0, min(self.provider.max_nodes, self.memory_budget_mib() // largest))
        )

    # ---- images

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        return StepOperation(self._upload(upload))

    def _upload(self, upload: ImageUpload) -> Generator[float, None, str]:
        base = yield from self._base(upload.build_id, upload.image, upload.layers)
        if self.settings.accel == "auto":
            # Decided now, so the first node of the build does not wait for the probe.
            yield from self._accel(base)
        return str(base.dir)

    def delete_image(self, external_id: str) -> Operation[None]:
        return StepOperation(self._delete_image(external_id))

    def _delete_image(self, external_id: str) -> Generator[float, None, None]:
        target = Path(external_id)
        if target.parent != self.images_dir:
            # A base kept in a build's own directory (a commit) goes with that build.
            return
        users = [
            eid
            for eid in self._node_dirs()
            if (r := NodeRecord.load(self._paths(eid).record)) and Path(r.base) == target
        ]
        if users:
            raise DriverError(f"base {target.name} is in use by {', '.join(sorted(users))}")
        if os.path.lexists(target):
            yield from self._trash(target, target.name)

    def _base(
        self, build_id: str, image: str, layers: tuple[Path, ...]
    ) -> Generator[float, None, VmBase]:
        return self.images.base(build_id, image, layers)

    def _accel(self, base: VmBase) -> Generator[float, None, AccelChoice]:
        return self.images.accel(base)

    # ---- create

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        return StepOperation(self._create(spec))

    def _validate(self, spec: NodeSpec, external_id: str, paths: NodePaths, size: VmSize) -> None:
        self._check_spec(spec)
        if os.path.lexists(paths.dir):
            raise DriverError(
                f"{external_id} already exists (leftovers of an earlier launch?): delete it first"
            )
        self._check_free_space(external_id)
        budget, committed = self.memory_budget_mib(), self.committed_mib()
        if committed + self._cost_mib(size.memory) > budget:
            raise DriverError(
                f"{external_id}: not enough host memory for a {size.memory} MiB VM:"
                f" VMs of provider {self.provider.name} take {committed} MiB of the"
                f" {budget} MiB allowed (qemu.memory-share {self.settings.memory_share:g}"
                " of host RAM)"
            )

    def _create(self, spec: NodeSpec) -> Generator[float, None, Instance]:
        external_id = self.external_id_for(spec.tags)
        paths = self._paths(external_id)
        size = self.settings.size_of(spec.label)
        self._validate(spec, external_id, paths, size)
        launch = _Launch(spec, external_id, paths, size)
        self._creating.add(external_id)
        self._reserved[external_id] = self._cost_mib(size.memory)
        try:
            return (yield from self._build(launch))
        finally:
            self._creating.discard(external_id)
            self._reserved.pop(external_id, None)

    def _launch_steps(self, launch: _Launch) -> Generator[float, None, None]:
        spec = launch.spec
        launch.mark("base")
        if spec.image_external_id:
            base = VmBase.load(Path(spec.image_external_id))
            if base is None:
                raise DriverError(
                    f"no VM base at {spec.image_external_id} (build {spec.build_id}):"
                    " upload the build to this provider again"
                )
        else:
            base = yield from self._base(spec.build_id, spec.label, spec.layers)
        launch.mark("accel")
        choice = yield from self._accel(base)
        launch.mark("files")
        yield from self._make_files(launch, base, choice)
        launch.mark("spawn")
        self._spawn(launch, base)
        log.info(
            "%s: booting %s under %s (%s)",
            launch.external_id,
            base.build_id,
            choice.accel.upper(),
            choice.reason,
        )
        launch.mark("ssh")
        yield from self._wait_ssh(launch)

    def _undo(self, launch: _Launch) -> Generator[float, None, None]:
        yield from self._remove(launch.external_id)

    def _make_files(
        self, launch: _Launch, base: VmBase, choice: AccelChoice
    ) -> Generator[float, None, None]:
        spec, paths = launch.spec, launch.paths
        paths.dir.mkdir(mode=0o700)
        # The record goes first: from here on a crash leaves a node list_instances finds.
        launch.record = NodeRecord(
            external_id=launch.external_id,
            cluster=spec.cluster,
            node_id=spec.node_id,
            build_id=spec.build_id,
            provider=self.provider.name,
            hostname=spec.hostname,
            user=spec.user,
            base=str(base.dir),
            accel=choice.accel,
            accel_reason=choice.reason,
            vcpus=launch.size.vcpus,
            memory=launch.size.memory,
            port=self._free_port(),
            created=time.time(),
        )
        launch.record.save(paths.record)
        qemu_img = tool("qemu-img")
        for key, role in ((paths.host_key, "host"), (paths.key, "client")):
            launch.commands.append(keygen(key, role, launch.external_id))
        overlay = [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.disk)]
        launch.commands.append(Command([*overlay, str(paths.overlay)]))
        for command in launch.commands:
            yield from command.wait()
        host_pub = paths.host_key.with_suffix(".pub").read_text().split()
        port = launch.record.port
        paths.known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        drive = config_drive(
            spec.hostname,
            spec.user,
            host_key=paths.host_key.read_bytes(),
            host_pub=paths.host_key.with_suffix(".pub").read_bytes(),
            client_pub=paths.key.with_suffix(".pub").read_bytes(),
        )
        paths.config_drive.write_bytes(drive)
        # The guest has its own copy now; the host keeps only the public half.
        paths.host_key.unlink()

    def _free_port(self) -> int:
        """A loopback port free now and not promised to another of our nodes."""
        records = (NodeRecord.load(self._paths(eid).record) for eid in self._node_dirs())
        return free_loopback_port({r.port for r in records if r is not None})

    def _spawn(self, launch: _Launch, base: VmBase) -> None:
        record, paths = launch.record, launch.paths
        assert record is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self._marks(record.node_id)}
        with open(paths.log, "ab") as out:
            # Its own session: the VM outlives the launcher, which adopts it after a restart.
            launch.proc = subprocess.Popen(
                qemu_argv(record, base, self.provider.network),
                cwd=paths.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        self._adopt(launch)

    def _wait_ssh(self, launch: _Launch) -> Generator[float, None, None]:
        """Poll for the SSH banner through the forward; a VM that dies says why at once."""
        assert launch.proc is not None and launch.record is not None
        eid, port, paths = launch.external_id, launch.record.port, launch.paths
        timeout = self.provider.boot_timeout
        yield from wait_for_banner(
            "127.0.0.1",
            port,
            launch.proc,
            time.monotonic() + timeout,
            died=lambda status: DriverError(
                f"{eid}: QEMU exited with status {status} before sshd answered:"
                f" {tail(paths.log)} | console: {tail(paths.console)}"
            ),
            timed_out=lambda: TimeoutError(
                f"{eid}: no SSH answer on 127.0.0.1:{port} within {timeout:g} s;"
                f" console: {tail(paths.console)}"
            ),
            pending=(0.02, 0.02),
            # QEMU accepts on the forwarded port from the start and closes the connection
            # while nothing listens in the guest, so each refusal is a fresh attempt.
            refused=(0.05, 0.25),
        )

    # ---- delete

    def _pids(self, external_id: str, record: NodeRecord | None) -> set[int]:
        node_id = self.node_id_of(external_id)
        pids = set(processes.marked_processes(self._marks(node_id), (PROCESS_NAME,)))
        if record is not None and record.alive():
            assert record.pid is not None
            pids.add(record.pid)
        return pids

    def _stop(
        self, external_id: str, record: NodeRecord | None, deadline: float, *, kill: bool = True
    ) -> Generator[float, None, bool]:
        """Steps that stop a node's QEMU: ACPI power button first, SIGKILL after the grace.

        Returns whether it shut down by itself. With kill=False it is left running
        (and False returned) when the grace runs out.
        """
        paths = self._paths(external_id)
        pids = self._pids(external_id, record)
        clean = not pids
        if pids and os.path.exists(paths.dir / QMP_SOCKET):
            grace = time.monotonic() + min(
                self.settings.powerdown_timeout, deadline - time.monotonic()
            )
            shutdown = self._power.shut_down(external_id, paths.dir, pids, grace, self._reap)
            clean = yield from shutdown
        if not kill:
            return clean
        yield from self._kill(
            external_id,
            lambda: self._pids(external_id, record),
            deadline,
            pause=0.005,
            survivors="QEMU {} survives SIGKILL",
        )
        return clean

    def _remove(self, external_id: str) -> Generator[float, None, None]:
        """Remove every trace of a node, whatever state it is in; the steps of delete."""
        paths = self._paths(external_id)
        record = NodeRecord.load(paths.record)
        deadline = time.monotonic() + self.provider.delete_timeout
        # A commit in progress reads the overlay: wait for it rather than pull it away.
        while commit_running(paths.dir):
            if time.monotonic() > deadline:
                raise DriverError(f"{external_id}: a commit of its disk is still running")
            yield 0.2
        yield from self._stop(external_id, record, deadline)
        if os.path.lexists(paths.dir):
            yield from self._trash(paths.dir, external_id)

    # ---- commit

    def commit(self, external_id: str, target: Path, build_id: str) -> Operation[Path]:
        """Fold a node's disk into a new, standalone base at `target`; result: its qcow2.

        The VM is shut down through ACPI first (its file system must be clean); a VM
        that does not shut down in time is left running and nothing is committed.
        """

        def shut_down(record: NodeRecord) -> Generator[float, None, bool]:
            deadline = time.monotonic() + self.settings.powerdown_timeout + 5
            return self._stop(external_id, record, deadline, kill=False)

        steps = commit_steps(
            self.provider.name,
            external_id,
            self._paths(external_id),
            target,
            build_id,
            shut_down,
            self.settings.powerdown_timeout,
        )
        return StepOperation(steps)

    # ---- list

    def list_instances(self) -> list[Instance]:
        self._reap()
        records = {eid: NodeRecord.load(self._paths(eid).record) for eid in self._node_dirs()}
        running: dict[str, list[int]] = {}
        for pid, marks in processes.marked_processes(self._marks(), (PROCESS_NAME,)).items():
            running.setdefault(f"{self._prefix}{marks.get(MARK_NODE, '')}", []).append(pid)
        found = set(records) | {e for e in running if self.node_id_of(e) is not None}

        def problems_of(eid: str, record: NodeRecord | None) -> list[str]:
            problems = []
            if record is None:
                problems.append("no runtime record")
            elif not record.alive():
                problems.append("QEMU not running")
            if eid not in running:
                problems.append("no marked QEMU process")
            return problems

        instances = []
        for eid, instance in self._listed(found, records, problems_of):
            if eid in running:
                instance.details["pids"] = sorted(running[eid])
            instances.append(instance)
        return instances

    def _published(self, port: int) -> tuple[str | None, int | None]:
        publish = self.provider.network.publish
        return (str(publish), port) if publish is not None else (None, None)

    def _instance(self, record: NodeRecord, alive: bool) -> Instance:
        paths = self._paths(record.external_id)
        known = str(paths.known_hosts)
        access = SshAccess(
            "127.0.0.1", record.port, record.user, str(paths.key), known, host_keys_in(known),
            *self._published(record.port), host_from_node=GUEST_HOST,
        )  # fmt: skip
        details: dict[str, Any] = {
            "accel": record.accel,
            "accel_reason": record.accel_reason,
            "vcpus": record.vcpus,
            "memory_mib": record.memory,
            "port": record.port,
            "pid": record.pid,
            "base": record.base,
            "hostname": record.hostname,
            "node_dir": str(paths.dir),
            "console": str(paths.console),
            "created": record.created,
        }
        return Instance(record.external_id, record.tags, alive, access, details)


def _host_memory_mib() -> float:
    """This host's RAM in MiB, as the kernel reports it (MemTotal)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**10
    raise DriverUnavailable("/proc/meminfo has no MemTotal: cannot size VMs on this host")
