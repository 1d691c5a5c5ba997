"""Builds imported as AMIs: the raw disk put in S3 (its SHA-256 checked by S3 on
receipt), imported as an EBS snapshot (import-snapshot, as the `vmimport` role),
registered as an AMI, both tagged as ours; the S3 object deleted once imported. An
AMI is deleted with its snapshots, found by our tags.

The steps wait on AWS between calls; each call runs on the driver's worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from freshpool.config.clouds import AwsSettings
from freshpool.drivers.aws.ec2 import code_of, driver_error
from freshpool.drivers.base import DriverError
from freshpool.drivers.cloud.calls import Blocking

log = logging.getLogger("freshpool.drivers.aws")
_ROOT = "/dev/xvda"
_POLL_FIRST, _POLL_MAX = 1.0, 15.0
_IMPORT_FAILED = ("deleting", "deleted", "error")


class Amis:
    def __init__(self, provider: str, settings: AwsSettings, ec2: Any, s3: Any,
                 calls: Blocking) -> None:  # fmt: skip
        self.provider = provider
        self.settings = settings
        self.ec2 = ec2
        self.s3 = s3
        self.calls = calls

    def _call(self, what: str, call: Any, **params: Any) -> Generator[float, None, Any]:
        try:
            return (yield from self.calls.call(call, **params))
        except Exception as exc:
            raise driver_error(self.provider, what, exc) from None

    def upload(self, raw: Path, name: str, tags: dict[str, str]) -> Generator[float, None, str]:
        """Steps to the AMI's id."""
        bucket, key = str(self.settings.image_bucket), f"freshpool/{name}.raw"
        yield from self._put(raw, bucket, key)
        try:
            snapshot = yield from self._import(bucket, key, name, tags)
        finally:
            yield from self._call("DeleteObject", self.s3.delete_object, Bucket=bucket, Key=key)
        try:
            ami = yield from self._register(snapshot, name, tags)
        except BaseException:
            yield from self._call("DeleteSnapshot", self.ec2.delete_snapshot, SnapshotId=snapshot)
            raise
        log.info("provider %s: registered %s as %s", self.provider, name, ami)
        return ami

    def _put(self, raw: Path, bucket: str, key: str) -> Generator[float, None, None]:
        extra = {"ChecksumAlgorithm": "SHA256"}
        where = f"s3://{bucket}/{key}"
        yield from self._call(f"put {where}", self.s3.upload_file, Filename=str(raw),
                              Bucket=bucket, Key=key, ExtraArgs=extra)  # fmt: skip
        head = yield from self._call("HeadObject", self.s3.head_object, Bucket=bucket, Key=key)
        sent, held = raw.stat().st_size, int(head["ContentLength"])
        if held != sent:
            raise DriverError(f"provider {self.provider}: {where} holds {held} bytes, sent {sent}")

    def _import(self, bucket: str, key: str, name: str,
                tags: dict[str, str]) -> Generator[float, None, str]:  # fmt: skip
        """Steps to the imported snapshot's id, waiting on the import task."""
        tagged = [{"ResourceType": "import-snapshot-task", "Tags": _tags(tags)}]
        task = yield from self._call(
            "ImportSnapshot", self.ec2.import_snapshot, Description=name,
            DiskContainer={"Description": name, "Format": "RAW",
                           "UserBucket": {"S3Bucket": bucket, "S3Key": key}},
            RoleName=self.settings.import_role, TagSpecifications=tagged)  # fmt: skip
        task_id = str(task["ImportTaskId"])
        deadline, pause = time.monotonic() + self.settings.upload_timeout, _POLL_FIRST
        while True:
            reply = yield from self._call("DescribeImportSnapshotTasks",
                                          self.ec2.describe_import_snapshot_tasks,
                                          ImportTaskIds=[task_id])  # fmt: skip
            detail = reply["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]
            status = str(detail.get("Status", ""))
            if status == "completed":
                return str(detail["SnapshotId"])
            if status in _IMPORT_FAILED:
                why = detail.get("StatusMessage") or status
                raise DriverError(f"provider {self.provider}: import of {name} failed: {why}")
            if time.monotonic() > deadline:
                yield from self._call("CancelImportTask", self.ec2.cancel_import_task,
                                      ImportTaskId=task_id)  # fmt: skip
                raise DriverError(f"provider {self.provider}: import of {name} not done in"
                                  f" {self.settings.upload_timeout:.0f} s ({status})")  # fmt: skip
            yield pause
            pause = min(pause * 2, _POLL_MAX)

    def _register(self, snapshot: str, name: str,
                  tags: dict[str, str]) -> Generator[float, None, str]:  # fmt: skip
        yield from self._call("CreateTags", self.ec2.create_tags, Resources=[snapshot],
                              Tags=_tags(tags))  # fmt: skip
        ebs = {"SnapshotId": snapshot, "DeleteOnTermination": True, "VolumeType": "gp3"}
        reply = yield from self._call(
            "RegisterImage", self.ec2.register_image, Name=name, Architecture="x86_64",
            VirtualizationType="hvm", EnaSupport=True, RootDeviceName=_ROOT,
            BlockDeviceMappings=[{"DeviceName": _ROOT, "Ebs": ebs}])  # fmt: skip
        ami = str(reply["ImageId"])
        yield from self._call("CreateTags", self.ec2.create_tags, Resources=[ami],
                              Tags=_tags(tags))  # fmt: skip
        return ami

    def delete(self, ami: str) -> Generator[float, None, None]:
        """Steps deregistering the AMI and deleting its snapshots; a missing one is no error."""
        try:
            found = yield from self.calls.call(self.ec2.describe_images, ImageIds=[ami])
        except Exception as exc:
            if "InvalidAMIID" in code_of(exc):
                return
            raise driver_error(self.provider, "DescribeImages", exc) from None
        images = found.get("Images") or []
        if not images:
            return
        ours = {t["Key"]: t["Value"] for t in images[0].get("Tags") or []}
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in ours.items()
                   if k.startswith("freshpool-")]  # fmt: skip
        snapshots: dict[str, Any] = {}
        if "freshpool-build" in ours:  # else not ours: no snapshot is looked for
            snapshots = yield from self._call("DescribeSnapshots", self.ec2.describe_snapshots,
                                              OwnerIds=["self"], Filters=filters)  # fmt: skip
        yield from self._call("DeregisterImage", self.ec2.deregister_image, ImageId=ami)
        for snap in snapshots.get("Snapshots") or []:
            yield from self._call("DeleteSnapshot", self.ec2.delete_snapshot,
                                  SnapshotId=snap["SnapshotId"])  # fmt: skip


def _tags(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]
