"""The qemu driver: each node is a VM booted from its image's qcow2 base through a thin
per-node qcow2 overlay, reached over SSH on a forwarded loopback port.

A node is QEMU (KVM where a probe boot shows the guest kernel can use it, else TCG)
with user-mode networking restricted to a host-only loopback forward, and a small
config drive carrying the node's own host key, client key and name. Everything a
node owns is under <state>/nodes/<external id>/, and its QEMU process carries the
cluster, provider and node in its environment, so strays are found after a crash.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import platform
import socket
import subprocess
import tarfile
import time
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient

from freshpool.config import Provider, QemuSettings, VmSize
from freshpool.drivers import localproc, qemuaccel, qemubase
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    ImageUpload,
    Instance,
    NodeSpec,
    Operation,
    OutOfSpace,
    Quota,
    SshAccess,
    StepOperation,
    Tags,
)
from freshpool.drivers.localproc import Command, tool
from freshpool.drivers.noderuntime import (
    MARK_NODE,
    RECORD_FILE,
    HostNodeDriver,
    NodeDir,
    NodeLaunch,
    RuntimeRecord,
    keygen,
    tail,
)
from freshpool.drivers.qemuaccel import AccelCache, AccelChoice
from freshpool.drivers.qemubase import VmBase
from freshpool.drivers.ssh import BannerProbe

log = logging.getLogger("freshpool.drivers.qemu")

QEMU = "qemu-system-x86_64"
# Host tool -> the Debian package that provides it.
REQUIRED_TOOLS = {
    QEMU: "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "mount": "mount",
}
RECORD_VERSION = 1
COMMIT_LOCK = "commit.lock"
# QEMU binds it relative to its working directory (the node dir): a unix socket path
# may not exceed 107 bytes, and state dirs can be deep.
QMP_SOCKET = "qmp.sock"
# QEMU's own memory beside the guest's (device emulation, TCG code cache, slirp),
# counted against the provider's share of host RAM. Measured by `python -m bench.qemu`.
QEMU_OVERHEAD_MIB = 160
# TCG's translated-code cache; QEMU's default (1 GiB) would count against the host.
TCG_CACHE_MIB = 128
MIN_FREE_BYTES = 256 * 2**20
# User-mode networking: the guest's fixed address and the gateway slirp answers on.
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
KERNEL_ARGS = (
    "root=/dev/vda ro rootfstype=ext4 console=ttyS0 net.ifnames=0 panic=-1 quiet"
    f" init=/{qemubase.INIT_PATH}"
)


@dataclass(frozen=True)
class NodePaths(NodeDir):
    """Where a node's files live: <state>/nodes/<external id>/..."""

    @property
    def overlay(self) -> Path:
        return self.dir / "overlay.qcow2"

    @property
    def config_drive(self) -> Path:
        return self.dir / "config.tar"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"


@dataclass
class NodeRecord(RuntimeRecord):
    """A VM node's runtime file: its base, accelerator, size and SSH forward port."""

    base: str
    accel: str
    accel_reason: str
    vcpus: int
    memory: int
    port: int
    version: int = field(default=RECORD_VERSION, kw_only=True)


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
    noun = "VM"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        self.settings: QemuSettings = provider.qemu
        base = self.nodes_dir.parent
        self.images_dir = base / "images"
        self.accel_cache = AccelCache(base / "accel.json")
        # MiB promised to creates in flight that have no runtime record yet.
        self._reserved: dict[str, int] = {}
        # Shared work, so concurrent creates of one build make its base and probe once.
        self._bases: dict[str, StepOperation[VmBase]] = {}
        self._probes: dict[str, StepOperation[AccelChoice]] = {}
        # QMP is asyncio; its calls run off the launcher's thread and are polled.
        self._qmp_pool: ThreadPoolExecutor | None = None

    # ---- identity and layout

    def _paths(self, external_id: str) -> NodePaths:
        return NodePaths(self.nodes_dir / external_id)

    @staticmethod
    def _process_names() -> tuple[str, ...]:
        # /proc/PID/comm holds the first 15 bytes of the program name.
        return (QEMU[:15],)

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
            if localproc.find_tool(name) is None
        ]
        if missing:
            problems.append("missing " + ", ".join(missing))
        if self.settings.accel == "kvm" and (why := qemuaccel.kvm_usable()):
            problems.append(f"accel is kvm but {why}")
        if problems:
            raise DriverUnavailable(
                f"qemu provider {self.provider.name!r} cannot run VMs here: " + "; ".join(problems)
            )

    def memory_budget_mib(self) -> int:
        """MiB of host RAM that this provider's VMs may take together."""
        return int(psutil.virtual_memory().total / 2**20 * self.settings.memory_share)

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
        """The VM base of a build: already here, kept in the build's own dir, or made now."""
        if "/" in build_id or build_id.startswith("."):
            raise DriverError(f"{build_id!r} cannot name a VM base")
        target = self.images_dir / build_id
        for candidate in (target, *(Path(p).parent for p in layers)):
            found = VmBase.load(candidate)
            if found is not None:
                return found
        op = self._bases.get(build_id)
        if op is None:
            log.info("provider %s: making the VM base of build %s", self.provider.name, build_id)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            steps = qemubase.build(
                layers, target, build_id=build_id, image=image, disk_gib=self.settings.disk_size
            )
            op = self._bases[build_id] = StepOperation(steps)
        try:
            return (yield from _await(op))
        finally:
            if op.done:
                self._bases.pop(build_id, None)

    def _accel(self, base: VmBase) -> Generator[float, None, AccelChoice]:
        if self.settings.accel != "auto":
            return AccelChoice(self.settings.accel, "set in the provider's qemu.accel")
        qemu = tool(QEMU)
        key = qemuaccel.cache_key(qemu, base.kernel_digest)
        cached = self.accel_cache.get(key)
        if cached is not None:
            return cached
        op = self._probes.get(key)
        if op is None:
            op = self._probes[key] = StepOperation(qemuaccel.probe(qemu, base.kernel))
        try:
            choice = yield from _await(op)
        finally:
            if op.done:
                self._probes.pop(key, None)
        if choice.probed:
            self.accel_cache.put(key, choice)
            log.info(
                "provider %s: kernel %s runs under %s: %s",
                self.provider.name,
                base.kernel_version,
                choice.accel.upper(),
                choice.reason,
            )
        return choice

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
        paths.config_drive.write_bytes(self._config_drive(launch))
        # The guest has its own copy now; the host keeps only the public half.
        paths.host_key.unlink()

    def _config_drive(self, launch: _Launch) -> bytes:
        """A tar archive the VM's init unpacks from its second disk: who it is, its keys."""
        spec, paths = launch.spec, launch.paths
        env = {
            "FP_HOSTNAME": spec.hostname,
            "FP_USER": spec.user,
            "FP_ADDRESS": GUEST_ADDRESS,
            "FP_GATEWAY": GUEST_GATEWAY,
        }
        files = {
            # Values are checked against strict patterns above; the init sources this.
            "node.env": "".join(f"{k}={v}\n" for k, v in env.items()).encode(),
            "ssh_host_ed25519_key": paths.host_key.read_bytes(),
            "ssh_host_ed25519_key.pub": paths.host_key.with_suffix(".pub").read_bytes(),
            "authorized_keys": paths.key.with_suffix(".pub").read_bytes(),
        }
        buffer = io.BytesIO()
        # The archive is the whole disk: tar's 10 KiB records keep it a whole number
        # of 512-byte sectors, as a block device must be.
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def _free_port(self) -> int:
        """A loopback port free now and not promised to another of our nodes."""
        taken = {
            r.port
            for eid in self._node_dirs()
            if (r := NodeRecord.load(self._paths(eid).record)) is not None
        }
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in taken:
                return port
        raise DriverError("no free loopback port for the VM's SSH forward")

    def qemu_argv(self, record: NodeRecord, base: VmBase) -> list[str]:
        """QEMU's command line for a node; relative paths are in the node dir."""
        if record.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", f"tcg,thread=multi,tb-size={TCG_CACHE_MIB}", "-cpu", "max"]
        restrict = "off" if self.provider.network.outbound else "on"
        netdev = f"user,id=net0,restrict={restrict},hostfwd=tcp:127.0.0.1:{record.port}-:22"
        return [
            tool(QEMU),
            "-name", record.external_id,
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-machine", "pc", *accel,
            "-smp", str(record.vcpus), "-m", str(record.memory),
            "-kernel", str(base.kernel), "-initrd", str(base.initrd),
            "-append", KERNEL_ARGS,
            # cache=unsafe: a node's disk never outlives a host crash, so flushes are waste.
            "-drive", "file=overlay.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-drive", "file=config.tar,if=virtio,format=raw,readonly=on",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
            "-serial", "file:console.log",
            "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
            # A guest that panics or reboots ends QEMU: the node is dead, not looping.
            "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]  # fmt: skip

    def _spawn(self, launch: _Launch, base: VmBase) -> None:
        record, paths = launch.record, launch.paths
        assert record is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self._marks(record.node_id)}
        with open(paths.log, "ab") as out:
            # Its own session: the VM outlives the launcher, which adopts it after a restart.
            launch.proc = subprocess.Popen(
                self.qemu_argv(record, base),
                cwd=paths.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        self._adopt(launch)

    def _wait_ssh(self, launch: _Launch) -> Generator[float, None, None]:
        """Poll for the SSH banner through the forward; a VM that dies says why at once.

        QEMU accepts on the forwarded port from the start and closes the connection
        while nothing listens in the guest, so each refusal is a fresh attempt.
        """
        assert launch.proc is not None and launch.record is not None
        deadline = time.monotonic() + self.provider.boot_timeout
        port = launch.record.port
        retry = 0.05
        probe = BannerProbe("127.0.0.1", port)
        try:
            while not (answer := probe.poll()):
                status = launch.proc.poll()
                if status is not None:
                    raise DriverError(
                        f"{launch.external_id}: QEMU exited with status {status} before sshd"
                        f" answered: {tail(launch.paths.log)} | console: "
                        f"{tail(launch.paths.console)}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{launch.external_id}: no SSH answer on 127.0.0.1:{port} within"
                        f" {self.provider.boot_timeout:g} s; console: {tail(launch.paths.console)}"
                    )
                if answer is None:
                    yield 0.02
                else:
                    yield retry
                    retry = min(retry * 2, 0.25)
                    probe = BannerProbe("127.0.0.1", port)
        finally:
            probe.close()

    def _explain(self, exc: Exception, launch: _Launch) -> Exception:
        where = f"{launch.external_id} (while {_STEPS.get(launch.step, launch.step)})"
        if isinstance(exc, OSError) and exc.errno in (28, 122):
            return OutOfSpace(f"{where}: the disk holding {self.state_dir} is full: {exc}")
        if isinstance(exc, DriverError | TimeoutError):
            return exc
        return DriverError(f"{where}: {exc}")

    # ---- QMP

    def _qmp(self, paths: NodePaths, command: str) -> Future[None]:
        """Send one QMP command to a node's QEMU, off this thread; the future says how it went."""
        if self._qmp_pool is None:
            self._qmp_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmp")
        return self._qmp_pool.submit(_qmp_call, paths.dir, command)

    # ---- delete

    def _pids(self, external_id: str, record: NodeRecord | None) -> set[int]:
        node_id = self.node_id_of(external_id)
        pids = set(localproc.marked_processes(self._marks(node_id), self._process_names()))
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
            asked = self._qmp(paths, "system_powerdown")
            pause = 0.02
            while (pids := {p for p in pids if localproc.start_time(p) is not None}) and (
                time.monotonic() < grace and not (asked.done() and asked.exception())
            ):
                self._reap()
                yield pause
                pause = min(pause * 2, 0.2)
            clean = not pids
            if asked.done() and asked.exception():
                log.info("%s: ACPI shutdown not possible: %s", external_id, asked.exception())
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
        while _locked(paths.dir / COMMIT_LOCK):
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
        return StepOperation(self._commit(external_id, target, build_id))

    def _commit(
        self, external_id: str, target: Path, build_id: str
    ) -> Generator[float, None, Path]:
        paths = self._paths(external_id)
        record = NodeRecord.load(paths.record)
        if record is None or not paths.overlay.is_file():
            raise DriverError(f"{external_id}: no such VM node on provider {self.provider.name}")
        parent = VmBase.load(Path(record.base))
        if parent is None:
            raise DriverError(f"{external_id}: its base {record.base} is gone")
        with open(paths.dir / COMMIT_LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DriverError(f"{external_id}: another commit of it is running") from None
            deadline = time.monotonic() + self.settings.powerdown_timeout + 5
            clean = yield from self._stop(external_id, record, deadline, kill=False)
            if not clean:
                raise DriverError(
                    f"{external_id}: the VM did not shut down within"
                    f" {self.settings.powerdown_timeout:g} s of an ACPI power button press;"
                    " not committing a disk that may be inconsistent"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            base = yield from qemubase.flatten(
                paths.overlay, parent, target, build_id=build_id, node=external_id
            )
        log.info("%s: disk committed as build %s at %s", external_id, build_id, base.dir)
        return base.disk

    # ---- list

    def list_instances(self) -> list[Instance]:
        self._reap()
        records = {eid: NodeRecord.load(self._paths(eid).record) for eid in self._node_dirs()}
        running: dict[str, list[int]] = {}
        for pid, marks in localproc.marked_processes(self._marks(), self._process_names()).items():
            running.setdefault(f"{self._prefix}{marks.get(MARK_NODE, '')}", []).append(pid)
        found = set(records) | {e for e in running if self.node_id_of(e) is not None}
        instances = []
        for eid in sorted(found, key=lambda e: self.node_id_of(e) or 0):
            record = records.get(eid)
            problems = []
            if eid not in self._creating:
                if record is None:
                    problems.append("no runtime record")
                elif not record.alive():
                    problems.append("QEMU not running")
                if eid not in running:
                    problems.append("no marked QEMU process")
            if record is not None:
                instance = self._instance(record, alive=not problems)
            else:
                node_id = self.node_id_of(eid)
                tags = Tags(self.cluster, node_id) if node_id is not None else None
                instance = Instance(eid, tags, alive=False)
            instance.details["problems"] = problems
            instance.details["creating"] = eid in self._creating
            if eid in running:
                instance.details["pids"] = sorted(running[eid])
            instances.append(instance)
        return instances

    def _instance(self, record: NodeRecord, alive: bool) -> Instance:
        paths = self._paths(record.external_id)
        access = SshAccess(
            "127.0.0.1", record.port, record.user, str(paths.key), str(paths.known_hosts)
        )
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


def node_accel(state_dir: Path, external_id: str) -> str | None:
    """The accelerator a node runs on, from its runtime file (for `freshpool list`)."""
    record = NodeRecord.load(Path(state_dir) / "nodes" / external_id / RECORD_FILE)
    return record.accel if record is not None else None


def _await(op: Operation[Any]) -> Generator[float, None, Any]:
    """Steps that wait for an operation others may also be waiting for."""
    while not op.done:
        if time.monotonic() >= op.not_before:
            op.advance()
        if not op.done:
            yield max(0.0, op.not_before - time.monotonic())
    if op.error is not None:
        raise op.error
    return op.result


def _qmp_call(node_dir: Path, command: str, timeout: float = 2.0) -> None:
    # Through /proc/self/fd: the socket's full path may be too long for a unix address.
    fd = os.open(node_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        address = f"/proc/self/fd/{fd}/{QMP_SOCKET}"

        async def call() -> None:
            client = QMPClient("freshpool")
            await asyncio.wait_for(client.connect(address), timeout)
            try:
                await asyncio.wait_for(client.execute(command), timeout)
            finally:
                await client.disconnect()

        asyncio.run(call())
    finally:
        os.close(fd)


def _locked(path: Path) -> bool:
    """Whether another holder has an exclusive flock on `path`."""
    try:
        handle = open(path)  # noqa: SIM115 - closed below
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
