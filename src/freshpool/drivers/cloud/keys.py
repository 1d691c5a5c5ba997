"""A cloud node's SSH keys and first-boot user data.

Each node gets a client key pair of its own, made on the launcher's host: only its
public half goes to the cloud, in the user data cloud-init reads at first boot, so
the private key is never in an image or in the cloud's metadata. The node's host key
is made by the node itself and read back from its console output, where cloud-init
prints it, so SSH to the node is pinned to that key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_HOST_KEYS = re.compile(
    r"-----BEGIN SSH HOST KEY KEYS-----\s*(.*?)\s*-----END SSH HOST KEY KEYS-----", re.S
)


@dataclass(frozen=True)
class NodeKeys:
    key: Path
    known_hosts: Path

    @property
    def public(self) -> str:
        return self.key.with_suffix(".pub").read_text().strip()

    def pin(self, address: str, host_keys: list[str]) -> None:
        self.known_hosts.write_text("".join(f"{address} {k}\n" for k in host_keys))

    def remove(self) -> None:
        for path in (self.key, self.key.with_suffix(".pub"), self.known_hosts):
            path.unlink(missing_ok=True)


def make_keys(directory: Path, external_name: str, comment: str) -> NodeKeys:
    """A new ed25519 client key pair for one node, private half readable by root only."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)  # fmt: skip
    path = directory / f"{external_name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    path.with_suffix(".pub").write_bytes(public + f" {comment}\n".encode())
    return NodeKeys(path, directory / f"{external_name}.known_hosts")


def user_data(hostname: str, user: str, public_key: str, extra: str | None) -> str:
    """Cloud-init user data: the hostname and the node's key for `user` (root too, as
    freshpool's own nodes allow), then the operator's own cloud-config merged after."""
    config: dict[str, object] = {
        "hostname": hostname, "disable_root": False, "ssh_pwauth": False,
        "ssh_authorized_keys": [public_key],
    }  # fmt: skip
    if user != "root":
        account = {"name": user, "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                   "ssh_authorized_keys": [public_key]}  # fmt: skip
        config["users"] = ["default", account]
    # JSON is YAML: cloud-init reads it as cloud-config.
    ours = "#cloud-config\n" + json.dumps(config, indent=1) + "\n"
    if not extra:
        return ours
    message = MIMEMultipart()
    for text in (ours, extra):
        part = MIMEText(text, "cloud-config")
        part.add_header("Merge-Type", "list(append)+dict(recurse_array)+str()")
        message.attach(part)
    return message.as_string()


def console_host_keys(console: str) -> list[str]:
    """The host public keys ("TYPE BASE64") cloud-init printed on the console."""
    found = _HOST_KEYS.search(console)
    if found is None:
        return []
    keys = []
    for line in found.group(1).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(("ssh-", "ecdsa-")):
            keys.append(f"{parts[0]} {parts[1]}")
    return keys
