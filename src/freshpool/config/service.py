"""The configuration of what `serve` offers: the HTTP API, tenants, statsd."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from freshpool.config.base import Model, Name


class ApiTls(Model):
    """The API's certificate and private key (PEM files; the chain goes in `cert`)."""

    cert: Path
    key: Path


class Api(Model):
    """The HTTP API and dashboard, which `freshpool serve` runs in a process beside its own."""

    enabled: bool = True
    # Loopback only unless the operator says otherwise; port 0 picks a free one.
    listen: str = "127.0.0.1"
    port: int = Field(default=8005, ge=0, le=65535)
    # Read-only status (GET endpoints, the dashboard) without a token.
    open_status: bool = True
    # Tokens of these tenants may see and act on every tenant's requests and nodes.
    admin_tenants: list[Name] = []
    tls: ApiTls | None = None
    # Plain HTTP on an address other machines reach: tokens and node keys in clear.
    insecure: bool = False

    @model_validator(mode="after")
    def _plain_http_only_on_loopback(self) -> Api:
        if self.enabled and self.tls is None and not self.insecure and not self.loopback:
            raise ValueError(
                f"listen {self.listen!r} is reachable from other machines and the API has no"
                " TLS: set api.tls {cert: FILE, key: FILE}, or api.insecure: true to serve"
                " plain HTTP there anyway"
            )
        return self

    @property
    def loopback(self) -> bool:
        if self.listen == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen).is_loopback
        except ValueError:
            return False


class Tenant(Model):
    name: Name
    # Share of the pool relative to other tenants when requests wait at one priority.
    weight: Annotated[float, Field(gt=0)] = 1.0
    # Nodes the tenant's jobs may hold at once (in use or held); more requests wait.
    max_nodes: int | None = Field(default=None, ge=1)


class Statsd(Model):
    """Where to send the metrics as statsd too (besides Prometheus /metrics)."""

    host: str
    port: int = Field(default=8125, ge=1, le=65535)
    prefix: str = "freshpool"
