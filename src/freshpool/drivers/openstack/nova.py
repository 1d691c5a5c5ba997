"""An `openstack` provider's connection, what its refusals mean to freshpool, its
flavors, and its quota.

openstacksdk retries nothing here (its defaults): a failed call is one failed driver
call, and the launcher retries it with the one backoff (core/backoff.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from freshpool.config.clouds import FlavorChoice, OpenStackSettings
from freshpool.drivers.base import DriverError, DriverUnavailable, QuotaExceeded
from freshpool.drivers.cloud.calls import Blocking
from freshpool.drivers.cloud.quota import QuotaRoom

_HTTP_STATUS = re.compile(r"\(HTTP (\d{3})\)")


def connect(provider: str, settings: OpenStackSettings) -> Any:
    """A connection for the clouds.yaml entry `settings.cloud` (not authenticated yet)."""
    try:
        import openstack
        import openstack.exceptions
    except ImportError:
        raise DriverUnavailable(
            'the openstack driver needs openstacksdk: pip install "freshpool[openstack]"'
        ) from None
    try:
        return openstack.connect(cloud=settings.cloud, region_name=settings.region,
                                 api_timeout=settings.api_timeout)  # fmt: skip
    except openstack.exceptions.ConfigException as exc:
        raise DriverUnavailable(
            f"provider {provider}: clouds.yaml has no usable cloud {settings.cloud!r}: {exc}"
        ) from None


def driver_error(provider: str, what: str, exc: BaseException) -> DriverError:
    """`exc` from openstacksdk as the DriverError freshpool acts on, naming the
    provider, the call and the cloud's own status and words."""
    status = getattr(exc, "status_code", None) or getattr(exc, "http_status", None)
    if status is None and (found := _HTTP_STATUS.search(str(exc))):
        status = int(found.group(1))  # keystoneauth's errors, wrapped by openstacksdk
    details = getattr(exc, "details", None) or str(exc)
    text = f"provider {provider}: {what}: {status or type(exc).__name__}: {details}"
    if status == 403 and "quota" in str(details).lower():
        return QuotaExceeded(text)
    if status == 401:
        return DriverUnavailable(f"{text} (check the clouds.yaml credentials)")
    return DriverError(text)


def find(finder: Callable[..., Any], name_or_id: str) -> Any:
    """What a `find_*` proxy method finds, None when the cloud says there is none."""
    import openstack.exceptions

    try:
        return finder(name_or_id, ignore_missing=False)
    except openstack.exceptions.NotFoundException:
        return None


def pick_flavor(provider: str, conn: Any, choice: FlavorChoice) -> Any:
    """The flavor named, or the smallest with the RAM and vCPUs asked for."""
    if choice.name is not None:
        flavor = find(conn.compute.find_flavor, choice.name)
        if flavor is None:
            raise DriverUnavailable(f"provider {provider}: no flavor {choice.name!r}")
        return flavor
    fits = [f for f in conn.compute.flavors(details=True)
            if f.ram >= (choice.min_ram or 0) and f.vcpus >= (choice.vcpus or 0)]  # fmt: skip
    if not fits:
        raise DriverUnavailable(
            f"provider {provider}: no flavor with {choice.min_ram or 0} MiB and "
            f"{choice.vcpus or 0} vCPUs or more"
        )
    return min(fits, key=lambda f: (f.vcpus, f.ram, f.name))


class NovaQuota(QuotaRoom):
    """Nova's absolute limits (instances, cores, RAM) less what the project runs that
    is not ours, over the largest flavor this provider launches."""

    def __init__(self, provider: str, conn: Any, blocking: Blocking, interval: float,
                 caps: tuple[int | None, int | None], size: Callable[[], tuple[int, int]],
                 ours: Callable[[], list[Any]]) -> None:  # fmt: skip
        super().__init__(provider, blocking, interval, *caps)
        self.conn = conn
        self.size = size
        self.ours = ours

    def node_size(self) -> tuple[int, int]:
        return self.size()

    def read(self, size: tuple[int, int]) -> int | None:
        limits = self.conn.compute.get_limits().absolute
        mine = self.ours()
        cores, ram = size
        our_cores = sum(int((s.flavor or {}).get("vcpus", 0)) for s in mine)
        our_ram = sum(int((s.flavor or {}).get("ram", 0)) for s in mine)
        fits = []
        for limit, used, ours, per_node in (
            (limits.instances, limits.instances_used, len(mine), 1),
            (limits.total_cores, limits.total_cores_used, our_cores, cores),
            (limits.total_ram, limits.total_ram_used, our_ram, ram),
        ):
            if limit is None or int(limit) < 0:  # -1: unlimited
                continue
            theirs = max(0, int(used or 0) - ours)
            fits.append(max(0, (int(limit) - theirs) // max(1, per_node)))
        room = min(fits) if fits else None
        self.last = {"instances": limits.instances, "instances_used": limits.instances_used,
                     "cores": limits.total_cores, "cores_used": limits.total_cores_used,
                     "ram": limits.total_ram, "ram_used": limits.total_ram_used,
                     "ours": len(mine), "nodes_fit": room}  # fmt: skip
        return room
