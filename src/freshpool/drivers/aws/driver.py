"""The `aws` driver: each node an EC2 instance with our tags, booted from an AMI (or a
launch template), with IMDSv2 required, its own SSH key in its user data, and its
host key pinned from its console output.

Every boto3 call runs on the driver's worker threads (drivers/cloud/calls.py); the
launches and deletes waiting on EC2 share one DescribeInstances and one
TerminateInstances per pass between them. A label with no AMI of its own boots its
build, imported as an AMI (amis.py) when the provider has an `image-bucket`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

from freshpool.config import Provider
from freshpool.config.clouds import AwsSettings
from freshpool.drivers.aws.amis import Amis
from freshpool.drivers.aws.ec2 import (
    SPOT_REFUSED,
    clients,
    code_of,
    driver_error,
    instance_ids_in,
    tag_dict,
)
from freshpool.drivers.aws.quota import VcpuQuota
from freshpool.drivers.base import (
    DoneOperation,
    DriverError,
    DriverUnavailable,
    ImageUpload,
    Instance,
    NodeSpec,
    Operation,
    QuotaExceeded,
    StepOperation,
)
from freshpool.drivers.cloud.disk import cloud_disk, raw_disk, remove_disk, upload_name
from freshpool.drivers.cloud.driver import CloudDriver, Phase
from freshpool.drivers.cloud.keys import user_data

log = logging.getLogger("freshpool.drivers.aws")
_NOT_GONE = ["pending", "running", "stopping", "stopped", "shutting-down"]
_FILTER_MAX = 200  # values in one DescribeInstances filter
_SPOT = {
    "MarketType": "spot",
    "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
}


class AwsDriver(CloudDriver):
    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        if provider.aws is None:
            raise DriverUnavailable(f"provider {provider.name}: driver aws needs `aws:`")
        super().__init__(provider, cluster, state_dir, provider.aws.host_key_checking)
        self.settings: AwsSettings = provider.aws
        self.ec2, self.quotas, s3 = clients(self.settings)
        self.amis = Amis(provider.name, self.settings, self.ec2, s3, self.calls)
        self.disks = state_dir / "disks"
        types = sorted({t for label in self._labels() if (t := self.settings.type_for(label))})
        self.quota = VcpuQuota(provider.name, cluster, self.ec2, self.quotas,
                               self.settings.vcpu_quota_code, types, self.calls,
                               self.settings.quota_interval, self.settings.max_cores,
                               self.settings.max_ram)  # fmt: skip
        self._root_devices: dict[str, str] = {}

    def _labels(self) -> list[str]:
        """The labels this provider may launch; "" for any label that names no type."""
        named = [*self.settings.amis, *self.settings.instance_types]
        return [*(self.provider.labels or []), *named, ""]

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        """Credentials, AMIs, subnet, security groups, launch template and image bucket
        exist."""
        s = self.settings
        try:
            self.ec2.describe_availability_zones()
            amis = sorted({a for a in (s.ami, *s.amis.values()) if a})
            if amis:
                self._check_amis(amis)
            if s.subnet_id:
                self.ec2.describe_subnets(SubnetIds=[s.subnet_id])
            if s.security_group_ids:
                self.ec2.describe_security_groups(GroupIds=s.security_group_ids)
            if s.image_bucket:
                self.amis.s3.head_bucket(Bucket=s.image_bucket)
            if s.launch_template is not None:
                template = s.launch_template
                key = {"LaunchTemplateIds": [template.id]} if template.id else {
                    "LaunchTemplateNames": [template.name]}  # fmt: skip
                self.ec2.describe_launch_templates(**key)
        except DriverUnavailable:
            raise
        except Exception as exc:
            raise DriverUnavailable(str(driver_error(self.provider.name, "check", exc))) from None

    def _check_amis(self, amis: list[str]) -> None:
        try:
            found = {i["ImageId"] for i in self.ec2.describe_images(ImageIds=amis)["Images"]}
        except Exception as exc:
            if "InvalidAMIID" not in code_of(exc):
                raise
            found = set()
        if missing := [a for a in amis if a not in found]:
            raise DriverUnavailable(f"provider {self.provider.name}: no AMI {missing} in "
                                    f"{self.settings.region}")  # fmt: skip

    def _room(self) -> int | None:
        return self.quota.room()

    # ------------------------------------------------------------ images

    def serves_without_upload(self, label: str) -> bool:
        # A label that names its cloud image boots that, whatever its build's upload.
        return not self.settings.uploads_for((label,))

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        if not self.settings.uploads_for(upload.labels):
            return DoneOperation(result="")  # its labels boot AMIs of their own
        return StepOperation(self._upload(upload))

    def _upload(self, upload: ImageUpload) -> Generator[float, None, str]:
        base = yield from cloud_disk(upload, self.disks, self.settings.image_disk_size)
        raw = yield from raw_disk(base)
        tags = {"freshpool-cluster": self.cluster, "freshpool-provider": self.provider.name,
                "freshpool-build": upload.build_id}  # fmt: skip
        ami = yield from self.amis.upload(raw, upload_name(self.cluster, upload), tags)
        remove_disk(self.disks, upload.build_id)
        return ami

    def delete_image(self, external_id: str) -> Operation[None]:
        if not external_id:
            return DoneOperation()
        return StepOperation(self.amis.delete(external_id))

    # ------------------------------------------------------------ create

    def _launch(self, spec: NodeSpec, public_key: str) -> Generator[float, None, str]:
        params = yield from self._run_params(spec, public_key)
        instance_id = yield from self._run(params)
        return instance_id

    def _run_params(
        self, spec: NodeSpec, public_key: str
    ) -> Generator[float, None, dict[str, Any]]:
        s = self.settings
        ours = self.our_tags(spec.tags, spec.hostname, s.tags)
        tags = [{"Key": k, "Value": v} for k, v in ours.items()]
        text = user_data(spec.hostname, spec.user, public_key, s.user_data)
        params: dict[str, Any] = {
            "MinCount": 1, "MaxCount": 1, "UserData": text,
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                                  for kind in ("instance", "volume")],
        }  # fmt: skip
        ami = s.ami_for(spec.label)
        if ami is None and s.image_bucket is not None:
            if not spec.image_external_id:
                raise DriverError(f"provider {self.provider.name}: build {spec.build_id}"
                                  " is not uploaded here")  # fmt: skip
            ami = spec.image_external_id
        if ami:
            params["ImageId"] = ami
        if instance_type := s.type_for(spec.label):
            params["InstanceType"] = instance_type
        if s.subnet_id:
            params["SubnetId"] = s.subnet_id
        if s.security_group_ids:
            params["SecurityGroupIds"] = s.security_group_ids
        if s.launch_template is not None:
            t = s.launch_template
            ref = {"LaunchTemplateId": t.id} if t.id else {"LaunchTemplateName": t.name}
            params["LaunchTemplate"] = {**ref, "Version": t.version}
        if s.volume_size and ami:
            device = yield from self._root_device(ami)
            ebs = {"VolumeSize": s.volume_size, "VolumeType": "gp3", "DeleteOnTermination": True}
            params["BlockDeviceMappings"] = [{"DeviceName": device, "Ebs": ebs}]
        return params

    def _root_device(self, ami: str) -> Generator[float, None, str]:
        if ami not in self._root_devices:
            found = yield from self.calls.call(self.ec2.describe_images, ImageIds=[ami])
            self._root_devices[ami] = str(found["Images"][0].get("RootDeviceName", "/dev/xvda"))
        return self._root_devices[ami]

    def _run(self, params: dict[str, Any]) -> Generator[float, None, str]:
        """RunInstances: spot first when configured, on-demand when spot is refused."""
        tries = [True, False] if self.settings.spot else [False]
        if self.settings.spot and not self.settings.spot_fallback:
            tries = [True]
        for spot in tries:
            attempt = dict(params)
            if spot:
                attempt["InstanceMarketOptions"] = _SPOT
            try:
                reply = yield from self.calls.call(self.ec2.run_instances, **attempt)
            except Exception as exc:
                if spot and code_of(exc) in SPOT_REFUSED and len(tries) > 1:
                    log.info("provider %s: spot refused (%s): on-demand", self.provider.name,
                             code_of(exc))  # fmt: skip
                    continue
                error = driver_error(self.provider.name, "RunInstances", exc)
                if isinstance(error, QuotaExceeded):
                    self.quota.refused()
                raise error from None
            return str(reply["Instances"][0]["InstanceId"])
        raise AssertionError("unreachable")

    def _phase(self, found: dict[str, Any]) -> tuple[Phase, str]:
        state = found.get("State", {}).get("Name", "unknown")
        reason = found.get("StateReason", {}).get("Message", "")
        phase = {"pending": Phase.STARTING, "running": Phase.RUNNING,
                 "terminated": Phase.GONE}.get(state, Phase.FAILED)  # fmt: skip
        return phase, f"{state}: {reason}" if reason else state

    def _address(self, found: dict[str, Any]) -> str | None:
        key = "PublicIpAddress" if self.settings.address == "public" else "PrivateIpAddress"
        return found.get(key) or None

    def _console(self, instance_id: str) -> str:
        reply = self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
        text = str(reply.get("Output") or "")
        with contextlib.suppress(ValueError):  # already text (some endpoints decode it)
            text = base64.b64decode(text, validate=True).decode(errors="replace")
        return text

    def _lost(self, spec: NodeSpec) -> Generator[float, None, list[str]]:
        tags = spec.tags
        filters = [{"Name": "tag:freshpool-cluster", "Values": [tags.cluster]},
                   {"Name": "tag:freshpool-node", "Values": [str(tags.node_id)]},
                   {"Name": "instance-state-name", "Values": _NOT_GONE}]  # fmt: skip
        reply = yield from self.calls.call(self.ec2.describe_instances, Filters=filters)
        return [i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]]

    # ------------------------------------------------------------ batched calls

    def _describe(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Blocking: the instances among `ids` EC2 knows, by id (a filter, so an id it
        does not know yet is simply absent rather than failing the call)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _FILTER_MAX):
            chunk = ids[start : start + _FILTER_MAX]
            pages = self.ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "instance-id", "Values": chunk}])  # fmt: skip
            for page in pages:
                for reservation in page["Reservations"]:
                    for instance in reservation["Instances"]:
                        found[instance["InstanceId"]] = instance
        return found

    def _terminate(self, ids: list[str]) -> dict[str, str]:
        """Blocking: one TerminateInstances for all; ids EC2 says do not exist are gone
        already and dropped from the call."""
        left = list(ids)
        while left:
            try:
                self.ec2.terminate_instances(InstanceIds=left)
                break
            except Exception as exc:
                unknown = instance_ids_in(str(exc)) if "NotFound" in code_of(exc) else set()
                if not unknown & set(left):
                    raise driver_error(self.provider.name, "TerminateInstances", exc) from None
                left = [i for i in left if i not in unknown]
        return {i: "terminating" for i in ids}

    # ------------------------------------------------------------ listing

    def list_instances(self) -> list[Instance]:
        filters = [{"Name": "tag:freshpool-cluster", "Values": [self.cluster]},
                   {"Name": "tag:freshpool-provider", "Values": [self.provider.name]},
                   {"Name": "instance-state-name", "Values": _NOT_GONE}]  # fmt: skip
        try:
            pages = self.ec2.get_paginator("describe_instances").paginate(Filters=filters)
            listed = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
        except Exception as exc:
            raise driver_error(self.provider.name, "DescribeInstances", exc) from None
        return [
            self._listed(
                i["InstanceId"], tag_dict(i), i["State"]["Name"] in ("pending", "running"), i
            )
            for i in listed
        ]

    def _details(self, found: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": found.get("State", {}).get("Name"),
            "instance_type": found.get("InstanceType"),
            "zone": found.get("Placement", {}).get("AvailabilityZone"),
            "lifecycle": found.get("InstanceLifecycle", "on-demand"),
            "image": found.get("ImageId"),
        }
