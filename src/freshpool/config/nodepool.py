"""`nodepool-compat:`: where `serve` speaks Nodepool's ZooKeeper protocol for Zuul."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import Field, field_validator

from freshpool.config.base import Model, Seconds

_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class ZooKeeperTls(Model):
    ca: Path
    cert: Path
    key: Path


class NodepoolCompat(Model):
    """A ZooKeeper ensemble shared with Zuul; freshpool acts there as a Nodepool launcher."""

    # "host:port[,host:port...]", as Zuul's `zookeeper.hosts`.
    hosts: str
    tls: ZooKeeperTls | None = None
    # A path every znode lives under, as Zuul's `zookeeper.chroot`.
    chroot: str | None = Field(default=None, pattern=r"^/[^\s]*$")
    # Our name among the launchers Zuul lists; unique per ensemble.
    launcher_id: str = Field(default_factory=lambda: f"freshpool-{socket.gethostname()}")
    session_timeout: Seconds = 10.0

    @field_validator("hosts")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for part in value.split(","):
            if not _HOST_PORT.match(part.strip()):
                raise ValueError(f"{part!r} is not host:port")
        return value
