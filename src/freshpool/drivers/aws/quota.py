"""How many nodes an `aws` provider may run: the account's vCPU quota, less what runs
in the region that is not ours, over the vCPUs of the largest instance type the
provider launches."""

from __future__ import annotations

from typing import Any

from freshpool.drivers.aws.ec2 import code_of, tag_dict
from freshpool.drivers.cloud.calls import Blocking
from freshpool.drivers.cloud.quota import QuotaRoom

# Instance families the "Running On-Demand Standard" vCPU quota counts.
_STANDARD = ("a", "c", "d", "h", "i", "m", "r", "t", "z")
_LIVE = ["pending", "running", "stopping", "shutting-down"]


class VcpuQuota(QuotaRoom):
    def __init__(self, provider: str, cluster: str, ec2: Any, quotas: Any, code: str,
                 types: list[str], blocking: Blocking, interval: float,
                 max_cores: int | None, max_ram: int | None) -> None:  # fmt: skip
        super().__init__(provider, blocking, interval, max_cores, max_ram)
        self.cluster = cluster
        self.ec2, self.quotas, self.code = ec2, quotas, code
        self.types = types
        self._sizes: dict[str, tuple[int, int]] = {}

    def node_size(self) -> tuple[int, int]:
        if not self.types:
            return 1, 1  # the launch template's type: unknown here
        sizes = [self._size(t) for t in self.types]
        return max(c for c, _ in sizes), max(m for _, m in sizes)

    def read(self, size: tuple[int, int]) -> int | None:
        """The room left, from the quota and the region's live instances."""
        if not self.types:
            self.last = {"error": "the launch template sets the instance type: not counted"}
            return None
        try:
            quota = self.quotas.get_service_quota(ServiceCode="ec2", QuotaCode=self.code)
        except Exception as exc:
            if code_of(exc) in ("NoSuchResourceException", "AccessDeniedException"):
                self.last = {"error": f"{code_of(exc)}: quota {self.code} not readable"}
                return None
            raise
        limit = float(quota["Quota"]["Value"])
        ours = theirs = 0
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": _LIVE}])  # fmt: skip
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    if not _counted(instance):
                        continue
                    cpus = self._size(instance["InstanceType"])[0]
                    tags = tag_dict(instance)
                    mine = (tags.get("freshpool-cluster") == self.cluster
                            and tags.get("freshpool-provider") == self.provider)  # fmt: skip
                    ours, theirs = (ours + cpus, theirs) if mine else (ours, theirs + cpus)
        per_node = size[0]
        room = max(0, int((limit - theirs) // per_node))
        self.last = {"vcpu_quota": limit, "vcpus_ours": ours, "vcpus_not_ours": theirs,
                     "vcpus_per_node": per_node, "nodes_fit": room}  # fmt: skip
        return room

    def _size(self, instance_type: str) -> tuple[int, int]:
        if instance_type not in self._sizes:
            found = self.ec2.describe_instance_types(InstanceTypes=[instance_type])
            info = found["InstanceTypes"][0]
            self._sizes[instance_type] = (int(info["VCpuInfo"]["DefaultVCpus"]),
                                          int(info["MemoryInfo"]["SizeInMiB"]))  # fmt: skip
        return self._sizes[instance_type]


def _counted(instance: dict[str, Any]) -> bool:
    """On-demand instances of the standard families: what the quota counts."""
    if instance.get("InstanceLifecycle") == "spot":
        return False
    return str(instance.get("InstanceType", "")).startswith(_STANDARD)
