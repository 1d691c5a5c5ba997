"""The configuration's models: providers, labels and the whole file (the API and
tenants: service.py).

Units are the same everywhere: durations in seconds, rates per second. Unknown keys
are errors. The loader (loader.py) turns the models' errors into file:line:key.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    ByteSize,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from freshpool.config.base import Model, Name, Seconds
from freshpool.config.clouds import AwsSettings, OpenStackSettings
from freshpool.config.images import Image, image_parent_problems
from freshpool.config.nodepool import NodepoolCompat
from freshpool.config.service import Api, Statsd, Tenant
from freshpool.core.errors import UnknownName
from freshpool.core.nodesets import providers_serving


class LocalNetwork(Model):
    """A local provider's network policy: default deny (drivers/local/policy.py)."""

    subnet: str = "10.213.0.0/16"
    # Everything off the host is open to nodes (masqueraded); default: nothing.
    outbound: bool = False
    bridge: str | None = None
    # Host ports nodes may reach on the bridge address (a CI master's, say); no other.
    host_ports: list[Annotated[int, Field(ge=1, le=65535)]] = []
    # Off-host destinations nodes may reach without `outbound`: CIDRs, or host:port
    # (names resolved when the rules are made).
    egress: list[str] = []
    # A host address other machines reach: each node's sshd is forwarded to a port of
    # its own on it (from publish-ports), so a CI server elsewhere can use the node.
    publish: ipaddress.IPv4Address | None = None
    publish_ports: Annotated[str, Field(pattern=r"^\d{1,5}-\d{1,5}$")] = "40000-40999"

    @property
    def publish_range(self) -> range:
        first, last = (int(p) for p in self.publish_ports.split("-"))
        return range(first, last + 1)

    @field_validator("publish_ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        first, last = (int(p) for p in value.split("-"))
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"{value!r}: expected FIRST-LAST within 1024-65535, FIRST <= LAST")
        return value

    @field_validator("egress")
    @classmethod
    def _egress(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            egress_problem = _egress_problem(entry)
            if egress_problem:
                raise ValueError(f"{entry!r}: {egress_problem}")
        return entries

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.version != 4 or net.prefixlen > 28:
            raise ValueError("expected an IPv4 network of /28 or larger, like 10.213.0.0/16")
        return str(net)


def _egress_problem(entry: str) -> str | None:
    host, colon, port = entry.rpartition(":")
    if not colon:
        try:
            if ipaddress.ip_network(entry, strict=False).version != 4:
                return "expected an IPv4 CIDR"
        except ValueError:
            return "expected a CIDR like 10.1.0.0/16 or host:port like pypi.org:443"
        return None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} is not a number from 1 to 65535"
    if not host or any(c.isspace() or c in "/[]" for c in host):
        return f"host {host!r} is not a host name or IPv4 address"
    return None


Rate = Annotated[float, Field(gt=0)]
# Money per node-hour, in whatever currency the operator prices in (one for all).
PerHour = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _with_unit(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{value!r} has no unit: write a size like 512MiB or 2GiB")
    return value


# A size with its unit ("512MiB", "2GiB", "10GB"); a bare number is refused as ambiguous.
Size = Annotated[ByteSize, BeforeValidator(_with_unit), Field(ge=16 * 2**20)]


class NodeLimits(Model):
    """What one node may use (cgroups and a size-limited disk); unset: no limit."""

    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory: Size | None = None
    pids: int | None = Field(default=None, ge=16)
    # The node's writable layer: writes past it fail with ENOSPC inside the node.
    disk: Size | None = None

    def over(self, defaults: NodeLimits) -> NodeLimits:
        """These limits, with `defaults` where these leave one unset."""
        unset = {k: v for k, v in defaults if getattr(self, k) is None}
        return self.model_copy(update=unset)


class TotalLimits(Model):
    """What all of a provider's nodes may take together."""

    cpus: float | None = Field(default=None, gt=0)
    memory: Size | None = None
    disk: Size | None = None

    def nodes_of(self, each: NodeLimits) -> int | None:
        """How many nodes of size `each` fit (None: no cap applies)."""
        fits = [
            int(total // mine)
            for total, mine in (
                (self.cpus, each.cpus),
                (self.memory, each.memory),
                (self.disk, each.disk),
            )
            if total is not None and mine is not None
        ]
        return min(fits) if fits else None


class SimSettings(Model):
    """The sim driver's behaviour (ignored by other drivers)."""

    seed: int = 0
    latency: Annotated[float, Field(ge=0)] = 0.0
    failure_rate: Fraction = 0.0
    timeout_rate: Fraction = 0.0
    lie_rate: Fraction = 0.0
    leak_on_failure: Fraction = 0.5
    command_failure_rate: Fraction = 0.0
    quota: int | None = Field(default=None, ge=0)
    # Keep instances in <state-dir>/providers/NAME/sim.db so they outlive the launcher.
    persist: bool = True
    # Keep them in this file instead: one simulated cloud that launchers with state
    # directories of their own all see, as they would a real one.
    path: Path | None = None


class VmSize(Model):
    """A VM's size on a qemu provider."""

    vcpus: int = Field(default=1, ge=1, le=256)
    # MiB of guest RAM.
    memory: int = Field(default=1024, ge=128)


class QemuSettings(Model):
    """The qemu driver's settings (ignored by other drivers)."""

    # auto: KVM when a probe boot shows it works for the guest kernel, else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # All VMs together (guest RAM plus QEMU's own) get at most this share of host RAM.
    memory_share: float = Field(default=0.75, gt=0, le=1)
    # GiB: the size of each VM's root file system (thin: only what is written counts).
    disk_size: int = Field(default=8, ge=1)
    # Seconds a VM gets to shut down after an ACPI power button press before it is killed.
    powerdown_timeout: Seconds = 10.0
    # The size of every label's VMs, unless `sizes` names the label.
    vcpus: int = Field(default=1, ge=1, le=256)
    memory: int = Field(default=1024, ge=128)
    sizes: dict[str, VmSize] = {}

    def size_of(self, label: str) -> VmSize:
        return self.sizes.get(label) or VmSize(vcpus=self.vcpus, memory=self.memory)


class Provider(Model):
    name: Name
    driver: str = "local"
    max_nodes: int = Field(default=20, ge=1)
    # Launches in flight at once; bounds the burst the launcher puts on the driver.
    max_parallel_launches: int = Field(default=16, ge=1)
    labels: list[Name] | None = None
    network: LocalNetwork = LocalNetwork()
    boot_timeout: Seconds = 60.0
    delete_timeout: Seconds = 60.0
    # Driver calls (creates and deletes) started per second, at most.
    rate: Rate = 50.0
    # Consecutive failed driver calls that pause the provider, and the first pause.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: Seconds = 30.0
    sim: SimSettings = SimSettings()
    qemu: QemuSettings = QemuSettings()
    aws: AwsSettings | None = None
    openstack: OpenStackSettings | None = None
    # Each node's limits where its label sets none (local driver).
    limits: NodeLimits = NodeLimits()
    # All nodes together: launches stop at what the largest label's node leaves room for.
    limits_total: TotalLimits = TotalLimits()
    # What a node here costs per hour, for usage accounting (config/pricing.py says
    # which price wins). Unset everywhere: the cost shows as unknown.
    cost_per_hour: PerHour | None = None
    label_cost_per_hour: dict[str, PerHour] = {}
    # A YAML file of `size: cost per hour` (instance types, flavors); a label's size here
    # is looked up in it.
    price_file: Path | None = None

    @model_validator(mode="after")
    def _cloud_settings(self) -> Provider:
        if self.driver == "aws" and self.aws is None:
            raise ValueError("driver aws needs an `aws:` section (region, ami, ...)")
        if self.driver == "openstack" and self.openstack is None:
            raise ValueError("driver openstack needs an `openstack:` section (cloud, image, ...)")
        return self

    def serves(self, label: str) -> bool:
        return self.labels is None or label in self.labels


class AutoReady(Model):
    """`min-ready: {auto: ...}`: the warm pool sized from past demand (core/demand.py)."""

    min: int = Field(default=0, ge=0)
    # Required: a forecast gone wrong must not launch without bound.
    max: int = Field(ge=1)
    # Seconds a request may wait for its node and still count as served at once.
    target_wait: Annotated[float, Field(ge=0)] = 1.0
    # The share of requests that should wait no longer than target-wait.
    service_level: float = Field(default=0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _bounds(self) -> AutoReady:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is more than max {self.max}")
        return self


class MinReadyAuto(Model):
    auto: AutoReady


def _auto_needs_settings(value: object) -> object:
    if value == "auto":
        raise ValueError(
            "min-ready: auto needs at least a max: write min-ready: {auto: {max: N}}"
            " (and optionally min, target-wait, service-level)"
        )
    auto = value.get("auto") if isinstance(value, dict) else None
    if isinstance(auto, dict) and "max" not in auto:
        raise ValueError("min-ready: {auto: ...} needs a max (the most ready nodes to keep)")
    return value


def _ready_kind(value: object) -> str:
    # One kind's errors only: a mapping is auto's settings, anything else a count.
    # (The tags are in brackets so the loader leaves them out of error paths.)
    return "[auto]" if isinstance(value, dict | MinReadyAuto) else "[count]"


class Label(Model):
    name: Name
    image: Name
    # A fixed warm pool, or {auto: {min, max, target-wait, service-level}}.
    min_ready: Annotated[
        Annotated[Annotated[int, Field(ge=0)], Tag("[count]")]
        | Annotated[MinReadyAuto, Tag("[auto]")],
        Discriminator(_ready_kind),
        BeforeValidator(_auto_needs_settings),
    ] = 1
    max_ready_age: Seconds | None = None
    ready_command: str = "true"
    test_timeout: Seconds = 30.0
    user: str = "root"
    # Ready nodes are re-tested this often; a failing one is replaced (0: never).
    health_interval: Annotated[float, Field(ge=0)] = 300.0
    # An in-use node whose job runs longer is reclaimed.
    job_timeout: Seconds = 3 * 3600.0
    # A held node is deleted after this long.
    max_hold_age: Seconds = 24 * 3600.0
    # This label's nodes' limits, over the provider's `limits`.
    limits: NodeLimits = NodeLimits()
    # A node of this label's cost per hour where its provider sets no price.
    cost_per_hour: PerHour | None = None

    @property
    def auto(self) -> AutoReady | None:
        return self.min_ready.auto if isinstance(self.min_ready, MinReadyAuto) else None

    @property
    def ready_floor(self) -> int:
        """The ready nodes kept when nothing else is known: the fixed min-ready, or
        auto's min (until the demand controller has chosen a target)."""
        return self.min_ready if isinstance(self.min_ready, int) else self.min_ready.auto.min

    # All of this label's nodes at once, on every provider and launcher (None: no cap).
    max_nodes: int | None = Field(default=None, ge=1)


class Config(Model):
    state_dir: Path = Path("/var/lib/freshpool")
    # SQLAlchemy URL of the store; default: SQLite in state-dir. For PostgreSQL:
    # postgresql+psycopg://user@host/db (pip install 'freshpool[postgres]').
    database_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds between reconcile passes when nothing wakes the launcher sooner.
    interval: Seconds = 1.0
    # Seconds between leak sweeps (listing every provider's instances by our tags).
    cleanup_interval: Seconds = 60.0
    # A request with no deadline of its own fails after waiting this long.
    request_timeout: Seconds = 3600.0
    providers: list[Provider] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1)
    images: list[Image] = Field(min_length=1)
    api: Api = Api()
    # Fair-share weights; a tenant not listed has weight 1.
    tenants: list[Tenant] = []
    statsd: Statsd | None = None
    # Several launchers on one PostgreSQL (docs/fleet.md): this one's name, how long a
    # provider's lease lasts unrenewed, and the providers it may drive (default: all).
    launcher_id: str | None = Field(default=None, min_length=1, max_length=200)
    lease_ttl: Annotated[float, Field(ge=1.0, le=600.0)] = 15.0
    serve_providers: list[Name] | None = None
    # Speak Nodepool's ZooKeeper protocol, so Zuul uses this pool unchanged.
    nodepool_compat: NodepoolCompat | None = None

    @property
    def launcher_name(self) -> str:
        return self.launcher_id or f"{socket.gethostname()}:{self.state_dir}"

    def cross_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems between sections (names used twice, references to nothing), with key paths."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for section in ("providers", "labels", "images", "tenants"):
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, section)):
                if item.name in seen:
                    problems.append(((section, i, "name"), f"the name {item.name!r} is used twice"))
                seen.add(item.name)
        images = sorted(i.name for i in self.images)
        labels = {x.name for x in self.labels}
        for i, label in enumerate(self.labels):
            if label.image not in images:
                problems.append(
                    (
                        ("labels", i, "image"),
                        f"no image named {label.image!r} (known: {', '.join(images)})",
                    )
                )
        for i, provider in enumerate(self.providers):
            for j, name in enumerate(provider.labels or []):
                if name not in labels:
                    problems.append((("providers", i, "labels", j), f"no label named {name!r}"))
            for name in provider.qemu.sizes:
                if name not in labels:
                    problems.append((("providers", i, "qemu", "sizes"), f"no label named {name!r}"))
            for name in provider.label_cost_per_hour:
                if name not in labels:
                    where = ("providers", i, "label-cost-per-hour", name)
                    problems.append((where, f"no label named {name!r}"))
        providers = {p.name for p in self.providers}
        for i, name in enumerate(self.serve_providers or []):
            if name not in providers:
                why = f"no provider named {name!r} (known: {', '.join(sorted(providers))})"
                problems.append((("serve-providers", i), why))
        problems += image_parent_problems(self.images)
        problems += self._limit_problems()
        return problems

    def _limit_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """A label's node that would not fit in a provider serving it, even alone."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, label in enumerate(self.labels):
            for provider in self.providers_for(label.name):
                each = label.limits.over(provider.limits)
                total = provider.limits_total
                for key in ("cpus", "memory", "disk"):
                    mine, cap = getattr(each, key), getattr(total, key)
                    if mine is None and cap is not None:
                        problems.append(
                            (
                                ("labels", i, "limits", key),
                                f"provider {provider.name!r} caps {key} for all its nodes"
                                f" (limits-total.{key}), so each node needs a {key} limit:"
                                " set limits." + key + " on the provider or this label",
                            )
                        )
                    if mine is not None and cap is not None and mine > cap:
                        problems.append(
                            (
                                ("labels", i, "limits", key),
                                f"{_shown(mine, key)} is more than provider {provider.name!r}"
                                f" gives all its nodes together (limits-total.{key}:"
                                f" {_shown(cap, key)})",
                            )
                        )
        return problems

    @property
    def tenant_quotas(self) -> dict[str, int]:
        """The most nodes each tenant with a quota may hold at once."""
        return {t.name: t.max_nodes for t in self.tenants if t.max_nodes is not None}

    def tenant_quota(self, name: str | None) -> int | None:
        return self.tenant_quotas.get(name or "")

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise UnknownName("label", name, [x.name for x in self.labels])

    def image(self, name: str) -> Image:
        for image in self.images:
            if image.name == name:
                return image
        raise UnknownName("image", name, [i.name for i in self.images])

    def total_cap(self, provider: Provider) -> int | None:
        """The nodes `provider` may run at once by its limits-total, each counted as the
        largest its labels make (None: no cap)."""
        fits = [
            provider.limits_total.nodes_of(label.limits.over(provider.limits))
            for label in self.labels
            if provider.serves(label.name)
        ]
        caps = [f for f in fits if f is not None]
        return min(caps) if caps else None

    def providers_for(self, label: str) -> list[Provider]:
        return providers_serving(self.providers, [label])


def _shown(value: float, key: str) -> str:
    return ByteSize(int(value)).human_readable(decimal=False) if key != "cpus" else f"{value:g}"
