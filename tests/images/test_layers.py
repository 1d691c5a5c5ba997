"""Layers on disk: content digests, whiteouts through a real snapshot, the cache index."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool.images.buildnode import BuildNode
from freshpool.images.layers import (
    OPAQUE,
    LayerStore,
    digest_tree,
    is_whiteout,
    merged_entry,
    merged_listdir,
)


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/a").write_text("a\n")
    (root / "etc/link").symlink_to("a")
    (root / "opt").mkdir()
    (root / "opt/tool").write_text("#!/bin/sh\n")
    (root / "opt/tool").chmod(0o755)
    return root


def test_digest_covers_content_and_metadata_but_not_times(tmp_path: Path) -> None:
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    os.utime(two / "etc/a", (1, 1))
    first = digest_tree(one)
    assert first.digest.startswith("sha256-") and len(first.digest) == 7 + 64
    assert digest_tree(two).digest == first.digest
    assert first.entries == 5
    assert first.size_bytes == len("a\n") + len("#!/bin/sh\n") + len("a")

    (two / "opt/tool").chmod(0o700)
    assert digest_tree(two).digest != first.digest
    (two / "opt/tool").chmod(0o755)
    os.chown(two / "etc/a", 1000, 1000)
    assert digest_tree(two).digest != first.digest
    os.chown(two / "etc/a", 0, 0)
    (two / "etc/a").write_text("b\n")
    assert digest_tree(two).digest != first.digest
    (two / "etc/a").write_text("a\n")
    assert digest_tree(two).digest == first.digest
    # A whiteout and an opaque mark are content of a layer too.
    os.mknod(two / "etc/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    with_whiteout = digest_tree(two).digest
    assert with_whiteout != first.digest
    os.setxattr(two / "opt", OPAQUE, b"y")
    assert digest_tree(two).digest not in (first.digest, with_whiteout)


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "layers")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return _tree(tmp_path / "base")


def _snapshot(store: LayerStore, lowers: list[Path], script: str, key: str) -> Path:
    with BuildNode(lowers, store.scratch()) as node:
        code = node.run(["/bin/sh", "-e", "-c", script], {}, on_line=print, timeout=60)
        assert code == 0
    layer = store.commit(node.upper, key, {"kind": "test"})
    # The upper dir became the layer; finish() removed the rest but the directory.
    node.scratch.rmdir()
    return layer.path


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points made by a test, unmounted at the end."""
    made: list[Path] = []
    yield made
    for point in made:
        subprocess.run(["umount", str(point)], check=False)


def _merged(tmp_path: Path, stack: list[Path], mounted: list[Path]) -> Path:
    target = tmp_path / f"merged{len(mounted)}"
    target.mkdir()
    lower = ":".join(str(p) for p in stack)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(target)], check=True
    )
    mounted.append(target)
    return target


def test_a_snapshot_keeps_whiteouts_and_opaque_dirs(
    store: LayerStore, base: Path, image_rootfs: Path, tmp_path: Path, mounted: list[Path]
) -> None:
    """A step that deletes files from the layers below: the deletion survives the snapshot."""
    # The small tree over the session's image, which has the shell and mount points.
    lowers = [base, image_rootfs]
    layer = _snapshot(
        store, lowers, "rm /etc/a; rm -r /opt; mkdir /opt; echo new > /opt/only", "k1"
    )
    assert is_whiteout(os.lstat(layer / "etc/a"))
    assert os.getxattr(layer / "opt", OPAQUE) == b"y"
    # Nothing of the build node's own mounts (policy-rc.d, resolv.conf) stays behind,
    # nor overlayfs's bookkeeping.
    assert not (layer / "usr").exists()
    assert not (layer / "etc/resolv.conf").exists()
    assert not [n for n in os.listxattr(layer / "etc") if "overlay.origin" in n]

    stack = [layer, *lowers]
    merged = _merged(tmp_path, stack, mounted)
    assert not (merged / "etc/a").exists()
    assert (merged / "etc/link").is_symlink()
    assert sorted(os.listdir(merged / "opt")) == ["only"]
    assert (merged / "etc/debian_version").is_file()
    # The same answers without a mount, as the manifest computes them.
    assert merged_entry(stack, "etc/a") is None
    assert merged_entry(stack, "opt/tool") is None
    assert merged_entry(stack, "etc/link") == base / "etc/link"
    assert merged_entry(stack, "etc/debian_version") == image_rootfs / "etc/debian_version"
    assert merged_listdir(stack, "opt") == ["only"]
    assert merged_listdir(stack, "etc") == sorted(os.listdir(merged / "etc"))


def test_the_cache_index_finds_dedupes_and_forgets_layers(
    store: LayerStore, base: Path, image_rootfs: Path
) -> None:
    lowers = [base, image_rootfs]
    one = _snapshot(store, lowers, "echo same > /etc/x", "key-one")
    two = _snapshot(store, lowers, "echo same > /etc/x", "key-two")
    # Same content, same layer: one directory for both keys.
    assert one == two
    assert [layer.path for layer in store.layers()] == [one]
    assert store.lookup("key-one").path == one
    assert store.lookup("key-two").path == one
    assert store.lookup("key-three") is None
    # Nothing is left of the build nodes.
    assert os.listdir(store.scratch_root) == []

    store.discard([one.name])
    store.empty_trash(wait=True)
    assert not one.exists()
    assert store.lookup("key-one") is None
    assert store.layers() == []
    assert os.listdir(store.trash) == []


def test_a_linked_layer_is_used_in_place_and_only_unlinked(store: LayerStore, base: Path) -> None:
    layer = store.link(base, "base-key", {"kind": "base"})
    assert layer.path.is_symlink() and layer.path.resolve() == base.resolve()
    assert layer.digest == digest_tree(base).digest
    assert store.lookup("base-key").digest == layer.digest
    store.discard([layer.digest])
    assert not os.path.lexists(layer.path)
    assert (base / "etc/a").read_text() == "a\n"
