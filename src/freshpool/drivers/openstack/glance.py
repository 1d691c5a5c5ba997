"""Builds uploaded to Glance: the disk (qcow2 or raw) with the image's kernel and
initramfs as images of their own, which the disk names (`kernel_id`, `ramdisk_id`,
`os_command_line`) so Nova boots it with no boot loader in the disk. What Glance
stored is checked against the local checksums; a mismatch is deleted, never booted.

Blocking calls, made on the driver's worker threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from freshpool.drivers.base import DriverError
from freshpool.drivers.cloud.disk import CMDLINE, Digests, digests
from freshpool.drivers.openstack.nova import driver_error
from freshpool.drivers.qemu.vmbase import VmBase

log = logging.getLogger("freshpool.drivers.openstack")


class Glance:
    def __init__(self, provider: str, conn: Any, disk_format: str, timeout: float) -> None:
        self.provider = provider
        self.conn = conn
        self.disk_format = disk_format
        self.timeout = timeout

    def upload(self, base: VmBase, disk: Path, name: str, tags: dict[str, str]) -> str:
        """The disk image's id once its kernel, initramfs and disk are all stored."""
        self._clear(name)
        made: list[str] = []
        try:
            kernel = self._store(f"{name}-kernel", base.kernel, "aki", "aki", tags)
            made.append(kernel)
            ramdisk = self._store(f"{name}-ramdisk", base.initrd, "ari", "ari", tags)
            made.append(ramdisk)
            boot = {"kernel_id": kernel, "ramdisk_id": ramdisk, "os_command_line": CMDLINE,
                    "min_disk": base.disk_gib}  # fmt: skip
            image = self._store(name, disk, self.disk_format, "bare", {**tags, **boot})
        except BaseException:
            for image_id in made:
                self._delete_one(image_id)
            raise
        return image

    def _store(self, name: str, path: Path, disk_format: str, container: str,
               properties: dict[str, Any]) -> str:  # fmt: skip
        local = digests(path)
        try:
            image = self.conn.image.create_image(
                name, filename=str(path), disk_format=disk_format, container_format=container,
                md5=local.md5, sha256=local.sha256, allow_duplicates=True, wait=True,
                timeout=self.timeout, **properties)  # fmt: skip
        except Exception as exc:
            raise driver_error(self.provider, f"upload image {name}", exc) from None
        try:
            _check(name, self.conn.image.get_image(image.id), local)
        except BaseException:
            self._delete_one(image.id)
            raise
        log.info("provider %s: stored %s in Glance as %s", self.provider, name, image.id)
        return str(image.id)

    def _clear(self, name: str) -> None:
        """What an earlier try cut off by a restart left under these names (the names
        carry the build id, so only ours match)."""
        for part in (name, f"{name}-kernel", f"{name}-ramdisk"):
            try:
                found = [image.id for image in self.conn.image.images(name=part)]
            except Exception as exc:
                raise driver_error(self.provider, f"list images {part}", exc) from None
            for image_id in found:
                log.info("provider %s: deleting image %s left by an earlier upload",
                         self.provider, image_id)  # fmt: skip
                self._delete_one(image_id)

    def delete(self, image_id: str) -> None:
        """The disk image and the kernel and initramfs it names; a missing one is no error."""
        try:
            image = self.conn.image.find_image(image_id, ignore_missing=True)
        except Exception as exc:
            raise driver_error(self.provider, f"find image {image_id}", exc) from None
        if image is None:
            return
        properties = dict(image.properties or {})
        for part in (image.kernel_id or properties.get("kernel_id"),
                     image.ramdisk_id or properties.get("ramdisk_id")):  # fmt: skip
            if part:
                self._delete_one(str(part))
        self._delete_one(image_id)

    def _delete_one(self, image_id: str) -> None:
        try:
            self.conn.image.delete_image(image_id, ignore_missing=True)
        except Exception as exc:
            raise driver_error(self.provider, f"delete image {image_id}", exc) from None


def _check(name: str, stored: Any, local: Digests) -> None:
    """What Glance says it holds is the file we sent, by size and by every checksum
    it reports."""
    problems = []
    if stored.status != "active":
        problems.append(f"status {stored.status}")
    if stored.size is not None and int(stored.size) != local.size:
        problems.append(f"size {stored.size}, sent {local.size}")
    if stored.checksum and stored.checksum != local.md5:
        problems.append(f"md5 {stored.checksum}, sent {local.md5}")
    algorithm, value = stored.hash_algo, stored.hash_value
    if algorithm and value and local.of(algorithm) not in (None, value):
        problems.append(f"{algorithm} {value[:16]}..., sent {str(local.of(algorithm))[:16]}...")
    if problems:
        raise DriverError(f"Glance stored image {name} wrongly: {'; '.join(problems)}")
