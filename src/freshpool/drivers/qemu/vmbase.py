"""VM bases: an image build's layers turned into a bootable qcow2 disk, next to the
image's own kernel and initramfs, which every VM node boots through a thin overlay."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from freshpool.drivers.base import DriverError
from freshpool.drivers.host import mounts
from freshpool.drivers.host.tools import Command, tool

BASE_FILE = "base.json"
DISK = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
# Where the node's PID 1 lives inside the base; the kernel command line names it.
INIT_PATH = "usr/lib/freshpool/init"
FS_LABEL = "freshpool-root"

# What the VM's init needs from the image, and the Debian package that provides it.
GUEST_NEEDS = {
    "usr/sbin/sshd": "openssh-server",
    "bin/ip": "iproute2",
    "sbin/modprobe": "kmod",
    "bin/tar": "tar",
    "bin/dd": "coreutils",
    "bin/mountpoint": "util-linux",
}
_KERNEL_NAME = re.compile(r"^vmlinuz-(.+)$")


@dataclass(frozen=True)
class VmBase:
    """A built base: <dir>/disk.qcow2, vmlinuz, initrd.img and base.json."""

    dir: Path
    build_id: str
    image: str
    kernel_version: str
    # sha256 of the kernel file: what the accelerator probe's decision depends on.
    kernel_digest: str
    disk_gib: int
    created: float
    parent_build: str = ""

    @property
    def disk(self) -> Path:
        return self.dir / DISK

    @property
    def kernel(self) -> Path:
        return self.dir / KERNEL

    @property
    def initrd(self) -> Path:
        return self.dir / INITRD

    @classmethod
    def load(cls, directory: Path) -> VmBase | None:
        """The base in `directory`, or None if it holds no complete base."""
        try:
            data = json.loads((directory / BASE_FILE).read_text())
            data.pop("dir", None)
            base = cls(dir=Path(directory), **data)
        except (OSError, ValueError, TypeError):
            return None
        if not (base.disk.is_file() and base.kernel.is_file() and base.initrd.is_file()):
            return None
        return base

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "dir"}
        tmp = self.dir / f"{BASE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        # base.json last and by rename: it marks the base complete.
        os.replace(tmp, self.dir / BASE_FILE)


def init_script() -> str:
    """The VM's PID 1 (init.sh beside this module, shipped as package data)."""
    return resources.files("freshpool.drivers.qemu").joinpath("init.sh").read_text()


def kernel_version_key(version: str) -> list[int | str]:
    """Sort key for kernel versions: 6.1.0-10 after 6.1.0-9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(root: Path) -> tuple[Path, Path, str]:
    """The newest kernel in the image's /boot that has an initramfs beside it."""
    boot = root / "boot"
    try:
        names = os.listdir(boot)
    except OSError:
        names = []
    versions = [m.group(1) for n in names if (m := _KERNEL_NAME.match(n))]
    for version in sorted(versions, key=kernel_version_key, reverse=True):
        kernel, initrd = boot / f"vmlinuz-{version}", boot / f"initrd.img-{version}"
        if kernel.is_file() and initrd.is_file():
            return kernel, initrd, version
    if versions:
        raise DriverError(
            f"the image has kernel(s) {', '.join(sorted(versions))} in /boot but no"
            " initrd.img beside them: install initramfs-tools in it"
        )
    raise DriverError(
        "the image has no kernel in /boot: add linux-image-amd64 to its packages to boot it as a VM"
    )


def missing_in_guest(root: Path) -> list[str]:
    """What the VM's init would miss in the image, as 'path (package)'."""
    missing = []
    for path, package in GUEST_NEEDS.items():
        # usrmerge: /bin is a link to /usr/bin; look in both as the guest would.
        found = any(os.path.lexists(root / p) for p in (path, f"usr/{path}"))
        if not found:
            missing.append(f"/{path} ({package})")
    return missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build(
    layers: Sequence[Path],
    target: Path,
    *,
    build_id: str,
    image: str,
    disk_gib: int,
) -> Generator[float, None, VmBase]:
    """Steps that make `target` a base from read-only image layers (top first).

    The layers are stacked read-only under a tiny layer holding the VM's init, and
    the merged tree becomes an ext4 file system (mkfs.ext4 -d) in a sparse raw file
    of `disk_gib` GiB, then a qcow2. Nothing is written into the layers. On failure
    nothing is left at `target`.
    """
    if not layers:
        raise DriverError(f"build {build_id}: no image layers given")
    for layer in layers:
        if not Path(layer).is_dir():
            raise DriverError(f"build {build_id}: image layer {layer} is not a directory")
    if os.path.lexists(target):
        raise DriverError(f"build {build_id}: {target} already exists")
    partial = target.with_name(f"{target.name}.partial")
    if os.path.lexists(partial):
        yield from Command([tool("rm"), "-rf", "--one-file-system", "--", str(partial)]).wait()
    partial.mkdir(parents=True)
    try:
        base = yield from _build_into(layers, partial, build_id, image, disk_gib)
        os.rename(partial, target)
    except BaseException:
        mounts.unmount(partial / "root", detach=True)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return VmBase.load(target) or base


def _build_into(
    layers: Sequence[Path], partial: Path, build_id: str, image: str, disk_gib: int
) -> Generator[float, None, VmBase]:
    extra, merged, raw = partial / "extra", partial / "root", partial / "disk.raw"
    init = extra / INIT_PATH
    init.parent.mkdir(parents=True)
    init.write_text(init_script())
    init.chmod(0o755)
    merged.mkdir()
    lower = ":".join(str(Path(p).absolute()) for p in (extra, *layers))
    if any(c in lower for c in ",\\"):
        raise DriverError(f"build {build_id}: layer paths may not contain ',' or '\\'")
    # A read-only overlay with no upper dir: whiteouts in the layers are honoured
    # and nothing can be written into them.
    mount = ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(merged)]
    yield from Command([tool(mount[0]), *mount[1:]]).wait()
    try:
        kernel, initrd, version = find_kernel(merged)
        missing = missing_in_guest(merged)
        if missing:
            raise DriverError(
                f"image {image} cannot boot as a VM node: it lacks {', '.join(missing)}"
            )
        yield from Command([tool("cp"), str(kernel), str(partial / KERNEL)]).wait()
        yield from Command([tool("cp"), str(initrd), str(partial / INITRD)]).wait()
        with open(raw, "wb") as handle:
            handle.truncate(disk_gib * 2**30)
        mkfs = [tool("mkfs.ext4"), "-q", "-F", "-L", FS_LABEL, "-m", "0", "-d", str(merged)]
        yield from Command([*mkfs, str(raw)]).wait()
    finally:
        mounts.unmount(merged)
    merged.rmdir()
    shutil.rmtree(extra)
    convert = [tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw)]
    yield from Command([*convert, str(partial / DISK)]).wait()
    raw.unlink()
    base = VmBase(
        dir=partial,
        build_id=build_id,
        image=image,
        kernel_version=version,
        kernel_digest=_sha256(partial / KERNEL),
        disk_gib=disk_gib,
        created=time.time(),
    )
    base.save()
    return base


def flatten(
    overlay: Path, parent: VmBase, target: Path, *, build_id: str, node: str
) -> Generator[float, None, VmBase]:
    """Steps that make `target` a new, independent base from a VM's overlay on `parent`.

    `qemu-img convert` reads through the backing chain into a standalone qcow2;
    `qemu-img commit` would write into the shared parent, and a rebase would tie the
    new base's life to the parent's.
    """
    if os.path.lexists(target):
        raise DriverError(f"{target} already exists: commit into a new build")
    partial = target.with_name(f"{target.name}.partial")
    if os.path.lexists(partial):
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        convert = [tool("qemu-img"), "convert", "-O", "qcow2", str(overlay)]
        yield from Command([*convert, str(partial / DISK)]).wait()
        for name in (KERNEL, INITRD):
            yield from Command([tool("cp"), str(parent.dir / name), str(partial / name)]).wait()
        VmBase(
            dir=partial,
            build_id=build_id,
            image=parent.image,
            kernel_version=parent.kernel_version,
            kernel_digest=parent.kernel_digest,
            disk_gib=parent.disk_gib,
            created=time.time(),
            parent_build=parent.build_id,
        ).save()
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    base = VmBase.load(target)
    if base is None:
        raise DriverError(f"the committed base at {target} is incomplete (node {node})")
    return base
