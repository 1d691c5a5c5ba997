"""A VM node's config drive: a tar archive on its second disk telling its init who it is,
with its own SSH host key and the client's public key."""

from __future__ import annotations

import io
import tarfile
import time

# User-mode networking: the guest's fixed address and the gateway slirp answers on.
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"


def config_drive(
    hostname: str, user: str, *, host_key: bytes, host_pub: bytes, client_pub: bytes
) -> bytes:
    """The archive the VM's init (init.sh) unpacks from /dev/vdb and sources node.env of."""
    env = {
        "FP_HOSTNAME": hostname,
        "FP_USER": user,
        "FP_ADDRESS": GUEST_ADDRESS,
        "FP_GATEWAY": GUEST_GATEWAY,
    }
    files = {
        # The driver checks hostname and user against strict patterns; the init sources this.
        "node.env": "".join(f"{k}={v}\n" for k, v in env.items()).encode(),
        "ssh_host_ed25519_key": host_key,
        "ssh_host_ed25519_key.pub": host_pub,
        "authorized_keys": client_pub,
    }
    buffer = io.BytesIO()
    # The archive is the whole disk: tar's 10 KiB records keep it a whole number
    # of 512-byte sectors, as a block device must be.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
