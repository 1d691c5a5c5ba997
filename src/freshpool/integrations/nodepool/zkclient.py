"""The ZooKeeper session (kazoo) and the few recipes the protocol needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NotEmptyError
from kazoo.recipe.lock import Lock

from freshpool.config.nodepool import NodepoolCompat


def connect(settings: NodepoolCompat) -> KazooClient:
    """A client for the ensemble (not started); TLS with a client certificate if set."""
    hosts = settings.hosts + (settings.chroot or "")
    tls: dict[str, Any] = {}
    if settings.tls is not None:
        tls = {
            "use_ssl": True,
            "ca": str(settings.tls.ca),
            "certfile": str(settings.tls.cert),
            "keyfile": str(settings.tls.key),
            "verify_certs": True,
        }
    return KazooClient(hosts=hosts, timeout=settings.session_timeout, **tls)


def try_lock(zk: KazooClient, path: str) -> Lock | None:
    """Nodepool's (kazoo's) lock on `path`, if nobody holds it; never waits."""
    lock = Lock(zk, path)
    try:
        return lock if lock.acquire(blocking=False) else None
    except NoNodeError:
        return None


def unlock(lock: Lock) -> None:
    # A lost session already dropped the lock's ephemeral znode; release copes.
    lock.release()


def locked(zk: KazooClient, path: str, watch: Callable[[Any], None] | None = None) -> bool:
    """Whether anyone holds the lock at `path` (a contender's znode under it)."""
    try:
        return bool(zk.get_children(path, watch=watch))
    except NoNodeError:
        if watch is not None:
            zk.exists(path, watch=watch)
        return False


def delete_tree(zk: KazooClient, path: str) -> None:
    try:
        zk.delete(path, recursive=True)
    except NoNodeError:
        pass
    except NotEmptyError:
        # A client's lock znode arrived mid-delete: once more takes it too.
        zk.delete(path, recursive=True)
