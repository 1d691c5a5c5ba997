"""The `aws` driver: each node an EC2 instance with our tags, booted from an AMI (or a
launch template), with IMDSv2 required, its own SSH key in its user data, and its
host key pinned from its console output.

Every boto3 call runs on the driver's worker threads (drivers/cloud/calls.py); the
launches and deletes waiting on EC2 share one DescribeInstances and one
TerminateInstances per pass between them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from freshpool.config import Provider
from freshpool.config.clouds import AwsSettings
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
    Driver,
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    Operation,
    Quota,
    QuotaExceeded,
    SshAccess,
    StepOperation,
    Tags,
)
from freshpool.drivers.cloud.calls import Batch, Blocking
from freshpool.drivers.cloud.keys import NodeKeys, console_host_keys, make_keys, user_data

log = logging.getLogger("freshpool.drivers.aws")
_NOT_GONE = ["pending", "running", "stopping", "stopped", "shutting-down"]
_FILTER_MAX = 200  # values in one DescribeInstances filter
_CONSOLE_POLL = 5.0
_SPOT = {
    "MarketType": "spot",
    "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
}


class AwsDriver(Driver):
    remote = True

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        super().__init__(provider, cluster, state_dir)
        if provider.aws is None:
            raise DriverUnavailable(f"provider {provider.name}: driver aws needs `aws:`")
        self.settings: AwsSettings = provider.aws
        self.ec2, self.quotas = clients(self.settings)
        self.calls = Blocking(min(16, provider.max_parallel_launches + 4), f"aws-{provider.name}")
        self._described: Batch[dict[str, Any]] = Batch(self.calls, self._describe, every=1.0)
        self._terminated: Batch[str] = Batch(self.calls, self._terminate, every=0.2)
        types = sorted({t for label in self._labels() if (t := self.settings.type_for(label))})
        self.quota = VcpuQuota(provider.name, cluster, self.ec2, self.quotas,
                               self.settings.vcpu_quota_code, types, self.calls,
                               self.settings.quota_interval)  # fmt: skip
        self._root_devices: dict[str, str] = {}

    def _labels(self) -> list[str]:
        named = [*self.settings.amis, *self.settings.instance_types]
        return [*(self.provider.labels or []), *named] or [""]

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        """Credentials, AMIs, subnet, security groups and launch template exist."""
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

    def limits(self) -> Quota:
        fit = self.quota.room()
        cap = self.provider.max_nodes
        return Quota(max_nodes=cap if fit is None else min(cap, fit))

    # ------------------------------------------------------------ create

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        return StepOperation(self._create(spec))

    def _create(self, spec: NodeSpec) -> Generator[float, None, Instance]:
        started = time.monotonic()
        keys = make_keys(self.state_dir / "keys", f"node-{spec.node_id}",
                         f"freshpool {self.cluster} node {spec.node_id}")  # fmt: skip
        instance_id: str | None = None
        try:
            params = yield from self._run_params(spec, keys.public)
            instance_id = yield from self._run(spec, params)
            keys = _renamed(keys, instance_id)
            instance = yield from self._until_running(instance_id, started)
            address = self._address(instance)
            host_keys: list[str] = []
            if self.settings.host_key_checking:
                host_keys = yield from self._host_keys(instance_id, started)
            keys.pin(address, host_keys)
        except BaseException:
            yield from self._undo(spec, instance_id)
            keys.remove()
            raise
        access = SshAccess(address, 22, spec.user, str(keys.key), str(keys.known_hosts),
                           host_keys, strict_host_keys=self.settings.host_key_checking)  # fmt: skip
        return Instance(instance_id, spec.tags, True, access, _details(instance))

    def _run_params(
        self, spec: NodeSpec, public_key: str
    ) -> Generator[float, None, dict[str, Any]]:
        s = self.settings
        tags = [{"Key": k, "Value": v} for k, v in self._tags(spec.tags, spec.hostname).items()]
        text = user_data(spec.hostname, spec.user, public_key, s.user_data)
        params: dict[str, Any] = {
            "MinCount": 1, "MaxCount": 1, "UserData": text,
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                                  for kind in ("instance", "volume")],
        }  # fmt: skip
        ami = s.ami_for(spec.label)
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

    def _tags(self, tags: Tags, hostname: str) -> dict[str, str]:
        return {**self.settings.tags, "Name": hostname, **tags.as_dict(),
                "freshpool-provider": self.provider.name}  # fmt: skip

    def _root_device(self, ami: str) -> Generator[float, None, str]:
        if ami not in self._root_devices:
            found = yield from self.calls.call(self.ec2.describe_images, ImageIds=[ami])
            self._root_devices[ami] = str(found["Images"][0].get("RootDeviceName", "/dev/xvda"))
        return self._root_devices[ami]

    def _run(self, spec: NodeSpec, params: dict[str, Any]) -> Generator[float, None, str]:
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

    def _until_running(self, instance_id: str, started: float
                       ) -> Generator[float, None, dict[str, Any]]:  # fmt: skip
        deadline = started + self.provider.boot_timeout
        while True:
            found = yield from self._described.get(instance_id)
            state = (found or {}).get("State", {}).get("Name", "unknown")
            if found is not None and state == "running" and self._address(found, None):
                return found
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                reason = (found or {}).get("StateReason", {}).get("Message", "no reason given")
                raise DriverError(f"provider {self.provider.name}: {instance_id} is {state}: "
                                  f"{reason}")  # fmt: skip
            if time.monotonic() > deadline:
                raise DriverError(f"provider {self.provider.name}: {instance_id} not running "
                                  f"with an address after {self.provider.boot_timeout:.0f} s "
                                  f"(last: {state})")  # fmt: skip
            yield 1.0

    def _address(self, instance: dict[str, Any], default: str | None = "") -> str:
        key = "PublicIpAddress" if self.settings.address == "public" else "PrivateIpAddress"
        value = instance.get(key)
        if value:
            return str(value)
        if default is None:
            return ""
        raise DriverError(f"provider {self.provider.name}: {instance.get('InstanceId')} has no "
                          f"{self.settings.address} address")  # fmt: skip

    def _host_keys(self, instance_id: str, started: float) -> Generator[float, None, list[str]]:
        deadline = started + self.provider.boot_timeout
        while True:
            reply = yield from self.calls.call(self.ec2.get_console_output,
                                               InstanceId=instance_id, Latest=True)  # fmt: skip
            text = reply.get("Output") or ""
            with contextlib.suppress(ValueError):  # already text (some endpoints decode it)
                text = base64.b64decode(text, validate=True).decode(errors="replace")
            if keys := console_host_keys(text):
                return keys
            if time.monotonic() > deadline:
                raise DriverError(
                    f"provider {self.provider.name}: {instance_id}: no SSH host key on its "
                    f"console after {self.provider.boot_timeout:.0f} s (the AMI needs "
                    "cloud-init, which prints it)"
                )
            yield _CONSOLE_POLL

    def _undo(self, spec: NodeSpec, instance_id: str | None) -> Generator[float, None, None]:
        """Leave nothing of a failed launch: its instance, or when the create's answer
        was lost, whatever carries its tags."""
        try:
            ids = [instance_id] if instance_id else (yield from self._tagged(spec.tags))
            for each in ids:
                yield from self._terminated.get(each)
        except Exception as exc:  # the leak sweep finds it by its tags
            log.warning("provider %s: undoing node %s's launch failed: %s",
                        self.provider.name, spec.node_id, exc)  # fmt: skip

    def _tagged(self, tags: Tags) -> Generator[float, None, list[str]]:
        filters = [{"Name": "tag:freshpool-cluster", "Values": [tags.cluster]},
                   {"Name": "tag:freshpool-node", "Values": [str(tags.node_id)]},
                   {"Name": "instance-state-name", "Values": _NOT_GONE}]  # fmt: skip
        reply = yield from self.calls.call(self.ec2.describe_instances, Filters=filters)
        return [i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]]

    # ------------------------------------------------------------ delete

    def delete(self, external_id: str) -> Operation[None]:
        return StepOperation(self._delete(external_id))

    def _delete(self, instance_id: str) -> Generator[float, None, None]:
        yield from self._terminated.get(instance_id)
        deadline = time.monotonic() + self.provider.delete_timeout
        while True:
            found = yield from self._described.get(instance_id)
            state = (found or {}).get("State", {}).get("Name", "terminated")
            if state == "terminated":
                break
            if time.monotonic() > deadline:
                after = self.provider.delete_timeout
                raise DriverError(f"provider {self.provider.name}: {instance_id} still {state} "
                                  f"{after:.0f} s after terminating")  # fmt: skip
            yield 2.0
        _keys_of(self.state_dir / "keys", instance_id).remove()

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
        return [self._listed(instance) for instance in listed]

    def _listed(self, instance: dict[str, Any]) -> Instance:
        tags = tag_dict(instance)
        try:
            ours = Tags(tags["freshpool-cluster"], int(tags["freshpool-node"]),
                        tags.get("freshpool-build", ""))  # fmt: skip
        except (KeyError, ValueError):
            ours = None
        state = instance["State"]["Name"]
        return Instance(instance["InstanceId"], ours, alive=state in ("pending", "running"),
                        details=_details(instance))  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {"quota": self.quota.last}


def _details(instance: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": instance.get("State", {}).get("Name"),
        "instance_type": instance.get("InstanceType"),
        "zone": instance.get("Placement", {}).get("AvailabilityZone"),
        "lifecycle": instance.get("InstanceLifecycle", "on-demand"),
        "image": instance.get("ImageId"),
    }


def _keys_of(directory: Path, name: str) -> NodeKeys:
    return NodeKeys(directory / f"{name}.key", directory / f"{name}.known_hosts")


def _renamed(keys: NodeKeys, name: str) -> NodeKeys:
    """The node's key files under its instance id, which delete is given."""
    moved = _keys_of(keys.key.parent, name)
    keys.key.rename(moved.key)
    keys.key.with_suffix(".pub").rename(moved.key.with_suffix(".pub"))
    return moved
