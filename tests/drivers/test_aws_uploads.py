"""Builds imported as AMIs by the aws driver: the real boto3 client against moto's
server over loopback, the S3 object, snapshots, AMI and tags read back through the
S3 and EC2 APIs.

Emulated: moto has no VM import (ImportSnapshot, DescribeImportSnapshotTasks). Those
two calls are answered at boto3's `before-call` hook (as test_aws.py injects quotas)
by doing what AWS's import does with moto's real APIs: read the object from S3, make
an EBS snapshot of its size, and report the task active, then completed. Nothing
here proves EC2 would boot the disk.
"""

# ruff: noqa: F401, F811 - pytest fixtures imported from the driver's own tests
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

from freshpool.drivers.aws import AwsDriver
from freshpool.drivers.base import DriverError, DriverUnavailable, ImageUpload
from tests.drivers.cloud_support import node_spec
from tests.drivers.test_aws import (  # fixtures are used by name
    CLUSTER,
    REGION,
    described,
    ec2,
    make_driver,
    moto_url,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a VM base is made from mounted layers")
BUCKET = "fp-images"


class VmImport:
    """What AWS's VM import does, done with moto's own S3 and EC2 (see the module's doc)."""

    def __init__(self, moto_url: str, fail_with: str | None = None) -> None:
        self.s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)
        self.fail_with = fail_with
        self.tasks: dict[str, dict[str, Any]] = {}
        self.imported: dict[str, str] = {}  # the object's sha256 by snapshot
        self.params: dict[str, Any] = {}

    def install(self, client: Any) -> None:
        events = client.meta.events
        for operation, answer in (("ImportSnapshot", self._import),
                                  ("DescribeImportSnapshotTasks", self._describe)):  # fmt: skip
            # The call's own parameters come before they are serialized for the wire.
            events.register(f"before-parameter-build.ec2.{operation}", self._asked)
            events.register(f"before-call.ec2.{operation}", answer)

    def _asked(self, params: dict[str, Any], **_kw: Any) -> None:
        self.params = dict(params)

    def _import(self, **_kw: Any) -> Any:
        params = self.params
        source = params["DiskContainer"]["UserBucket"]
        body = self.s3.get_object(Bucket=source["S3Bucket"], Key=source["S3Key"])["Body"].read()
        task_id = f"import-snap-{len(self.tasks) + 1:08x}"
        detail: dict[str, Any] = {"Status": "active", "Progress": "10"}
        if self.fail_with is None:
            zone = self.ec2.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
            volume = self.ec2.create_volume(Size=-(-len(body) // 2**30), AvailabilityZone=zone)
            snapshot = self.ec2.create_snapshot(VolumeId=volume["VolumeId"])["SnapshotId"]
            self.ec2.delete_volume(VolumeId=volume["VolumeId"])
            self.imported[snapshot] = hashlib.sha256(body).hexdigest()
            detail["_then"] = {"Status": "completed", "SnapshotId": snapshot}
        else:
            detail["_then"] = {"Status": "deleted", "StatusMessage": self.fail_with}
        self.tasks[task_id] = detail
        return SimpleNamespace(status_code=200, headers={}), {"ImportTaskId": task_id}

    def _describe(self, **_kw: Any) -> Any:
        (task_id,) = self.params["ImportTaskIds"]
        detail = self.tasks[task_id]
        shown = {k: v for k, v in detail.items() if not k.startswith("_")}
        if "_then" in detail:  # active once, then what the import came to
            self.tasks[task_id] = detail["_then"]
        body = {"ImportSnapshotTasks": [{"ImportTaskId": task_id, "SnapshotTaskDetail": shown}]}
        return SimpleNamespace(status_code=200, headers={}), body


def ours(ec2: Any, build_id: str) -> tuple[list[str], list[str]]:
    """Our AMIs and snapshots of the build, by their tags."""
    tagged = [{"Name": "tag:freshpool-build", "Values": [build_id]}]
    amis = ec2.describe_images(Owners=["self"], Filters=tagged)["Images"]
    snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=tagged)["Snapshots"]
    return [a["ImageId"] for a in amis], [s["SnapshotId"] for s in snaps]


@pytest.fixture
def bucket(moto_url: str, ec2: Any) -> Any:
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
    s3.create_bucket(Bucket=BUCKET)
    return s3


def test_a_build_is_imported_as_a_tagged_ami_and_deleted_with_its_snapshot(
    make_driver: Callable[..., AwsDriver],
    ec2: Any,
    bucket: Any,
    moto_url: str,
    vm_image: Path,
) -> None:
    driver = make_driver(ami=None, image_bucket=BUCKET, image_disk_size=1)
    vm_import = VmImport(moto_url)
    vm_import.install(driver.ec2)
    upload = ImageUpload("b1", "debian-vm", (vm_image / "rootfs",), labels=("debian",))

    ami = driver.upload_image(upload).wait(900)

    (image,) = ec2.describe_images(ImageIds=[ami])["Images"]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image["Name"] == f"freshpool-{CLUSTER}-debian-vm-b1"
    assert tags["freshpool-build"] == "b1" and tags["freshpool-provider"] == "ec2"
    amis, snapshots = ours(ec2, "b1")
    assert amis == [ami] and len(snapshots) == 1
    assert snapshots[0] in vm_import.imported, "the snapshot is the one imported from S3"
    # S3 held the build's raw disk while it was imported, and nothing once done.
    assert bucket.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    assert not (driver.disks / "b1").exists()

    # A label with no AMI of its own boots the build's.
    spec = dataclasses.replace(node_spec(CLUSTER, 1), image_external_id=ami)
    node = driver.create(spec).wait(60)
    assert described(ec2, node.external_id)["ImageId"] == ami
    driver.delete(node.external_id).wait(60)

    driver.delete_image(ami).wait(60)
    assert ours(ec2, "b1") == ([], [])


def test_an_import_aws_refuses_fails_with_its_words_and_leaves_nothing(
    make_driver: Callable[..., AwsDriver],
    ec2: Any,
    bucket: Any,
    moto_url: str,
    vm_image: Path,
) -> None:
    driver = make_driver(ami=None, image_bucket=BUCKET, image_disk_size=1)
    VmImport(moto_url, fail_with="ClientError: Unknown OS / Missing OS files.").install(driver.ec2)
    upload = ImageUpload("b2", "debian-vm", (vm_image / "rootfs",), labels=("debian",))
    with pytest.raises(DriverError, match=r"import of .*b2 failed: ClientError: Unknown OS"):
        driver.upload_image(upload).wait(900)
    assert ours(ec2, "b2") == ([], [])
    assert bucket.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_labels_with_their_own_ami_upload_nothing_and_a_missing_bucket_is_named(
    make_driver: Callable[..., AwsDriver], image_rootfs: Path
) -> None:
    with pytest.raises(DriverUnavailable, match=r"provider ec2: check: .*404"):
        make_driver(ami=None, image_bucket="no-such-bucket").check()
    driver = make_driver(image_bucket=BUCKET)  # `ami` is set: every label has one
    op = driver.upload_image(ImageUpload("b3", "img", (image_rootfs,), labels=("debian",)))
    assert op.done and op.result == ""
