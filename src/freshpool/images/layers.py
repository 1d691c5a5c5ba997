"""Immutable image layers on disk, named by a digest of their content, found by cache key.

A layer is a directory tree as overlayfs stacks it: whiteouts (character devices 0/0)
and opaque directories (the `trusted.overlay.opaque` attribute) mark what it removes
from the layers below. Layers live in `<root>/sha256-<hex>/`; `<root>/keys/<key>`
names the layer a cache key produced and `<root>/meta/<digest>.json` describes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freshpool.images.remove import remove_tree

# Attributes overlayfs sets on an upper directory for its own bookkeeping (the lower
# inode a file was copied up from, and the like). They describe the mount the layer
# came from, not its content, so a snapshot drops them.
VOLATILE_XATTRS = frozenset(
    {
        b"trusted.overlay.origin",
        b"trusted.overlay.impure",
        b"trusted.overlay.nlink",
        b"trusted.overlay.upper",
        b"trusted.overlay.uuid",
    }
)
OPAQUE = b"trusted.overlay.opaque"
PREFIX = "sha256-"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TreeStats:
    """The digest and sizes of one tree: apparent bytes, bytes on disk, entries."""

    digest: str
    size_bytes: int
    disk_bytes: int
    entries: int


@dataclass(frozen=True)
class Layer:
    digest: str
    path: Path
    size_bytes: int = 0
    disk_bytes: int = 0
    entries: int = 0
    created: float = 0.0
    # How it was made: kind, step name, cache key, base manifest ...
    about: dict[str, Any] = field(default_factory=dict)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def digest_tree(root: Path, strip_volatile: bool = False) -> TreeStats:
    """A sha256 over everything in `root` that a stacked layer shows, in a fixed order.

    Covers each entry's relative path, type, mode, owner, content (file bytes, link
    target, device numbers) and extended attributes. Leaves out times, so running
    the same step twice gives the same digest when it writes the same files. With
    `strip_volatile`, overlayfs's bookkeeping attributes are removed on the way.
    """
    top = os.fsencode(root)
    outer = hashlib.sha256()
    # Hard links are hashed and counted once: their names share one inode's bytes.
    hashes: dict[tuple[int, int], bytes] = {}
    counted: set[tuple[int, int]] = set()
    size = disk = count = 0
    pending: list[bytes] = [b""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(top, relative) if relative else top) as scan:
            names = sorted(entry.name for entry in scan)
        children: list[bytes] = []
        for name in names:
            rel = os.path.join(relative, name) if relative else name
            path = os.path.join(top, rel)
            st = os.lstat(path)
            inode = (st.st_dev, st.st_ino)
            kind, content = _kind_and_content(path, st, hashes)
            xattrs = _xattrs(path, strip_volatile)
            fields = [
                rel,
                kind,
                b"%o" % stat.S_IMODE(st.st_mode),
                b"%d:%d" % (st.st_uid, st.st_gid),
                content,
                b";".join(k + b"=" + v for k, v in xattrs),
            ]
            outer.update(b"\0".join(fields) + b"\n")
            count += 1
            if inode not in counted:
                counted.add(inode)
                disk += st.st_blocks * 512
                if kind in (b"f", b"l"):
                    size += st.st_size
            if kind == b"d":
                children.append(rel)
        # Reversed onto the stack so directories are walked in name order.
        pending.extend(reversed(children))
    return TreeStats(PREFIX + outer.hexdigest(), size, disk, count)


def _kind_and_content(
    path: bytes, st: os.stat_result, hashes: dict[tuple[int, int], bytes]
) -> tuple[bytes, bytes]:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return b"d", b""
    if stat.S_ISLNK(mode):
        return b"l", os.readlink(path)
    if stat.S_ISREG(mode):
        inode = (st.st_dev, st.st_ino)
        found = hashes.get(inode)
        if found is None:
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    hasher.update(chunk)
            found = hasher.hexdigest().encode()
            hashes[inode] = found
        return b"f", found
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = b"c" if stat.S_ISCHR(mode) else b"b"
        return kind, b"%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    if stat.S_ISFIFO(mode):
        return b"p", b""
    return b"s", b""


def _xattrs(path: bytes, strip_volatile: bool) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    found = []
    for name in sorted(names):
        raw = os.fsencode(name)
        if raw in VOLATILE_XATTRS:
            if strip_volatile:
                with contextlib.suppress(OSError):
                    os.removexattr(path, name, follow_symlinks=False)
            continue
        try:
            found.append((raw, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return found


def merged_entry(stack: Sequence[Path], relative: str) -> Path | None:
    """The path of `relative` in the topmost layer (stack is top first) that shows it.

    None when it does not exist in the merged view: absent everywhere, or hidden by a
    whiteout or an opaque directory above it.
    """
    parts = Path(relative).parts
    for layer in stack:
        candidate = layer / relative
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None:
            return None if is_whiteout(st) else candidate
        if _hides_below(layer, parts):
            return None
    return None


def merged_listdir(stack: Sequence[Path], relative: str) -> list[str]:
    """Names in directory `relative` of the merged view of `stack` (top first)."""
    parts = Path(relative).parts
    shown: set[str] = set()
    hidden: set[str] = set()
    for layer in stack:
        directory = layer / relative
        try:
            st = os.lstat(directory)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                break
            for entry in os.scandir(directory):
                if entry.name in shown or entry.name in hidden:
                    continue
                if is_whiteout(entry.stat(follow_symlinks=False)):
                    hidden.add(entry.name)
                else:
                    shown.add(entry.name)
            if _is_opaque(directory):
                break
        if _hides_below(layer, parts):
            break
    return sorted(shown)


def _hides_below(layer: Path, parts: tuple[str, ...]) -> bool:
    """Whether an ancestor of the path in this layer hides the layers below it."""
    for depth in range(1, len(parts)):
        ancestor = layer.joinpath(*parts[:depth])
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or _is_opaque(ancestor):
            return True
    return False


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


class LayerStore:
    """The layers of one state directory, with their cache index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.keys = self.root / "keys"
        self.meta = self.root / "meta"
        self.scratch_root = self.root / ".tmp"
        self.trash = self.root / ".trash"
        self._sweeper: subprocess.Popen[bytes] | None = None

    def path(self, digest: str) -> Path:
        return self.root / digest

    def get(self, digest: str) -> Layer | None:
        path = self.path(digest)
        if not path.is_dir():
            return None
        try:
            data = json.loads((self.meta / f"{digest}.json").read_text())
        except (OSError, ValueError):
            data = {}
        data = {k: v for k, v in data.items() if k in Layer.__dataclass_fields__}
        data.update(digest=digest, path=path)
        return Layer(**data)

    def lookup(self, key: str) -> Layer | None:
        """The layer that `key` produced before, if it is still on disk."""
        try:
            digest = (self.keys / key).read_text().strip()
        except OSError:
            return None
        layer = self.get(digest)
        if layer is not None:
            # Its use time: what the store was last asked for stays longest.
            with contextlib.suppress(OSError):
                os.utime(self.keys / key)
        return layer

    def scratch(self) -> Path:
        """A new empty directory on the layers' file system, for one build node."""
        path = self.scratch_root / secrets.token_hex(6)
        path.mkdir(parents=True)
        return path

    def commit(self, tree: Path, key: str, about: dict[str, Any]) -> Layer:
        """Make `tree` an immutable layer (moving it), or drop it if that content exists.

        Overlayfs bookkeeping attributes are removed first; the digest covers the rest.
        """
        stats = digest_tree(tree, strip_volatile=True)
        target = self.path(stats.digest)
        self.root.mkdir(parents=True, exist_ok=True)
        if target.exists():
            remove_tree(tree)
        else:
            try:
                os.rename(tree, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # A scratch dir on another file system (a mount of its own): copy, keeping
                # whiteouts, attributes and hard links, then drop the original.
                subprocess.run(["cp", "-a", "--", str(tree), str(target)], check=True)
                remove_tree(tree)
        return self._record(stats, key, about)

    def link(
        self, tree: Path, key: str, about: dict[str, Any], stats: TreeStats | None = None
    ) -> Layer:
        """Use an existing read-only tree outside the store as a layer, through a symlink.

        For tests and benchmarks that share one cached base between many state dirs.
        `stats` (digest_tree's answer for the tree) saves walking it again.
        """
        stats = stats or digest_tree(tree)
        target = self.path(stats.digest)
        self.root.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            temporary = self.root / f".link-{secrets.token_hex(4)}"
            temporary.symlink_to(Path(tree).absolute())
            os.replace(temporary, target)
        return self._record(stats, key, {**about, "linked_from": str(tree)})

    def _record(self, stats: TreeStats, key: str, about: dict[str, Any]) -> Layer:
        self.meta.mkdir(parents=True, exist_ok=True)
        self.keys.mkdir(parents=True, exist_ok=True)
        meta = self.meta / f"{stats.digest}.json"
        existing = self.get(stats.digest)
        if existing is None or not meta.exists():
            layer = Layer(
                stats.digest,
                self.path(stats.digest),
                stats.size_bytes,
                stats.disk_bytes,
                stats.entries,
                time.time(),
                about,
            )
            data = asdict(layer)
            data.pop("path")
            _write_atomic(meta, json.dumps(data, indent=1, sort_keys=True))
        _write_atomic(self.keys / key, stats.digest + "\n")
        found = self.get(stats.digest)
        assert found is not None
        return found

    def layers(self) -> list[Layer]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        found = [self.get(name) for name in sorted(names) if name.startswith(PREFIX)]
        return [layer for layer in found if layer is not None]

    def discard(self, digests: Iterable[str]) -> list[str]:
        """Remove layers (and the cache keys naming them) without waiting for the disk."""
        gone = []
        self.trash.mkdir(parents=True, exist_ok=True)
        for digest in digests:
            path = self.path(digest)
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                os.rename(path, self.trash / f"{digest}.{secrets.token_hex(4)}")
            (self.meta / f"{digest}.json").unlink(missing_ok=True)
            gone.append(digest)
        if gone:
            self._drop_keys(set(gone))
            self.empty_trash()
        return gone

    def _drop_keys(self, digests: set[str]) -> None:
        try:
            entries = list(os.scandir(self.keys))
        except FileNotFoundError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if Path(entry.path).read_text().strip() in digests:
                    os.unlink(entry.path)

    def empty_trash(self, wait: bool = False) -> None:
        """Delete what discard() set aside, in a background process unless `wait`."""
        if self._sweeper is not None and self._sweeper.poll() is None:
            if not wait:
                return
            self._sweeper.wait()
        try:
            leftovers = [str(self.trash / name) for name in os.listdir(self.trash)]
        except FileNotFoundError:
            return
        if not leftovers:
            return
        argv = ["rm", "-rf", "--one-file-system", "--", *leftovers]
        self._sweeper = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait:
            self._sweeper.wait()

    def sweep_scratch(self) -> None:
        """Remove build-node directories that an interrupted build left (mounts included)."""
        try:
            names = os.listdir(self.scratch_root)
        except FileNotFoundError:
            return
        for name in names:
            remove_tree(self.scratch_root / name)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temporary.write_text(text)
    os.replace(temporary, path)
