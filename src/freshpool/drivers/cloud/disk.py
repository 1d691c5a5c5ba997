"""A build as a disk a cloud boots: the qemu driver's VM base (the build's layers as
one ext4 root file system in a qcow2, the image's kernel and initramfs beside it),
made once per build in the provider's directory and removed once uploaded.

A cloud's server boots the image's own init, not the qemu driver's: there cloud-init
reads the cloud's metadata (network, the node's SSH key) and prints the host keys
on the console the driver pins them from. So the image must carry cloud-init.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import freshpool.drivers.qemu.vmbase as vmbase
from freshpool.drivers.base import DriverError, ImageUpload
from freshpool.drivers.host.tools import Command, tool
from freshpool.drivers.qemu.vmbase import VmBase

# What a cloud boot needs of the image beside what the VM base checks, and the
# Debian package that provides it.
CLOUD_NEEDS = {"usr/bin/cloud-init": "cloud-init", "sbin/init": "systemd-sysv"}
# The kernel command line of an uploaded build, for clouds that boot a kernel and
# initramfs given beside the disk (no boot loader is in the disk).
CMDLINE = "root=/dev/vda ro rootfstype=ext4 console=ttyS0 net.ifnames=0"


@dataclass(frozen=True)
class Digests:
    """A file's size and checksums, to compare with what the cloud says it stored."""

    size: int
    md5: str
    sha256: str
    sha512: str

    def of(self, algorithm: str) -> str | None:
        return {"md5": self.md5, "sha256": self.sha256, "sha512": self.sha512}.get(algorithm)


def missing_for_cloud(layers: tuple[Path, ...]) -> list[str]:
    """What a cloud boot would miss in the image's layers, as 'path (package)'."""
    missing = []
    for path, package in CLOUD_NEEDS.items():
        # usrmerge: /sbin is a link to /usr/sbin; look in both as the guest would.
        candidates = (path, path.removeprefix("usr/"), f"usr/{path}")
        if not any(os.path.lexists(layer / p) for layer in layers for p in candidates):
            missing.append(f"/{path} ({package})")
    return missing


def cloud_disk(upload: ImageUpload, work: Path, disk_gib: int) -> Generator[float, None, VmBase]:
    """Steps to the build's disk under `work` (made now, or left by an earlier try)."""
    missing = missing_for_cloud(upload.layers)
    if missing:
        raise DriverError(
            f"image {upload.image} cannot boot on a cloud: it lacks {', '.join(missing)};"
            " add them to its packages"
        )
    target = work / upload.build_id
    found = VmBase.load(target)
    if found is not None:
        return found
    if os.path.lexists(target):  # an incomplete base: made again
        shutil.rmtree(target)
    work.mkdir(parents=True, exist_ok=True)
    return (
        yield from vmbase.build(
            upload.layers, target, build_id=upload.build_id, image=upload.image, disk_gib=disk_gib
        )
    )


def raw_disk(base: VmBase) -> Generator[float, None, Path]:
    """Steps to a sparse raw copy of the base's disk beside it (for clouds that import raw)."""
    raw = base.dir / "disk.raw"
    if not raw.is_file():
        partial = base.dir / "disk.raw.partial"
        convert = [tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw"]
        yield from Command([*convert, str(base.disk), str(partial)]).wait()
        os.replace(partial, raw)
    return raw


def digests(path: Path) -> Digests:
    """Blocking: the file's size and checksums, read once."""
    md5, sha256, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha256(), hashlib.sha512()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            size += len(chunk)
            for digest in (md5, sha256, sha512):
                digest.update(chunk)
    return Digests(size, md5.hexdigest(), sha256.hexdigest(), sha512.hexdigest())


def remove_disk(work: Path, build_id: str) -> None:
    """The local copy is not needed once the cloud holds the build."""
    shutil.rmtree(work / build_id, ignore_errors=True)


def upload_name(cluster: str, upload: ImageUpload) -> str:
    """The cloud image's name: whose it is, the image, and the build it holds."""
    return f"freshpool-{cluster}-{upload.image}-{upload.build_id}"
