"""Builds uploaded to Glance by the openstack driver, through the real openstacksdk
against the fake cloud (tests/drivers/openstack/): its Glance stores what is sent
and reports checksums of what it stored, and its Nova refuses a server whose image
names a kernel or ramdisk that is not an active aki/ari image, as Nova's libvirt
driver needs them. No server boots the uploaded disk here (the fake's servers do not
boot images); the disk is the qemu driver's VM base, which boots under QEMU in
tests/drivers/test_qemu.py.
"""

# ruff: noqa: F401, F811 - pytest fixtures imported from the driver's own tests
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import openstack
import pytest

from freshpool.config import parse
from freshpool.core.states import BuildState, UploadState
from freshpool.drivers.base import DriverError, ImageUpload
from freshpool.drivers.cloud.disk import CMDLINE
from freshpool.drivers.openstack import OpenStackDriver
from freshpool.launcher.uploads import Uploads
from freshpool.store import Store
from tests.drivers.cloud_support import node_spec
from tests.drivers.openstack.fake_cloud import FakeCloud
from tests.drivers.test_openstack import (  # fixtures are used by name
    CLUSTER,
    cloud,
    make_driver,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a VM base is made from mounted layers")
MakeDriver = Callable[..., OpenStackDriver]


def ours(cloud: FakeCloud, build_id: str) -> dict[str, dict[str, object]]:
    with cloud.lock:
        return {i: dict(d) for i, d in cloud.images.items() if d.get("freshpool-build") == build_id}


def upload_of(vm_image: Path, build_id: str = "b1") -> ImageUpload:
    return ImageUpload(build_id, "debian-vm", (vm_image / "rootfs",), labels=("debian",))


def test_a_build_is_uploaded_with_its_kernel_booted_from_and_deleted_whole(
    cloud: FakeCloud, make_driver: MakeDriver, vm_image: Path
) -> None:
    driver = make_driver(image=None, image_disk_size=2)
    # A try cut off by a restart left a part under the build's name: it goes first.
    conn = openstack.connect(cloud="fake")
    stale = conn.image.create_image(
        f"freshpool-{CLUSTER}-debian-vm-b1-kernel", data=b"half", disk_format="aki",
        container_format="aki")  # fmt: skip

    image_id = driver.upload_image(upload_of(vm_image)).wait(600)

    parts = ours(cloud, "b1")
    assert stale.id not in cloud.images
    disk = parts[image_id]
    assert disk["name"] == f"freshpool-{CLUSTER}-debian-vm-b1"
    assert (disk["disk_format"], disk["status"], disk["min_disk"]) == ("qcow2", "active", 2)
    assert disk["os_command_line"] == CMDLINE
    assert disk["freshpool-cluster"] == CLUSTER and disk["freshpool-provider"] == "os"
    kernel, ramdisk = parts[str(disk["kernel_id"])], parts[str(disk["ramdisk_id"])]
    assert (kernel["disk_format"], ramdisk["disk_format"]) == ("aki", "ari")
    # What Glance holds is the image's own kernel, byte for byte.
    boot = vm_image / "rootfs" / "boot"
    vmlinuz = next(p for p in boot.iterdir() if p.name.startswith("vmlinuz-"))
    assert cloud.image_data[str(kernel["id"])] == vmlinuz.read_bytes()
    assert not (driver.disks / "b1").exists(), "the local copy is removed once uploaded"

    # A node of a label with no cloud image boots the upload.
    spec = dataclasses.replace(node_spec(CLUSTER, 1), image_external_id=image_id)
    node = driver.create(spec).wait(60)
    with cloud.lock:
        assert cloud.servers[node.external_id]["image"]["id"] == image_id
    driver.delete(node.external_id).wait(60)

    driver.delete_image(image_id).wait(60)
    assert ours(cloud, "b1") == {}


def test_what_glance_stored_wrongly_is_deleted_and_the_upload_fails(
    cloud: FakeCloud, make_driver: MakeDriver, vm_image: Path
) -> None:
    cloud.corrupt_uploads = True
    driver = make_driver(image=None, image_disk_size=2)
    with pytest.raises(DriverError, match=r"Glance stored image .*-kernel wrongly: md5 "):
        driver.upload_image(upload_of(vm_image)).wait(600)
    assert ours(cloud, "b1") == {}


def test_an_image_without_cloud_init_is_refused_and_cloud_images_need_no_upload(
    cloud: FakeCloud, make_driver: MakeDriver, image_rootfs: Path
) -> None:
    driver = make_driver(image=None)
    plain = ImageUpload("b2", "debian-bookworm", (image_rootfs,), labels=("debian",))
    with pytest.raises(DriverError, match=r"lacks /usr/bin/cloud-init \(cloud-init\)"):
        driver.upload_image(plain).wait(60)
    # A label that names its cloud image boots that: nothing is uploaded for it.
    named = make_driver(image=None, images={"debian": "debian-12-generic-amd64"})
    op = named.upload_image(plain)
    assert op.done and op.result == "" and ours(cloud, "b2") == {}


def test_the_uploads_table_tracks_an_upload_and_its_delete_with_the_build(
    cloud: FakeCloud, vm_image: Path, tmp_path: Path
) -> None:
    config = parse(f"""
state-dir: {tmp_path / "state"}
providers:
  - name: os
    driver: openstack
    openstack: {{cloud: fake, flavor: {{name: m1.small}}, networks: [private],
                image-disk-size: 2}}
labels: [{{name: debian, image: debian-vm}}]
images: [{{name: debian-vm}}]
""", "uploads.yaml")  # fmt: skip
    store = Store.open(config.state_dir)
    build = store.new_build("vm-1", "debian-vm", str(vm_image))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "prebuilt")
    driver = OpenStackDriver(config.providers[0], store.cluster_id, tmp_path / "os")
    uploads = Uploads(config, store, {"os": driver})

    def settle(done: Callable[[], bool]) -> None:
        for _ in range(6000):
            uploads.keep()
            uploads.advance()
            if done():
                return
            time.sleep(min(0.1, max(0.0, uploads.not_before() - time.monotonic())))
        raise AssertionError(f"uploads did not settle: {store.uploads()}")

    settle(lambda: [u.state for u in store.uploads()] == [UploadState.READY])
    (row,) = store.uploads()
    assert row.provider == "os" and row.external_id in ours(cloud, "vm-1")

    store.build_transition(build.id, BuildState.READY, BuildState.DELETED, "test")
    settle(lambda: store.uploads() == [])
    assert ours(cloud, "vm-1") == {}
