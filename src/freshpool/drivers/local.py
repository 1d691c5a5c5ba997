"""The local driver: each node is a Linux-namespace container on this host.

A node is an overlayfs root over the image layers, its own network namespace joined
to the provider's host-only bridge, and bubblewrap running sshd as the node's only
service. Everything a node owns is named after its external id, so a node can be
found and deleted from the id alone, even after the launcher or the host restarted.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

from freshpool.config import Provider
from freshpool.drivers import localfs, localnet, localproc
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
    Tags,
)
from freshpool.drivers.localproc import Command, CommandFailed, tool
from freshpool.drivers.noderuntime import (
    MARK_NODE,
    HostNodeDriver,
    NodeDir,
    NodeLaunch,
    RuntimeRecord,
    keygen,
    tail,
)
from freshpool.drivers.ssh import BannerProbe

RECORD_VERSION = 1
# Refuse to start a node on a nearly full disk: it would fail its job anyway.
MIN_FREE_BYTES = 64 * 2**20

# Host tool -> the Debian package that provides it.
REQUIRED_TOOLS = {
    "bwrap": "bubblewrap",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
}

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SSHD = "/usr/sbin/sshd"
# Docker's default set without CAP_MKNOD: enough for sshd, apt and ordinary builds.
# Root in a node keeps these only, so it cannot load modules, set the host clock,
# mount host disks, or add itself a route out of a host-only network.
NODE_CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)
# Command-line options win over the image's sshd_config, so these hold whatever the
# image says. No PAM: there is no login session machinery in a node.
SSHD_OPTIONS = (
    "UsePAM=no",
    "PermitRootLogin=prohibit-password",
    "PasswordAuthentication=no",
    "KbdInteractiveAuthentication=no",
    "PubkeyAuthentication=yes",
    "AuthorizedKeysFile=.ssh/authorized_keys",
    "UseDNS=no",
    "PidFile=none",
    "PrintMotd=no",
    "PrintLastLog=no",
    # CI tools open many connections at once; the default (10:30:100) drops some.
    "MaxStartups=100:30:200",
)


@dataclass(frozen=True)
class NodePaths(NodeDir):
    """Where a node's files live: <state>/nodes/<external id>/..."""

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def log(self) -> Path:
        return self.dir / "node.log"


@dataclass
class NodeRecord(RuntimeRecord):
    """A namespace node's runtime file: its address and network, and its image layers."""

    ip: str
    netns: str
    veth: str
    bridge: str
    layers: list[str]
    version: int = field(default=RECORD_VERSION, kw_only=True)


_STEPS = {
    "files": "making the node's files and root",
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


def _inside(root: Path, relative: str) -> Path:
    """`relative` under the node root, refusing image symlinks that lead out of it.

    The driver writes into the node as host root: an image whose /root/.ssh
    pointed at /etc must not make it write into the host's /etc.
    """
    if not relative.strip("/"):
        return root
    target = root / relative.lstrip("/")
    parent = os.path.realpath(target.parent)
    if parent != str(root) and not parent.startswith(f"{root}/"):
        raise DriverError(f"the image's {target.parent.relative_to(root)} leads out of the node")
    return Path(parent) / target.name


def _write(path: Path, data: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Replace the file at `path` (never following a symlink there) with `data`."""
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data.encode())
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _make_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    if path.is_symlink():
        raise DriverError(f"{path.name} in the image is a symlink; expected a directory")
    if not path.is_dir():
        path.mkdir(mode=mode)
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OutOfSpace):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (28, 122)  # ENOSPC, EDQUOT
    if isinstance(exc, CommandFailed):
        return "No space left on device" in exc.stderr or "quota exceeded" in exc.stderr
    return False


class LocalDriver(HostNodeDriver[_Launch, NodeRecord]):
    """Nodes as namespace containers on this host, reached over a host-only bridge."""

    min_free_bytes: int = MIN_FREE_BYTES
    kind = "local"
    noun = "node"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        self.network = localnet.BridgeNetwork.for_provider(provider)
        self._addresses = localnet.AddressPool(self.network)
        self._sweeper: subprocess.Popen[bytes] | None = None
        self._bridge_ready = False
        for eid in self._node_dirs():
            record = NodeRecord.load(self._paths(eid).record)
            if record is not None and ip_address(record.ip) in self.network.subnet:
                self._addresses.reserve(record.ip)
        self._sweep_trash()

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
        tools = dict(REQUIRED_TOOLS)
        if self.network.outbound:
            tools["iptables"] = "iptables"
        missing = [
            f"{name} (apt-get install {package})"
            for name, package in tools.items()
            if localproc.find_tool(name) is None
        ]
        if missing:
            problems.append("missing " + ", ".join(missing))
        clash = localnet.subnet_clash(self.network)
        if clash:
            problems.append(
                f"network.subnet {self.network.subnet} overlaps {clash}: choose another subnet"
            )
        if not _overlay_available():
            problems.append(
                "the kernel has no overlayfs: run `modprobe overlay`"
                " (and add `overlay` to /etc/modules to keep it)"
            )
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
        if os.path.lexists(paths.dir) or os.path.lexists(localnet.netns_file(external_id)):
            raise DriverError(
                f"{external_id} already exists (leftovers of an earlier launch?): delete it first"
            )
        self._check_free_space(external_id)

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
        self._make_files(launch)
        launch.mark("network")
        yield from self._make_network(launch)
        launch.mark("keys")
        for command in launch.commands:
            yield from command.wait()
        launch.mark("access")
        self._install_access(launch)
        launch.mark("spawn")
        self._spawn(launch)
        # sshd needs tens of milliseconds: let other operations have the loop.
        yield 0.005
        launch.mark("ssh")
        yield from self._wait_ssh(launch)

    def _undo(self, launch: _Launch) -> Generator[float, None, None]:
        # The address is released even if the record holding it was never written.
        yield from self._remove(launch.external_id, launch.ip)

    def _make_files(self, launch: _Launch) -> None:
        """The node dir, its record, the overlay root; starts the key generators."""
        spec, paths = launch.spec, launch.paths
        paths.dir.mkdir(mode=0o700)
        for sub in (paths.upper, paths.work, paths.root):
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
            veth=localnet.veth_name(launch.external_id),
            bridge=self.network.bridge,
            layers=[str(p) for p in spec.layers],
            created=time.time(),
        )
        launch.record.save(paths.record)
        layers = [Path(os.path.abspath(layer)) for layer in spec.layers]
        localfs.mount_overlay(layers, paths.upper, paths.work, paths.root)
        if localfs.is_read_only(paths.root):
            # overlayfs mounts read-only when it cannot create its work dir: a full disk.
            raise OutOfSpace(f"{launch.external_id}: the overlay came up read-only (disk full?)")
        if not os.path.isfile(_inside(paths.root, SSHD)):
            raise DriverError(f"the image has no {SSHD}: install openssh-server in it")
        etc_ssh = _inside(paths.root, "/etc/ssh/x").parent
        _make_dir(etc_ssh, 0o755)
        # Baked host keys are shared by every node of the image: none may serve.
        for name in os.listdir(etc_ssh):
            if name.startswith("ssh_host_"):
                (etc_ssh / name).unlink()
        for key, role in ((etc_ssh / "ssh_host_ed25519_key", "host"), (paths.key, "client")):
            launch.commands.append(keygen(key, role, launch.external_id))

    def _make_network(self, launch: _Launch) -> Generator[float, None, None]:
        if not self._bridge_ready or not localnet.link_exists(self.network.bridge):
            # One create at a time reaches this (the loop is single-threaded and this
            # step does not yield), so the bridge is set up once.
            localnet.ensure_bridge(self.network)
            self._bridge_ready = True
        host, inside = self.network.node_batches(
            launch.external_id, localnet.veth_name(launch.external_id), launch.ip
        )
        ip = tool("ip")
        command = Command([ip, "-batch", "-"], stdin=host)
        launch.commands.append(command)
        yield from command.wait()
        command = Command([ip, "-n", launch.external_id, "-batch", "-"], stdin=inside)
        launch.commands.append(command)
        yield from command.wait()

    def _install_access(self, launch: _Launch) -> None:
        """Client key into the user's authorized_keys; pinned host key; sshd's needs."""
        spec, paths, root = launch.spec, launch.paths, launch.paths.root
        uid, gid, home = _lookup_user(root, spec.user)
        home_dir = _inside(root, home)
        if not home_dir.is_dir():
            home_dir.mkdir(mode=0o755, parents=True)
            os.chown(home_dir, uid, gid)
        ssh_dir = _inside(root, f"{home}/.ssh")
        _make_dir(ssh_dir, 0o700, uid, gid)
        client_pub = paths.key.with_suffix(".pub").read_text()
        _write(ssh_dir / "authorized_keys", client_pub, 0o600, uid, gid)
        _allow_key_login(root, spec.user)
        host_pub = _inside(root, f"{HOST_KEY}.pub").read_text().split()
        _write(paths.known_hosts, f"{launch.ip} {host_pub[0]} {host_pub[1]}\n", 0o644)
        # sshd refuses to start without its privilege separation directory.
        _make_dir(_inside(root, "/run/sshd"), 0o755)
        _write(_inside(root, "/etc/hostname"), f"{spec.hostname}\n", 0o644)
        hosts = _inside(root, "/etc/hosts")
        lines = hosts.read_text() if hosts.is_file() and not hosts.is_symlink() else ""
        if lines and not lines.endswith("\n"):
            lines += "\n"
        short = spec.hostname.split(".")[0]
        names = spec.hostname if short == spec.hostname else f"{spec.hostname} {short}"
        lines = lines or "127.0.0.1\tlocalhost\n"
        _write(hosts, f"{lines}{launch.ip}\t{names}\n", 0o644)

    def _spawn(self, launch: _Launch) -> None:
        spec, paths, record = launch.spec, launch.paths, launch.record
        assert record is not None
        argv = [
            tool("nsenter"), f"--net={localnet.netns_file(launch.external_id)}", "--",
            tool("bwrap"),
            "--bind", str(paths.root), "/",
            "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/dev/shm",
            "--proc", "/proc",
            # apt cannot create its temporary files in a /tmp without the sticky 1777.
            "--perms", "1777", "--tmpfs", "/tmp",
            "--unshare-pid", "--unshare-uts", "--unshare-ipc", "--unshare-cgroup-try",
            "--hostname", spec.hostname,
            "--chdir", "/",
            "--cap-drop", "ALL",
            *(arg for cap in NODE_CAPABILITIES for arg in ("--cap-add", cap)),
            "--",
            SSHD, "-D", "-e", "-h", HOST_KEY,
            *(arg for option in SSHD_OPTIONS for arg in ("-o", option)),
        ]  # fmt: skip
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
        deadline = time.monotonic() + self.provider.boot_timeout
        retry = pending = 0.002
        probe = BannerProbe(str(launch.ip), 22)
        try:
            while not (answer := probe.poll()):
                status = launch.proc.poll()
                if status is not None:
                    raise DriverError(
                        f"{launch.external_id}: the node exited with status {status} before"
                        f" sshd answered: {tail(launch.paths.log)}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{launch.external_id}: no SSH answer from {launch.ip}:22 within"
                        f" {self.provider.boot_timeout:g} s: {tail(launch.paths.log)}"
                    )
                if answer is None:
                    # Connected (or connecting): the banner follows within milliseconds.
                    yield pending
                    pending = min(pending * 2, 0.02)
                else:
                    # Refused: sshd is not listening yet.
                    yield retry
                    retry = min(retry * 2, 0.1)
                    probe = BannerProbe(str(launch.ip), 22)
        finally:
            probe.close()

    def _explain(self, exc: Exception, launch: _Launch) -> Exception:
        where = f"{launch.external_id} (while {_STEPS.get(launch.step, launch.step)})"
        if isinstance(exc, OutOfSpace):
            return exc
        if _no_space(exc):
            return OutOfSpace(f"{where}: the disk holding {self.nodes_dir} is full: {exc}")
        if isinstance(exc, DriverError | TimeoutError):
            return exc
        return DriverError(f"{where}: {exc}")

    # ---- delete

    def _node_pids(self, external_id: str, record: NodeRecord | None) -> set[int]:
        pids = localproc.node_processes(
            localnet.netns_file(external_id), self._marks(self.node_id_of(external_id))
        )
        if record is not None and record.alive():
            assert record.pid is not None
            pids.add(record.pid)
        return pids

    def _reap(self) -> None:
        super()._reap()
        if self._sweeper is not None and self._sweeper.poll() is not None:
            self._sweeper = None

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
        attempts = 0
        while mounts := localfs.mounts_under(paths.dir):
            for mount in mounts:
                try:
                    # A lazy unmount is the last resort: it hides a busy mount, not frees it.
                    localfs.unmount(mount, detach=attempts >= 20)
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise DriverError(f"{external_id}: cannot unmount {mount}: {exc}") from exc
            attempts += 1
            if localfs.mounts_under(paths.dir):
                yield 0.05
        yield from localnet.remove_node_network(external_id, localnet.veth_name(external_id))
        if os.path.lexists(paths.dir):
            yield from self._trash(paths.dir, external_id)
        for address in {ip, record.ip if record else None}:
            if address is not None:
                self._addresses.release(address)

    def _sweep_trash(self) -> None:
        """Finish removals a previous launcher left half done."""
        try:
            leftovers = [str(self.trash_dir / n) for n in os.listdir(self.trash_dir)]
        except FileNotFoundError:
            return
        if leftovers:
            self._sweeper = subprocess.Popen(
                [tool("rm"), "-rf", "--one-file-system", "--", *leftovers],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    # ---- list

    def list_instances(self) -> list[Instance]:
        self._reap()
        records = {eid: NodeRecord.load(self._paths(eid).record) for eid in self._node_dirs()}
        mounted: set[str] = set()
        for mount in localfs.mounts_under(self.nodes_dir):
            parts = mount.relative_to(self.nodes_dir).parts
            if not parts or self.node_id_of(parts[0]) is None:
                continue
            if len(parts) == 2 and parts[1] == "root":
                mounted.add(parts[0])
            else:
                # Something else mounted in a node dir: a leftover all the same.
                records.setdefault(parts[0], None)
        netns = {n for n in localnet.netns_names() if self.node_id_of(n) is not None}
        marked: dict[str, list[int]] = {}
        for pid, marks in localproc.marked_processes(self._marks()).items():
            marked.setdefault(f"{self._prefix}{marks.get(MARK_NODE, '')}", []).append(pid)
        found = set(records) | mounted | {e for e in marked if self.node_id_of(e) is not None}
        for name in netns - found:
            # A namespace alone could be another local provider's node of this cluster;
            # it is ours if its veth is on our bridge.
            if localnet.link_master(localnet.veth_name(name)) == self.network.bridge:
                found.add(name)
        instances = []
        for eid in sorted(found, key=lambda e: self.node_id_of(e) or 0):
            record = records.get(eid)
            problems = []
            # One being built by this driver right now is no leftover, whatever it lacks.
            if eid not in self._creating:
                if record is None:
                    problems.append("no runtime record")
                elif not record.alive():
                    problems.append("process gone")
                if eid not in mounted:
                    problems.append("root not mounted")
                if eid not in netns:
                    problems.append("netns gone")
            if record is not None:
                instance = self._instance(record, alive=not problems)
            else:
                node_id = self.node_id_of(eid)
                tags = Tags(self.cluster, node_id) if node_id is not None else None
                instance = Instance(eid, tags, alive=not problems, details={"netns": eid})
            instance.details["problems"] = problems
            instance.details["creating"] = eid in self._creating
            if eid in marked:
                instance.details["marked_pids"] = sorted(marked[eid])
            instances.append(instance)
        return instances

    def _instance(self, record: NodeRecord, alive: bool) -> Instance:
        paths = self._paths(record.external_id)
        access = SshAccess(record.ip, 22, record.user, str(paths.key), str(paths.known_hosts))
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

    # ---- the bridge

    def remove_network(self, force: bool = False) -> None:
        """Delete this provider's bridge and NAT rules.

        Refuses while nodes (of any cluster) are attached to the bridge, unless `force`.
        """
        if self.bridge_ports() and not force:
            raise DriverError(
                f"bridge {self.network.bridge} still has {len(self.bridge_ports())}"
                " node(s) attached"
            )
        localnet.remove_bridge(self.network)
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


def _overlay_available() -> bool:
    try:
        with open("/proc/filesystems") as filesystems:
            if any(line.split()[-1] == "overlay" for line in filesystems if line.strip()):
                return True
    except OSError:
        return False
    # Not loaded yet is fine if the module exists: the first mount loads it.
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/fs/overlayfs").glob("overlay.ko*"))


def _lookup_user(root: Path, user: str) -> tuple[int, int, str]:
    """uid, gid and home of `user` from the image's /etc/passwd."""
    passwd = _inside(root, "/etc/passwd")
    try:
        lines = passwd.read_text().splitlines()
    except OSError as exc:
        raise DriverError(f"cannot read the image's /etc/passwd: {exc}") from exc
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 6 and fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5] or "/"
    raise DriverError(f"user {user!r} does not exist in the image")


def _allow_key_login(root: Path, user: str) -> None:
    """Turn a locked password ('!...', as useradd leaves it) into no password ('*').

    Without PAM, sshd refuses every login to a locked account, keys included; '*'
    still allows no password login, so key-only access is all this opens.
    """
    shadow = _inside(root, "/etc/shadow")
    if shadow.is_symlink():
        return
    try:
        lines = shadow.read_text().splitlines(keepends=True)
        stat = shadow.stat()
    except OSError:
        return
    for i, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == user and fields[1].startswith("!"):
            fields[1] = "*"
            lines[i] = ":".join(fields)
            _write(shadow, "".join(lines), stat.st_mode & 0o7777, stat.st_uid, stat.st_gid)
            return
