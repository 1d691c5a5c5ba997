"""The `openstack` driver: each node a Nova server with our tags in its metadata,
booted from a Glance image (or a volume made from it), with its own SSH key in its
user data on the config drive, and its host key pinned from its console output. The
image is a named cloud image, or freshpool's own build uploaded to Glance (glance.py).

Every call goes through openstacksdk's compute, image and network proxies, on the
driver's worker threads; the launches and deletes waiting on Nova share one server
listing per pass between them.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

from freshpool.config import Provider
from freshpool.config.clouds import FlavorChoice, OpenStackSettings
from freshpool.drivers.base import (
    DoneOperation,
    DriverError,
    DriverUnavailable,
    ImageUpload,
    NodeSpec,
    Operation,
    QuotaExceeded,
    StepOperation,
)
from freshpool.drivers.cloud.disk import cloud_disk, raw_disk, remove_disk, upload_name
from freshpool.drivers.cloud.driver import CloudDriver, Phase
from freshpool.drivers.cloud.keys import user_data
from freshpool.drivers.openstack.glance import Glance
from freshpool.drivers.openstack.nova import (
    NovaQuota,
    connect,
    driver_error,
    find,
    pick_flavor,
)

log = logging.getLogger("freshpool.drivers.openstack")
_PHASES = {"BUILD": Phase.STARTING, "REBUILD": Phase.STARTING, "ACTIVE": Phase.RUNNING,
           "DELETED": Phase.GONE, "SOFT_DELETED": Phase.GONE}  # fmt: skip


class OpenStackDriver(CloudDriver):
    noun = "server"

    def __init__(self, provider: Provider, cluster: str, state_dir: Path) -> None:
        if provider.openstack is None:
            raise DriverUnavailable(
                f"provider {provider.name}: driver openstack needs `openstack:`"
            )
        super().__init__(provider, cluster, state_dir, provider.openstack.host_key_checking)
        self.settings: OpenStackSettings = provider.openstack
        self.conn = connect(provider.name, self.settings)
        self.glance = Glance(provider.name, self.conn, self.settings.image_format,
                             self.settings.upload_timeout)  # fmt: skip
        self.disks = state_dir / "disks"
        # Names resolved to ids once: flavors, images and networks by what was asked.
        self._flavors: dict[FlavorChoice, Any] = {}
        self._images: dict[str, str] = {}
        self._networks: list[str] | None = None
        caps = (self.settings.max_cores, self.settings.max_ram)
        self.quota = NovaQuota(provider.name, self.conn, self.calls, self.settings.quota_interval,
                               caps, self._node_size, self._ours)  # fmt: skip

    # ------------------------------------------------------------ names

    def _flavor(self, label: str) -> Any:
        choice = self.settings.flavor_for(label)
        if choice not in self._flavors:
            self._flavors[choice] = pick_flavor(self.provider.name, self.conn, choice)
        return self._flavors[choice]

    def _image(self, spec: NodeSpec) -> str:
        """The label's cloud image, else the build's upload."""
        name = self.settings.image_for(spec.label)
        if name is None:
            if not spec.image_external_id:
                raise DriverError(f"provider {self.provider.name}: build {spec.build_id}"
                                  " is not uploaded here")  # fmt: skip
            return spec.image_external_id
        return self._cloud_image(name)

    def _cloud_image(self, name: str) -> str:
        if name not in self._images:
            image = find(self.conn.image.find_image, name)
            if image is None:
                raise DriverUnavailable(f"provider {self.provider.name}: no image {name!r}")
            self._images[name] = image.id
        return self._images[name]

    def _network_ids(self) -> list[str]:
        if self._networks is None:
            ids = []
            for name in self.settings.networks:
                network = find(self.conn.network.find_network, name)
                if network is None:
                    raise DriverUnavailable(f"provider {self.provider.name}: no network {name!r}")
                ids.append(network.id)
            self._networks = ids
        return self._networks

    def _node_size(self) -> tuple[int, int]:
        """The vCPUs and RAM (MiB) of the largest flavor this provider launches."""
        labels = [*(self.provider.labels or []), *self.settings.flavors, ""]
        flavors = [self._flavor(label) for label in labels]
        return max(f.vcpus for f in flavors), max(f.ram for f in flavors)

    def _ours(self) -> list[Any]:
        return [s for s in self._servers() if self._is_ours(s.metadata or {})]

    def _is_ours(self, metadata: dict[str, str]) -> bool:
        return (metadata.get("freshpool-cluster") == self.cluster
                and metadata.get("freshpool-provider") == self.provider.name)  # fmt: skip

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        """The credentials, images, flavors and networks exist."""
        try:
            self.conn.authorize()
            for label in [*(self.provider.labels or []), *self.settings.images, ""]:
                if (name := self.settings.image_for(label)) is not None:
                    self._cloud_image(name)
                self._flavor(label)
            self._network_ids()
        except DriverUnavailable:
            raise
        except Exception as exc:
            raise DriverUnavailable(str(driver_error(self.provider.name, "check", exc))) from None

    def _room(self) -> int | None:
        return self.quota.room()

    # ------------------------------------------------------------ images

    def serves_without_upload(self, label: str) -> bool:
        # A label that names its cloud image boots that, whatever its build's upload.
        return not self.settings.uploads_for((label,))

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        if not self.settings.uploads_for(upload.labels):
            return DoneOperation(result="")  # its labels boot cloud images only
        return StepOperation(self._upload(upload))

    def _upload(self, upload: ImageUpload) -> Generator[float, None, str]:
        base = yield from cloud_disk(upload, self.disks, self.settings.image_disk_size)
        disk = base.disk
        if self.settings.image_format == "raw":
            disk = yield from raw_disk(base)
        tags = {"freshpool-cluster": self.cluster, "freshpool-provider": self.provider.name,
                "freshpool-build": upload.build_id}  # fmt: skip
        name = upload_name(self.cluster, upload)
        image_id = yield from self.calls.call(self.glance.upload, base, disk, name, tags)
        remove_disk(self.disks, upload.build_id)
        return image_id

    def delete_image(self, external_id: str) -> Operation[None]:
        if not external_id:
            return DoneOperation()
        return StepOperation(self.calls.call(self.glance.delete, external_id))

    # ------------------------------------------------------------ the cloud's part

    def _launch(self, spec: NodeSpec, public_key: str) -> Generator[float, None, str]:
        server = yield from self.calls.call(self._create_server, spec, public_key)
        return str(server.id)

    def _create_server(self, spec: NodeSpec, public_key: str) -> Any:
        """Blocking: the names resolved (once), then one create call."""
        s = self.settings
        try:
            image_id, flavor = self._image(spec), self._flavor(spec.label)
            text = user_data(spec.hostname, spec.user, public_key, s.user_data)
            metadata = self.our_tags(spec.tags, spec.hostname, s.metadata)
            attrs: dict[str, Any] = {
                "name": spec.hostname, "flavor_id": flavor.id, "metadata": metadata,
                "user_data": base64.b64encode(text.encode()).decode(),
                "config_drive": s.config_drive,
                "networks": [{"uuid": n} for n in self._network_ids()] or "auto",
            }  # fmt: skip
            if s.boot_from_volume:
                attrs["block_device_mapping"] = [{
                    "boot_index": 0, "uuid": image_id, "source_type": "image",
                    "destination_type": "volume", "volume_size": s.volume_size,
                    "delete_on_termination": True}]  # fmt: skip
            else:
                attrs["image_id"] = image_id
            return self.conn.compute.create_server(**attrs)
        except DriverError:  # ours already (DriverUnavailable among them)
            raise
        except Exception as exc:
            error = driver_error(self.provider.name, "create server", exc)
            if isinstance(error, QuotaExceeded):
                self.quota.refused()
            raise error from None

    def _servers(self) -> list[Any]:
        """Blocking: every server of the project (one paged listing)."""
        return list(self.conn.compute.servers(details=True))

    def _describe(self, ids: list[str]) -> dict[str, Any]:
        wanted = set(ids)
        try:
            return {s.id: s for s in self._servers() if s.id in wanted}
        except Exception as exc:
            raise driver_error(self.provider.name, "list servers", exc) from None

    def _terminate(self, ids: list[str]) -> dict[str, str]:
        for server_id in ids:
            try:
                self.conn.compute.delete_server(server_id, ignore_missing=True)
            except Exception as exc:
                raise driver_error(self.provider.name, f"delete server {server_id}", exc) from None
        return {i: "deleting" for i in ids}

    def _console(self, instance_id: str) -> str:
        reply = self.conn.compute.get_server_console_output(instance_id)
        return str((reply or {}).get("output") or "")

    def _phase(self, found: Any) -> tuple[Phase, str]:
        status = str(found.status or "UNKNOWN")
        if (found.task_state or "") == "deleting":
            return Phase.FAILED, "deleting"
        fault = (found.fault or {}).get("message", "") if isinstance(found.fault, dict) else ""
        return _PHASES.get(status, Phase.FAILED), f"{status}: {fault}" if fault else status

    def _address(self, found: Any) -> str | None:
        """The first fixed IPv4 address (a floating one if the server has one)."""
        fixed = floating = None
        for addresses in (found.addresses or {}).values():
            for a in addresses:
                if a.get("version") != 4:
                    continue
                if a.get("OS-EXT-IPS:type") == "floating":
                    floating = floating or a.get("addr")
                else:
                    fixed = fixed or a.get("addr")
        return floating or fixed

    def _details(self, found: Any) -> dict[str, Any]:
        return {"status": found.status, "flavor": (found.flavor or {}).get("original_name"),
                "zone": found.availability_zone, "host_id": found.host_id}  # fmt: skip

    def list_instances(self) -> list[Any]:
        try:
            servers = self._servers()
        except Exception as exc:
            raise driver_error(self.provider.name, "list servers", exc) from None
        listed = []
        for server in servers:
            metadata = dict(server.metadata or {})
            if self._is_ours(metadata):
                alive = server.status in ("BUILD", "ACTIVE")
                listed.append(self._listed(server.id, metadata, alive, server))
        return listed
