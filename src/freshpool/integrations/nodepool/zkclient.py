"""The ZooKeeper session (kazoo) and the few recipes the protocol needs."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError, NotEmptyError

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
    path -> our contender znode (to release), or None. The parent of the paths must
    exist. Every call is sent before any answer is read, and ZooKeeper answers one
    session's calls in order, so the lock's folder, our contender and the listing of
    contenders made after it cost one round trip for any number of locks."""
    sent = []
    for path in paths:
        folder = zk.create_async(path)  # there already if anyone locked it before
        mine = zk.create_async(f"{path}/{uuid.uuid4().hex}__lock__", b"", ephemeral=True,
                               sequence=True)  # fmt: skip
        sent.append((path, folder, mine, zk.get_children_async(path)))
    taken: dict[str, str | None] = {}
    for path, folder, mine, listing in sent:
        with contextlib.suppress(NodeExistsError):
            folder.get()
        ours = str(mine.get())
        seq = _sequence(ours.rsplit("/", 1)[1])
        others = [_sequence(c) for c in listing.get()]
        first = all(other is None or seq is None or other >= seq for other in others)
        taken[path] = ours if first else None
        if not first:
            zk.delete_async(ours)  # read by nobody: a lost session drops it anyway
    return taken


def _sequence(name: str) -> str | None:
    match = _CONTENDER.search(name)
    return match.group(1) if match else None


def unlock(zk: KazooClient, contender: str) -> None:
    # A lost session already dropped the ephemeral znode.
    with contextlib.suppress(NoNodeError):
        zk.delete(contender)


def delete_tree(zk: KazooClient, path: str) -> None:
    try:
        zk.delete(path, recursive=True)
    except NoNodeError:
        pass
    except NotEmptyError:
        # A client's lock znode arrived mid-delete: once more takes it too.
        zk.delete(path, recursive=True)
