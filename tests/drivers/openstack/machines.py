"""Real machines behind the fake cloud: each server the fake boots is a freshpool
local node (namespaces, overlayfs, its own sshd) on the test's own bridge, so the
openstack driver's nodes answer SSH like a cloud's would.

What a cloud image's cloud-init does at first boot is done here from outside: the
`ssh_authorized_keys` of the server's cloud-config user data are installed for root,
and the node's own host keys are what the console shows. Nothing else of cloud-init
(hostname, users, packages) is emulated.
"""

from __future__ import annotations

import itertools
import json
import shlex
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

from freshpool.config import LocalNetwork, Provider
from freshpool.drivers import ssh
from freshpool.drivers.base import Instance, NodeSpec
from freshpool.drivers.local import LocalDriver
from tests.drivers.openstack import fake_cloud_model as model


class Hypervisor(Protocol):
    def boot(self, server_id: str, hostname: str, user_data: bytes | None
             ) -> tuple[str, list[str]]: ...  # fmt: skip

    def destroy(self, server_id: str) -> None: ...


def booted(hypervisor: Hypervisor, doc: dict[str, Any], ports: dict[str, Any]) -> bool:
    """The server's machine booted, its address and host keys the server's; the server
    in ERROR with the reason when it does not boot."""
    try:
        address, host_keys = hypervisor.boot(doc["id"], doc["name"], doc["_user_data"])
    except Exception as exc:
        fault = {"code": 500, "created": model.now_iso(), "message": f"boot failed: {exc}"}
        doc.update({"status": "ERROR", "OS-EXT-STS:vm_state": "error", "fault": fault})
        return False
    if doc["_ports"]:
        ports[doc["_ports"][0]]["fixed_ips"][0]["ip_address"] = address
    doc["_host_keys"] = host_keys
    return True


def authorized_keys(user_data: bytes | None) -> list[str]:
    """The keys a cloud-config (JSON is YAML) asks cloud-init to authorize."""
    text = (user_data or b"").decode()
    if not text.startswith("#cloud-config"):
        return []
    config = json.loads(text.split("\n", 1)[1])
    return [str(k) for k in config.get("ssh_authorized_keys", [])]


class LocalMachines:
    """The fake cloud's hypervisor (`FakeCloud.hypervisor`)."""

    def __init__(self, layers: tuple[Path, ...], state_dir: Path, subnet: str,
                 bridge: str) -> None:  # fmt: skip
        provider = Provider.model_validate({
            "name": "fake-nova", "network": LocalNetwork(subnet=subnet, bridge=bridge),
            "boot-timeout": 60, "delete-timeout": 60, "max-nodes": 50})  # fmt: skip
        self.driver = LocalDriver(provider, f"fake-nova-{uuid.uuid4().hex[:8]}", state_dir)
        self.layers = layers
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.machines: dict[str, Instance] = {}

    def boot(self, server_id: str, hostname: str, user_data: bytes | None) -> tuple[str, list[str]]:
        """A node for the server, its user data's keys authorized: its address and host keys."""
        with self._lock:
            node_id = next(self._ids)
        spec = NodeSpec(node_id=node_id, cluster=self.driver.cluster, label="debian",
                        hostname=hostname[:63], build_id="nova", layers=self.layers)  # fmt: skip
        machine = self.driver.create(spec).wait(90)
        self.machines[server_id] = machine
        assert machine.access is not None
        keys = "".join(f"{k}\n" for k in authorized_keys(user_data))
        done = ssh.run(machine.access, "umask 077 && mkdir -p /root/.ssh && printf %s "
                       f"{shlex.quote(keys)} >> /root/.ssh/authorized_keys")  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"cloud-init's part failed on {hostname}: {done.stderr}")
        return machine.access.host, list(machine.access.host_keys)

    def destroy(self, server_id: str) -> None:
        machine = self.machines.pop(server_id, None)
        if machine is not None:
            self.driver.delete(machine.external_id).wait(60)

    def close(self) -> None:
        for server_id in list(self.machines):
            self.destroy(server_id)
        for stray in self.driver.list_instances():
            self.driver.delete(stray.external_id).wait(60)
        self.driver.teardown()
