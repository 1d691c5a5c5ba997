"""The image builder: real debootstrap builds, real failures, nothing mocked."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from freshpool.config import Image
from freshpool.images.base import content_key
from freshpool.images.debootstrap import STAGES, build_image, find_tools, remove_build
from freshpool.images.errors import ImageBuildError
from freshpool.images.remove import mounts_under
from tests.conftest import TEST_IMAGE

BWRAP_OFFLINE = [
    "--dev", "/dev",
    "--proc", "/proc",
    "--perms", "1777", "--tmpfs", "/tmp",
    # Not --unshare-all: its user namespace makes apt's switch to the _apt user fail.
    "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
    "--die-with-parent",
]  # fmt: skip


def _mount(kind: str, options: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", kind, "-o", options, kind, str(target)], check=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=False)


def _installed_in(rootfs: Path) -> dict[str, str]:
    out = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    return {name: version for status, name, version in rows if status.startswith("ii")}


def _assert_no_image(build_dir: Path) -> None:
    assert not (build_dir / "rootfs").exists()
    assert not (build_dir / ".rootfs.partial").exists()
    assert not (build_dir / "manifest.json").exists()
    assert (build_dir / "build.log").is_file()
    assert "FAILED:" in (build_dir / "build.log").read_text()


# --- a good build ------------------------------------------------------------------------


def test_manifest_describes_the_build(image_build_dir: Path) -> None:
    manifest = json.loads((image_build_dir / "manifest.json").read_text())
    assert manifest["image"] == TEST_IMAGE.name
    assert manifest["suite"] == "bookworm"
    assert manifest["mirror"].startswith(("http://", "https://"))
    assert manifest["variant"] == "minbase"
    assert manifest["packages"] == ["python3"]
    assert manifest["prefetch"] == ["make"]
    installed = manifest["installed"]
    assert {"openssh-server", "python3", "apt"} <= set(installed)
    assert "make" not in installed
    assert installed == _installed_in(image_build_dir / "rootfs")
    assert any(name.startswith("make_") for name in manifest["prefetched"])
    assert manifest["prefetch_bytes"] == sum(manifest["prefetched"].values()) > 0
    assert manifest["size_bytes"] > 100_000_000
    assert manifest["file_count"] > 1000
    assert datetime.fromisoformat(manifest["created"]).utcoffset() is not None
    assert list(manifest["timings"]) == list(STAGES)
    assert all(seconds >= 0 for seconds in manifest["timings"].values())
    assert manifest["builder_version"] >= 1
    assert manifest["content_key"] == content_key(TEST_IMAGE)
    log = (image_build_dir / "build.log").read_text()
    for stage in STAGES:
        assert f"==> {stage}:" in log


def test_content_key_follows_the_definition() -> None:
    assert content_key(TEST_IMAGE) == content_key(Image(**TEST_IMAGE.model_dump()))
    assert content_key(TEST_IMAGE) != content_key(TEST_IMAGE.model_copy(update={"prefetch": []}))


def test_image_has_sshd_and_no_shared_secrets(image_rootfs: Path) -> None:
    sshd = image_rootfs / "usr/sbin/sshd"
    assert sshd.is_file() and os.access(sshd, os.X_OK)
    assert sorted((image_rootfs / "etc/ssh").glob("ssh_host_*")) == []
    assert not (image_rootfs / "usr/sbin/policy-rc.d").exists()
    shadow = (image_rootfs / "etc/shadow").read_text().splitlines()
    root_password = next(line for line in shadow if line.startswith("root:")).split(":")[1]
    assert root_password.startswith("!")
    machine_id = image_rootfs / "etc/machine-id"
    assert not machine_id.exists() or machine_id.read_text() == ""
    assert (image_rootfs / "etc/resolv.conf").read_text() == ""
    assert stat.S_IMODE((image_rootfs / "tmp").stat().st_mode) == 0o1777


def test_prefetched_debs_kept_and_installed_debs_removed(image_rootfs: Path) -> None:
    debs = sorted(p.name for p in (image_rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert any(name.startswith("make_") for name in debs)
    installed = _installed_in(image_rootfs)
    assert [name for name in debs if name.split("_")[0] in installed] == []
    assert "make" not in installed
    assert not (image_rootfs / "usr/bin/make").exists()
    lists = image_rootfs / "var/lib/apt/lists"
    assert any(p.name.endswith("_Packages") for p in lists.iterdir())


@pytest.fixture
def overlay(image_rootfs: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy-on-write view of the image, as a node gets it."""
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for path in (upper, work):
        path.mkdir()
    _mount("overlay", f"lowerdir={image_rootfs},upperdir={upper},workdir={work}", merged)
    try:
        yield merged
    finally:
        _umount(merged)


def test_offline_install_from_the_prefetched_debs(overlay: Path, image_rootfs: Path) -> None:
    script = (
        "apt-get install --no-download -y make && make --version"
        # The network namespace has nothing but lo, so nothing could have been downloaded.
        " && [ $(tail -n +3 /proc/net/dev | wc -l) -eq 1 ]"
        # sshd runs once the node has a host key and /run/sshd, as the driver provides.
        " && mkdir -p /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /tmp/key"
        " && /usr/sbin/sshd -t -h /tmp/key"
    )
    result = subprocess.run(
        ["bwrap", "--bind", str(overlay), "/", *BWRAP_OFFLINE, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GNU Make" in result.stdout
    # The shared layer below is untouched.
    assert "make" not in _installed_in(image_rootfs)


def test_a_second_build_into_the_same_directory_is_refused(image_build_dir: Path) -> None:
    before = {name: (image_build_dir / name).read_text() for name in ("manifest.json", "build.log")}
    with pytest.raises(ImageBuildError) as caught:
        build_image(TEST_IMAGE, image_build_dir)
    assert caught.value.stage == "check"
    assert "already holds a build" in str(caught.value)
    for name, text in before.items():
        assert (image_build_dir / name).read_text() == text
    assert (image_build_dir / "rootfs/usr/sbin/sshd").is_file()


# --- failures ----------------------------------------------------------------------------


def test_unreachable_mirror_fails_after_retries(tmp_path: Path) -> None:
    image = Image(name="no-mirror", mirror="http://127.0.0.1:9/debian")
    build_dir = tmp_path / "build"
    seen: list[tuple[str, str]] = []
    started = time.monotonic()
    with pytest.raises(ImageBuildError) as caught:
        build_image(
            image,
            build_dir,
            progress=lambda stage, line: seen.append((stage, line)),
            retry_delay=0.01,
        )
    assert time.monotonic() - started < 20
    error = caught.value
    assert error.stage == "debootstrap"
    assert error.exit_code == 1
    assert not error.disk_full
    message = str(error)
    assert "http://127.0.0.1:9/debian" in message
    assert "after 3 tries" in message
    assert "Connection refused" in message
    assert "'debootstrap' (exit code 1)" in message
    assert error.log_tail and len(error.log_tail) <= 20
    _assert_no_image(build_dir)
    assert sum("try" in line and "of 3" in line for _, line in seen) == 2
    assert [stage for stage, _ in seen][:1] == ["check"]
    assert any(stage == "debootstrap" and line.startswith("I: ") for stage, line in seen)


def test_unknown_package_fails_naming_it(tmp_path: Path) -> None:
    image = Image(name="typo", packages=["python3", "no-such-package-fp"])
    build_dir = tmp_path / "build"
    with pytest.raises(ImageBuildError) as caught:
        build_image(image, build_dir, retry_delay=0.01)
    error = caught.value
    # Packages are installed by apt after debootstrap, which exits 100 on this.
    assert error.stage == "packages"
    assert error.exit_code == 100
    assert "unknown package in `packages`" in str(error)
    assert "no-such-package-fp" in error.reason
    _assert_no_image(build_dir)


def test_disk_full_fails_and_leaves_no_rootfs(tmp_path: Path) -> None:
    small = tmp_path / "small"
    _mount("tmpfs", "size=50m", small)
    try:
        build_dir = small / "build"
        with pytest.raises(ImageBuildError) as caught:
            build_image(TEST_IMAGE, build_dir, retry_delay=0.01)
        error = caught.value
        assert error.disk_full
        assert "disk is full" in str(error)
        # Retrying cannot help a full disk: one try only.
        assert "try 1 of" not in (build_dir / "build.log").read_text()
        _assert_no_image(build_dir)
        # Everything the build wrote, apart from its log, is gone again.
        assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 49_000_000
    finally:
        _umount(small)


def test_missing_tools_are_named_with_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError) as caught:
        find_tools(search_path=str(tmp_path))
    assert "debootstrap and bwrap not found" in str(caught.value)
    assert "apt-get install debootstrap bubblewrap" in str(caught.value)


def test_a_build_needs_root() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops root, then asks for a build
        os.close(read)
        message = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            find_tools()
        except ImageBuildError as exc:
            message = str(exc)
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert "must run as root" in message


# --- removing a build --------------------------------------------------------------------


def test_remove_build_unmounts_and_ignores_modes(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    locked = build_dir / "rootfs/usr/share/locked"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    locked.chmod(0o555)
    (build_dir / "rootfs/usr").chmod(0o500)
    # What a killed debootstrap leaves behind: a file system still mounted inside.
    mounted = build_dir / ".rootfs.partial/proc"
    _mount("tmpfs", "size=1m", mounted)
    (mounted / "inside").write_text("x")
    (build_dir / "build.log").write_text("log")

    remove_build(build_dir)

    assert not build_dir.exists()
    assert mounts_under(tmp_path) == []
    remove_build(build_dir)  # already gone: nothing to do
