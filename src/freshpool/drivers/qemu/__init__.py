"""The qemu driver: nodes as QEMU VMs on this host (see driver.py)."""

from freshpool.drivers.qemu.driver import QEMU_OVERHEAD_MIB, QemuDriver
from freshpool.drivers.qemu.machine import QEMU
from freshpool.drivers.qemu.records import node_accel

__all__ = ["QEMU", "QEMU_OVERHEAD_MIB", "QemuDriver", "node_accel"]
