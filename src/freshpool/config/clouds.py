"""The settings of cloud providers (`driver: aws`, `driver: openstack`), under the
provider's own key."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from freshpool.config.base import Model, Seconds

_AMI = Annotated[str, Field(pattern=r"^ami-[0-9a-f]{8,17}$")]


class LaunchTemplate(Model):
    """An EC2 launch template; what it sets is overridden only by what freshpool must
    set itself (tags, user data, metadata options, the AMI when `ami` is given)."""

    name: str | None = None
    id: str | None = None
    version: str = "$Default"

    @model_validator(mode="after")
    def _one(self) -> LaunchTemplate:
        if (self.name is None) == (self.id is None):
            raise ValueError("give exactly one of `name` or `id`")
        return self


class AwsSettings(Model):
    """Where and how an `aws` provider launches instances."""

    region: str
    # A named profile of ~/.aws/config; by default boto3's own search (environment,
    # instance role...).
    profile: str | None = None
    # Another EC2-compatible endpoint (a test server, a VPC endpoint).
    endpoint_url: str | None = None
    # The image nodes boot; each label may name its own in `amis`.
    ami: _AMI | None = None
    amis: dict[str, _AMI] = {}
    # Where builds are uploaded for import as AMIs (S3 -> import-snapshot ->
    # register-image); a label with no AMI of its own then boots its build's. The
    # import runs as this IAM role (AWS's `vmimport` service role by default).
    image_bucket: str | None = None
    import_role: str = "vmimport"
    image_disk_size: int = Field(default=8, ge=1, le=16384)
    upload_timeout: Seconds = 3 * 3600.0
    # t3.medium unless a launch template sets the type.
    instance_type: str | None = None
    instance_types: dict[str, str] = {}
    subnet_id: str | None = None
    security_group_ids: list[str] = []
    launch_template: LaunchTemplate | None = None
    # GiB of the root volume (gp3), when the AMI's default is too small.
    volume_size: int | None = Field(default=None, ge=1, le=16384)
    # The address nodes are reached at: private (the launcher runs in the VPC) or public.
    address: str = Field(default="private", pattern="^(private|public)$")
    # Spot instances; when spot capacity or price is refused, on-demand unless false.
    spot: bool = False
    spot_fallback: bool = True
    # More tags on every instance and volume (ours are added on top).
    tags: dict[str, str] = {}
    # Cloud-config YAML merged after ours (packages, mounts...); not for secrets.
    user_data: str | None = None
    # Every API call gives up after this long (it is then a failed call, retried by
    # the launcher with the one backoff).
    api_timeout: Seconds = 60.0
    # The service quota read for vCPUs (Running On-Demand Standard instances); the
    # quota is read again this often.
    vcpu_quota_code: str = "L-1216C47A"
    quota_interval: Seconds = 300.0
    # Caps of this provider's own on top of the cloud's quota: vCPUs and RAM (MiB) of
    # all its nodes together.
    max_cores: int | None = Field(default=None, ge=1)
    max_ram: int | None = Field(default=None, ge=1)
    # Pin each node's SSH host key from its console output; only an emulated cloud,
    # whose instances never boot, may turn this off.
    host_key_checking: bool = True

    @model_validator(mode="after")
    def _image(self) -> AwsSettings:
        if (self.ami is None and not self.amis and self.launch_template is None
                and self.image_bucket is None):  # fmt: skip
            raise ValueError(
                "give `ami`, `amis` per label, a `launch-template`, or an `image-bucket`"
                " to upload freshpool's builds to"
            )
        return self

    def uploads_for(self, labels: tuple[str, ...]) -> bool:
        """Whether any of these labels boots an uploaded build here."""
        return self.image_bucket is not None and any(self.ami_for(x) is None for x in labels)

    def ami_for(self, label: str) -> str | None:
        return self.amis.get(label, self.ami)

    def type_for(self, label: str) -> str | None:
        found = self.instance_types.get(label) or self.instance_type
        return found or (None if self.launch_template is not None else "t3.medium")


class FlavorChoice(Model):
    """A flavor by name, or the smallest with at least this much RAM (MiB) and vCPUs."""

    name: str | None = None
    min_ram: int | None = Field(default=None, ge=64)
    vcpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some(self) -> FlavorChoice:
        if self.name is None and self.min_ram is None and self.vcpus is None:
            raise ValueError("give a flavor `name`, or `min-ram` and/or `vcpus`")
        if self.name is not None and (self.min_ram is not None or self.vcpus is not None):
            raise ValueError("give a flavor `name` or `min-ram`/`vcpus`, not both")
        return self


class OpenStackSettings(Model):
    """Where and how an `openstack` provider boots servers (clouds.yaml names the
    cloud, its credentials and endpoints)."""

    cloud: str
    region: str | None = None
    # The image servers boot (a Glance name or id); each label may name its own. A
    # label with neither boots freshpool's own build of its image, uploaded to Glance.
    image: str | None = None
    images: dict[str, str] = {}
    # How builds are uploaded: the disk format (raw for Ceph-backed clouds), the disk's
    # size in GiB, and how long one upload may take.
    image_format: str = Field(default="qcow2", pattern="^(qcow2|raw)$")
    image_disk_size: int = Field(default=8, ge=1, le=2048)
    upload_timeout: Seconds = 3600.0
    flavor: FlavorChoice
    flavors: dict[str, FlavorChoice] = {}
    networks: list[str] = []
    # Boot from a new volume of this many GiB made from the image (deleted with the
    # server) instead of the hypervisor's local disk.
    boot_from_volume: bool = False
    volume_size: int = Field(default=20, ge=1)
    config_drive: bool = True
    # Metadata added to every server beside freshpool's tags.
    metadata: dict[str, str] = {}
    user_data: str | None = None
    api_timeout: Seconds = 60.0
    quota_interval: Seconds = 300.0
    # Caps of this provider's own on top of the cloud's quota: vCPUs and RAM (MiB) of
    # all its nodes together.
    max_cores: int | None = Field(default=None, ge=1)
    max_ram: int | None = Field(default=None, ge=1)
    host_key_checking: bool = True

    def uploads_for(self, labels: tuple[str, ...]) -> bool:
        """Whether any of these labels boots an uploaded build here."""
        return any(self.image_for(label) is None for label in labels)

    def image_for(self, label: str) -> str | None:
        return self.images.get(label, self.image)

    def flavor_for(self, label: str) -> FlavorChoice:
        return self.flavors.get(label, self.flavor)
