"""A qemu provider's VM bases and accelerator choices, each made once however many creates
wait for it."""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path

import freshpool.drivers.qemu.vmbase as vmbase
from freshpool.config import QemuSettings
from freshpool.drivers.base import DriverError, StepOperation
from freshpool.drivers.host.tools import tool
from freshpool.drivers.operations import follow
from freshpool.drivers.qemu.accel import AccelCache, AccelChoice, cache_key, probe
from freshpool.drivers.qemu.machine import QEMU
from freshpool.drivers.qemu.vmbase import VmBase

# The logger keeps the name it had when the driver was one module.
log = logging.getLogger("freshpool.drivers.qemu")


class VmImages:
    """The VM bases under a provider's images dir, and which accelerator their kernels get."""

    def __init__(
        self, provider: str, settings: QemuSettings, images_dir: Path, accel_cache: AccelCache
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.images_dir = images_dir
        self.accel_cache = accel_cache
        # Shared work, so concurrent creates of one build make its base and probe once.
        self._bases: dict[str, StepOperation[VmBase]] = {}
        self._probes: dict[str, StepOperation[AccelChoice]] = {}

    def base(
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
            log.info("provider %s: making the VM base of build %s", self.provider, build_id)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            steps = vmbase.build(
                layers, target, build_id=build_id, image=image, disk_gib=self.settings.disk_size
            )
            op = self._bases[build_id] = StepOperation(steps)
        try:
            return (yield from follow(op))
        finally:
            if op.done:
                self._bases.pop(build_id, None)

    def accel(self, base: VmBase) -> Generator[float, None, AccelChoice]:
        """KVM or TCG for the base's kernel: as configured, as cached, or probed now."""
        if self.settings.accel != "auto":
            return AccelChoice(self.settings.accel, "set in the provider's qemu.accel")
        qemu = tool(QEMU)
        key = cache_key(qemu, base.kernel_digest)
        cached = self.accel_cache.get(key)
        if cached is not None:
            return cached
        op = self._probes.get(key)
        if op is None:
            op = self._probes[key] = StepOperation(probe(qemu, base.kernel))
        try:
            choice = yield from follow(op)
        finally:
            if op.done:
                self._probes.pop(key, None)
        if choice.probed:
            self.accel_cache.put(key, choice)
            log.info(
                "provider %s: kernel %s runs under %s: %s",
                self.provider,
                base.kernel_version,
                choice.accel.upper(),
                choice.reason,
            )
        return choice
