"""The local driver: nodes as Linux-namespace containers on this host (see driver.py)."""

from freshpool.drivers.local.driver import LocalDriver

__all__ = ["LocalDriver"]
