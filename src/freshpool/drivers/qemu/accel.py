"""KVM or TCG for a guest kernel: decided by a short probe boot under KVM, and cached.

/dev/kvm existing is not enough: on some hosts it is a paravirtual hypervisor (PVM)
that a stock guest kernel cannot use (QEMU aborts, or the guest hangs early in
boot). The probe boots the guest's kernel with no root file system under KVM; if
it reaches its "cannot mount root" panic, KVM runs that kernel. The answer holds
until the host reboots or QEMU or the kernel change, so it is cached by those.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

KVM_DEVICE = "/dev/kvm"
# Long enough for a stock kernel under KVM to reach its root-mount panic with time to
# spare; a guest that hangs under a hypervisor it cannot use never does.
PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 256
# What a kernel prints once its own start-up is complete and it looks for a root.
_REACHED_ROOT = (b"Kernel panic", b"VFS: Unable to mount root", b"Run /init")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str
    probed: bool = False
    # Seconds the probe took (0 when cached or not probed).
    seconds: float = 0.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cache_key(qemu: str, kernel_digest: str) -> str:
    """What the decision depends on: this boot of the host, the QEMU binary, the kernel."""
    try:
        st = os.stat(qemu)
        binary = f"{os.path.realpath(qemu)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        binary = qemu
    parts = [_boot_id(), os.uname().release, binary, kernel_digest]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def kvm_usable() -> str | None:
    """Why KVM cannot be tried at all here, or None if it can."""
    if not os.path.exists(KVM_DEVICE):
        return f"no {KVM_DEVICE} (the host has no hardware virtualisation for guests)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    return None


class AccelCache:
    """Probe decisions in a small JSON file, by cache key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> AccelChoice | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or entry.get("accel") not in ("kvm", "tcg"):
            return None
        return AccelChoice(str(entry["accel"]), f"cached: {entry.get('reason', '')}")

    def put(self, key: str, choice: AccelChoice) -> None:
        data = self._read()
        data[key] = {**asdict(choice), "at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def probe(
    qemu: str, kernel: Path, timeout: float = PROBE_TIMEOUT
) -> Generator[float, None, AccelChoice]:
    """Steps of one probe boot of `kernel` under KVM; never raises for a failed boot."""
    why_not = kvm_usable()
    if why_not is not None:
        return AccelChoice("tcg", why_not)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="freshpool-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", str(PROBE_MEMORY_MIB),
            "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 loglevel=1",
            "-serial", f"file:{serial}", "-no-reboot",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        pause = 0.01
        try:
            while proc.poll() is None and time.monotonic() - started < timeout:
                if _reached(serial):
                    break
                yield pause
                pause = min(pause * 2, 0.25)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
        seconds = round(time.monotonic() - started, 3)
        if _reached(serial):
            return AccelChoice(
                "kvm",
                f"a KVM probe boot of the guest kernel worked in {seconds:.1f} s",
                True,
                seconds,
            )
    errors = [line for line in stderr.strip().splitlines() if line.strip()]
    if errors:
        detail = f"QEMU under KVM failed: {errors[0].strip()}"
    else:
        detail = f"the guest kernel made no progress under KVM within {timeout:g} s"
    return AccelChoice("tcg", detail, True, seconds)


def _reached(serial: Path) -> bool:
    with contextlib.suppress(OSError):
        data = serial.read_bytes()
        return any(mark in data for mark in _REACHED_ROOT)
    return False
