"""`python -m bench.qemu`: what VM nodes cost on this host, with real QEMU.

Figures: making the VM base from image layers, a per-node qcow2 overlay, the KVM
probe, boot-to-SSH (under the accelerator the probe picks; TCG forced as well when
that is KVM), memory per VM (RSS of the QEMU process once SSH answers), and delete
(ACPI power button until QEMU is gone). Saved to bench/results/qemu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from freshpool.config import Provider
from freshpool.drivers import ssh
from freshpool.drivers.base import ImageUpload, NodeSpec, StepOperation
from freshpool.drivers.qemu import QEMU, QemuDriver
from freshpool.drivers.qemu.accel import probe as kvm_probe
from freshpool.drivers.qemu.vmbase import VmBase
from freshpool.images.debootstrap import build_cached
from tests.conftest import VM_IMAGE  # the tests' VM image: both share one cached build

RESULTS = Path(__file__).parent / "results" / "qemu.json"
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))


def provider(accel: str, memory: int) -> Provider:
    return Provider.model_validate(
        {
            "name": "bench-vms",
            "driver": "qemu",
            "boot-timeout": 600,
            "qemu": {"accel": accel, "memory": memory, "disk-size": 4},
        }
    )


def boot(driver: QemuDriver, node_id: int, base: str) -> dict[str, float]:
    spec = NodeSpec(
        node_id=node_id,
        cluster=driver.cluster,
        label="debian-vm",
        hostname=f"bench-{node_id}",
        build_id="bench",
        layers=(),
        image_external_id=base,
    )
    started = time.monotonic()
    instance = driver.create(spec).wait(900)
    to_ssh = time.monotonic() - started
    assert instance.access is not None
    job = ssh.run(instance.access, "true", timeout=120)
    if job.returncode != 0:
        raise SystemExit(f"the VM booted but a command failed: {job.stderr}")
    rss = psutil.Process(instance.details["pid"]).memory_info().rss / 2**20
    started = time.monotonic()
    driver.delete(instance.external_id).wait(300)
    return {
        "boot_to_ssh_s": round(to_ssh, 2),
        "rss_mib": round(rss, 1),
        "delete_s": round(time.monotonic() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=2, help="VM boots per accelerator")
    parser.add_argument("--memory", type=int, default=1024, help="MiB of guest RAM")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the VM base is made from mounted image layers")
    layers = (build_cached(VM_IMAGE, IMAGE_CACHE) / "rootfs",)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "guest_memory_mib": args.memory,
    }
    with tempfile.TemporaryDirectory(prefix="freshpool-bench-qemu-") as tmp:
        state = Path(tmp) / "providers" / "bench-vms"
        maker = QemuDriver(provider("tcg", args.memory), "bench", state)
        started = time.monotonic()
        upload = ImageUpload("bench", "debian-vm", layers)
        base_dir = maker.upload_image(upload).wait(900)
        results["base_build_s"] = round(time.monotonic() - started, 2)
        base = VmBase.load(Path(base_dir))
        assert base is not None
        results["base_qcow2_mib"] = round(base.disk.stat().st_size / 2**20, 1)

        times = []
        for i in range(20):
            overlay = Path(tmp) / f"overlay-{i}.qcow2"
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]
            began = time.perf_counter()
            subprocess.run([*argv, str(base.disk), str(overlay)], check=True)
            times.append(time.perf_counter() - began)
            overlay.unlink()
        results["overlay_create_ms"] = round(statistics.median(times) * 1000, 1)

        probe = StepOperation(kvm_probe(QEMU, base.kernel)).wait(60)
        results["kvm_probe"] = {"accel": probe.accel, "reason": probe.reason, "s": probe.seconds}
        print(f"KVM probe: {probe.accel} ({probe.reason})", file=sys.stderr)

        for accel in ["tcg"] + (["kvm"] if probe.accel == "kvm" else []):
            driver = QemuDriver(provider(accel, args.memory), "bench", state)
            runs = []
            for n in range(args.boots):
                runs.append(boot(driver, 100 * (accel == "kvm") + n + 1, base_dir))
                print(f"{accel} boot {n + 1}: {runs[-1]}", file=sys.stderr)
            results[accel] = {
                key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]
            }
            results[accel]["runs"] = runs
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"VM base from layers      {results['base_build_s']:8.2f} s"
        f"  ({results['base_qcow2_mib']:.0f} MiB qcow2)"
    )
    print(f"overlay creation         {results['overlay_create_ms']:8.1f} ms")
    print(f"KVM probe                {probe.seconds:8.2f} s   -> {probe.accel}")
    for accel in ("tcg", "kvm"):
        if accel in results:
            r = results[accel]
            print(f"{accel.upper()} boot-to-SSH          {r['boot_to_ssh_s']:8.2f} s")
            print(f"{accel.upper()} QEMU RSS per VM      {r['rss_mib']:8.1f} MiB")
            print(f"{accel.upper()} delete (ACPI)        {r['delete_s']:8.2f} s")
        else:
            print(
                f"{accel.upper()} boot-to-SSH               n/a (KVM does not run this guest here)"
            )
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
