"""How QEMU is started for a VM node: its command line (accelerator, size, disks, restricted
network, QMP socket) and the loopback port its SSH forward listens on."""

from __future__ import annotations

import socket
import sys

from freshpool.config import LocalNetwork
from freshpool.drivers.base import DriverError
from freshpool.drivers.host.tools import tool
from freshpool.drivers.qemu.records import QMP_SOCKET, NodeRecord
from freshpool.drivers.qemu.vmbase import INIT_PATH, VmBase

QEMU = "qemu-system-x86_64"
# /proc/PID/comm holds the first 15 bytes of the program name.
PROCESS_NAME = QEMU[:15]
# TCG's translated-code cache; QEMU's default (1 GiB) would count against the host.
TCG_CACHE_MIB = 128
KERNEL_ARGS = (
    f"root=/dev/vda ro rootfstype=ext4 console=ttyS0 net.ifnames=0 panic=-1 quiet init=/{INIT_PATH}"
)


# Where a VM reaches the listed host ports: QEMU's user-mode network forwards
# `host-ports` from here to the host's loopback (restrict=on lets nothing else through;
# QEMU refuses a forward on the host's own address, 10.0.2.2).
GUEST_HOST = "10.0.2.100"
RELAY = "freshpool.drivers.qemu.relay"


def netdev_of(port: int, network: LocalNetwork) -> str:
    """The VM's user-mode network: sshd forwarded from loopback (and from the published
    address on the same port), the listed host ports forwarded in, nothing else unless
    `outbound`."""
    parts = ["user", "id=net0", f"restrict={'off' if network.outbound else 'on'}",
             f"hostfwd=tcp:127.0.0.1:{port}-:22"]  # fmt: skip
    if network.publish is not None:
        parts.append(f"hostfwd=tcp:{network.publish}:{port}-:22")
    # One relay process per connection (a tcp: chardev would connect once, at start).
    parts += [
        f"guestfwd=tcp:{GUEST_HOST}:{p}-cmd:{sys.executable} -m {RELAY} 127.0.0.1 {p}"
        for p in sorted(set(network.host_ports))
    ]
    return ",".join(parts)


def qemu_argv(record: NodeRecord, base: VmBase, network: LocalNetwork) -> list[str]:
    """QEMU's command line for a node; relative paths are in the node dir."""
    if record.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", f"tcg,thread=multi,tb-size={TCG_CACHE_MIB}", "-cpu", "max"]
    netdev = netdev_of(record.port, network)
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
        "-sandbox", "on,obsolete=deny,resourcecontrol=deny"
        # A forwarded host port starts a relay per connection: it needs fork and exec,
        # and dies under elevateprivileges=deny (its seccomp filter is inherited).
        + ("" if network.host_ports else ",elevateprivileges=deny,spawn=deny"),
    ]  # fmt: skip


def free_loopback_port(taken: set[int]) -> int:
    """A loopback port free now and not in `taken` (promised to another node)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            return port
    raise DriverError("no free loopback port for the VM's SSH forward")
