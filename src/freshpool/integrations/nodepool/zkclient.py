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


def try_locks(
    zk: KazooClient, paths: Sequence[str], folders_exist: bool = False
) -> dict[str, str | None]:
    """Take the kazoo-recipe lock at each of `paths` if nobody holds it, never waiting:
    path -> our contender znode (to release), or None. The parent of the paths must
    exist. Every call is sent before any answer is read, and ZooKeeper answers one
    session's calls in order, so any number of locks cost one round trip, and a
    second for those whose folder was not as `folders_exist` guessed.

    A folder made in one transaction with our contender holds no one else's: that
    lock is ours without listing it. Where the folder exists, our contender and the
    listing of contenders made after it tell whether ours is first."""
    taken: dict[str, str | None] = dict.fromkeys(paths)
    to_make, to_list = ([], list(paths)) if folders_exist else (list(paths), [])
    for _ in range(3):  # a folder made or removed by someone else meanwhile, twice
        made = [(path, _with_folder(zk, path)) for path in to_make]
        listed = [(path, zk.create_async(_contender(path), b"", ephemeral=True,
                                         sequence=True), zk.get_children_async(path))
                  for path in to_list]  # fmt: skip
        to_make, to_list = [], []
        for path, commit in made:
            folder, mine = commit.get()
            if isinstance(folder, NodeExistsError):
                to_list.append(path)  # locked by someone before: list its contenders
            elif isinstance(folder, Exception):
                raise folder
            else:
                taken[path] = str(mine)
        for path, create, listing in listed:
            try:
                ours = str(create.get())
            except NoNodeError:
                to_make.append(path)  # no folder after all
                continue
            seq = _sequence(ours.rsplit("/", 1)[1])
            others = [_sequence(c) for c in listing.get()]
            if all(other is None or seq is None or other >= seq for other in others):
                taken[path] = ours
            else:
                zk.delete_async(ours)  # read by nobody: a lost session drops it anyway
        if not to_make and not to_list:
            break
    return taken


def _with_folder(zk: KazooClient, path: str) -> Any:
    both = zk.transaction()
    both.create(path)
    both.create(_contender(path), ephemeral=True, sequence=True)
    return both.commit_async()


def _contender(path: str) -> str:
    return f"{path}/{uuid.uuid4().hex}__lock__"


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
