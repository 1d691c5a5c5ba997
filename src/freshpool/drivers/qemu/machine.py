"""How QEMU is started for a VM node: its command line (accelerator, size, disks, restricted
network, QMP socket) and the loopback port its SSH forward listens on."""

from __future__ import annotations

import socket

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


def qemu_argv(record: NodeRecord, base: VmBase, outbound: bool) -> list[str]:
    """QEMU's command line for a node; relative paths are in the node dir."""
    if record.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", f"tcg,thread=multi,tb-size={TCG_CACHE_MIB}", "-cpu", "max"]
    restrict = "off" if outbound else "on"
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


def free_loopback_port(taken: set[int]) -> int:
    """A loopback port free now and not in `taken` (promised to another node)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            return port
    raise DriverError("no free loopback port for the VM's SSH forward")
