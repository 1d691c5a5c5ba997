"""The `openstack` driver: nodes are Nova servers, launched and found by our metadata."""

from freshpool.drivers.openstack.driver import OpenStackDriver

__all__ = ["OpenStackDriver"]
