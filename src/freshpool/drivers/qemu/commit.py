"""Committing a held VM node: its disk folded with its base into a new standalone base,
under a lock that delete waits for."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Generator
from pathlib import Path

import freshpool.drivers.qemu.vmbase as vmbase
from freshpool.drivers.base import DriverError
from freshpool.drivers.qemu.records import COMMIT_LOCK, NodePaths, NodeRecord
from freshpool.drivers.qemu.vmbase import VmBase

# The logger keeps the name it had when the driver was one module.
log = logging.getLogger("freshpool.drivers.qemu")


def commit_steps(
    provider: str,
    external_id: str,
    paths: NodePaths,
    target: Path,
    build_id: str,
    shut_down: Callable[[NodeRecord], Generator[float, None, bool]],
    powerdown_timeout: float,
) -> Generator[float, None, Path]:
    """Steps that fold a node's disk into a new base at `target`; the result is its qcow2.

    `shut_down(record)` stops the VM through ACPI and says whether it went down by
    itself (its file system must be clean); if it did not, nothing is committed.
    """
    record = NodeRecord.load(paths.record)
    if record is None or not paths.overlay.is_file():
        raise DriverError(f"{external_id}: no such VM node on provider {provider}")
    parent = VmBase.load(Path(record.base))
    if parent is None:
        raise DriverError(f"{external_id}: its base {record.base} is gone")
    with open(paths.dir / COMMIT_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DriverError(f"{external_id}: another commit of it is running") from None
        clean = yield from shut_down(record)
        if not clean:
            raise DriverError(
                f"{external_id}: the VM did not shut down within"
                f" {powerdown_timeout:g} s of an ACPI power button press;"
                " not committing a disk that may be inconsistent"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        base = yield from vmbase.flatten(
            paths.overlay, parent, target, build_id=build_id, node=external_id
        )
    log.info("%s: disk committed as build %s at %s", external_id, build_id, base.dir)
    return base.disk


def commit_running(node_dir: Path) -> bool:
    """Whether a commit holds the node's commit lock now."""
    try:
        handle = open(node_dir / COMMIT_LOCK)  # noqa: SIM115 - closed below
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
