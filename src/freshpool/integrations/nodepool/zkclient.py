"""The ZooKeeper session (kazoo) and the few recipes the protocol needs."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NotEmptyError

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


# kazoo's Lock recipe, which Zuul and Nodepool use: a contender is an ephemeral
# sequential child "<uuid>__lock__<seq>"; the lowest sequence holds the lock.
_CONTENDER = re.compile(r"__r?lock__(\d+)$")


def try_locks(zk: KazooClient, paths: Sequence[str]) -> dict[str, str | None]:
    """Take the kazoo-recipe lock at each of `paths` if nobody holds it, never waiting:
    path -> our contender znode (to release), or None. Each phase is sent for every
    path before any answer is read, so many locks cost two round trips, not 2 x n."""
    creates = [
        (p, zk.create_async(f"{p}/{uuid.uuid4().hex}__lock__", b"", ephemeral=True,
                            sequence=True, makepath=True))
        for p in paths
    ]  # fmt: skip
    ours = {p: str(c.get()) for p, c in creates}
    listings = [(p, zk.get_children_async(p)) for p in paths]
    taken: dict[str, str | None] = {}
    for path, listing in listings:
        mine = _sequence(ours[path].rsplit("/", 1)[1])
        others = [_sequence(c) for c in listing.get()]
        first = all(seq is None or mine is None or seq >= mine for seq in others)
        taken[path] = ours[path] if first else None
    for path, held in taken.items():
        if held is None:
            unlock(zk, ours[path])
    return taken


def _sequence(name: str) -> str | None:
    match = _CONTENDER.search(name)
    return match.group(1) if match else None


def unlock(zk: KazooClient, contender: str) -> None:
    # A lost session already dropped the ephemeral znode.
    with contextlib.suppress(NoNodeError):
        zk.delete(contender)


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
