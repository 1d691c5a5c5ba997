"""Build an image's debootstrap base: a Debian root file system that jobs can install from offline.

The stages: debootstrap a Debian system, prepare it for running package scripts,
pre-fetch packages that jobs install later without network, clean out what must not
be shared between nodes, then move the result into place and describe it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from freshpool.config import Image
from freshpool.images import dpkg
from freshpool.images.base import content_key
from freshpool.images.buildlog import TAIL_LINES, DiskFullLog, Progress
from freshpool.images.errors import CommandFailed, HostCannotBuild, ImageBuildError
from freshpool.images.failures import (
    disk_full_reason,
    failure_evidence,
    failure_kind,
    is_disk_full,
    missing_packages,
)
from freshpool.images.manifest import base_manifest, write_base_manifest
from freshpool.images.mirror import MirrorNotFound, host_mirror
from freshpool.images.remove import remove_tree
from freshpool.images.retry import ATTEMPTS, DownloadRetry, base_delay
from freshpool.images.rootcommand import HOST_RESOLV, SEARCH_PATH, RootCommands

STAGES = ("debootstrap", "prepare", "packages", "prefetch", "clean", "finalize")
ROOTFS = "rootfs"
PARTIAL = ".rootfs.partial"
MANIFEST = "manifest.json"
LOG = "build.log"
LOCK = ".build.lock"

TOOLS = ("debootstrap", "bwrap")
INSTALL_HINT = "apt-get install debootstrap bubblewrap"
# Package scripts run during the build must not start services: they would run on the
# host's network and outlive the build.
POLICY_RC_D = (
    "#!/bin/sh\n# freshpool image build: no service starts while packages install.\nexit 101\n"
)

T = TypeVar("T")


def build_image(
    image: Image,
    build_dir: Path,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    attempts: int = ATTEMPTS,
    retry_delay: float | None = None,
) -> dict[str, Any]:
    """Build `image` into build_dir/rootfs, write build_dir/manifest.json and build_dir/build.log.

    Returns the manifest. `progress(stage, line)` is called with a one-line
    description when each stage starts ("check", then STAGES) and with every line of
    output after it.
    Downloads that fail for network reasons are tried `attempts` times, with the
    backoff of images/retry.py from `retry_delay` (default: the environment variable
    FRESHPOOL_BUILD_RETRY_DELAY, else DEFAULT_RETRY_DELAY). On any failure the partial
    root file system is removed, build.log is kept, and ImageBuildError is raised.
    """
    delay = base_delay(retry_delay)
    tools = find_tools()
    build_dir = Path(build_dir).absolute()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError("check", f"cannot create {build_dir}: {exc.strerror}") from None
    builder = _Builder(image, build_dir, cache_dir, progress, tools, attempts, delay)
    with _locked(build_dir):
        return builder.run()


def build_cached(image: Image, cache_root: Path, progress: Progress | None = None) -> Path:
    """A build of `image` under cache_root, reused while the definition is unchanged.

    For tests and benchmarks that need one good image and must not pay for a
    debootstrap each run.
    """
    build_dir = Path(cache_root) / f"image-{content_key(image)[:12]}"
    if not (build_dir / MANIFEST).exists():
        remove_tree(build_dir)
        build_image(image, build_dir, cache_dir=Path(cache_root) / "debootstrap", progress=progress)
    return build_dir


def remove_build(build_dir: Path) -> None:
    """Delete a build directory and everything in it, mounts and read-only modes included."""
    remove_tree(Path(build_dir))


def find_tools(search_path: str = SEARCH_PATH) -> dict[str, str]:
    """The absolute paths of debootstrap and bwrap, after checking that a build can run at all."""
    found = {tool: shutil.which(tool, path=search_path) for tool in TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise HostCannotBuild("check", f"{' and '.join(missing)} not found: run `{INSTALL_HINT}`")
    if os.geteuid() != 0:
        raise HostCannotBuild(
            "check",
            "image builds must run as root (debootstrap creates device nodes and chroots, "
            "bwrap mounts the image)",
        )
    return {tool: path for tool, path in found.items() if path is not None}


def tree_stats(root: Path) -> tuple[int, int]:
    """(bytes, entries) below `root`: apparent sizes of files and links, hard links once."""
    size = 0
    count = 0
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    size += st.st_size
    return size, count


@contextlib.contextmanager
def _locked(build_dir: Path) -> Iterator[None]:
    try:
        handle = open(build_dir / LOCK, "w")  # noqa: SIM115 - closed below, after the build
    except OSError as exc:
        if is_disk_full(exc):
            raise ImageBuildError("check", f"the disk is full under {build_dir}") from None
        raise
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageBuildError("check", f"another build into {build_dir} is running") from None
        yield


class _Builder:
    def __init__(
        self,
        image: Image,
        build_dir: Path,
        cache_dir: Path | None,
        progress: Progress | None,
        tools: dict[str, str],
        attempts: int,
        retry_delay: float,
    ) -> None:
        self.image = image
        self.build_dir = build_dir
        self.cache_dir = Path(cache_dir).absolute() if cache_dir is not None else None
        self.tools = tools
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.partial = build_dir / PARTIAL
        self.rootfs = build_dir / ROOTFS
        self.mirror = image.mirror
        self.log = DiskFullLog(progress, "check")
        self.commands = RootCommands(tools["bwrap"], self.partial, self.log)
        self.timings: dict[str, float] = {}
        self.moved_into_place = False
        self.prefetched: dict[str, int] = {}
        self._apt_updated = False
        self.installed: dict[str, str] = {}

    # --- the build -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        # Before the log is opened: a finished build's log must not gain a failure.
        if self.rootfs.exists() or (self.build_dir / MANIFEST).exists():
            raise ImageBuildError(
                "check",
                f"{self.build_dir} already holds a build: remove_build() it first, "
                "or build into a new directory",
            )
        self._open_log()
        try:
            self._check()
            for stage, step in (
                ("debootstrap", self._debootstrap),
                ("prepare", self._prepare),
                ("packages", self._packages),
                ("prefetch", self._prefetch),
                ("clean", self._clean),
            ):
                began = time.monotonic()
                step()
                self.timings[stage] = round(time.monotonic() - began, 3)
            manifest = self._finalize()
            self.log.line(
                f"built {self.image.name} in {time.monotonic() - started:.1f} s: "
                f"{manifest['size_bytes']} bytes, {manifest['file_count']} entries"
            )
        except BaseException as exc:
            error = self._as_build_error(exc)
            self._discard()
            self._write_after_failure(error or exc)
            if error is not None and error is not exc:
                raise error from exc
            raise
        finally:
            self.log.close()
        return manifest

    def _check(self) -> None:
        self.log.start("check", f"checking {self.build_dir}")
        if self.partial.exists():
            self.log.emit(f"removing {self.partial} left by an interrupted build")
            remove_tree(self.partial)
        if self.mirror == "auto":
            try:
                self.mirror = host_mirror(self.image.suite)
            except MirrorNotFound as exc:
                raise HostCannotBuild("check", str(exc)) from None
            self.log.emit(f"mirror: {self.mirror} (from the host's apt sources)")
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _debootstrap(self) -> None:
        # Only what the base needs: debootstrap's own dependency order fails to
        # configure some packages (cloud-init's Python libraries); apt installs the rest.
        include = "openssh-server"
        argv = [self.tools["debootstrap"]]
        if self.image.variant != "default":
            argv.append(f"--variant={self.image.variant}")
        argv.append(f"--include={include}")
        self.log.start("debootstrap", f"debootstrap {self.image.suite} from {self.mirror}")
        if self.cache_dir is not None:
            if self.commands.has_option(self.tools["debootstrap"], "--cache-dir"):
                argv.append(f"--cache-dir={self.cache_dir}")
            else:
                self.log.emit("this debootstrap has no --cache-dir: every .deb is downloaded")
        argv += [self.image.suite, str(self.partial), self.mirror]

        def attempt() -> None:
            # debootstrap resumes nothing: each try starts from an empty target.
            remove_tree(self.partial)
            try:
                self.commands.run(argv, "debootstrap")
            except CommandFailed as failed:
                failed.extra = self._debootstrap_log()
                raise

        self._retrying(attempt)

    def _prepare(self) -> None:
        self.log.start("prepare", "policy-rc.d, /tmp and resolv.conf for the build")
        root = self.partial
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        tmp = root / "tmp"
        tmp.mkdir(exist_ok=True)
        # chmod, not mkdir's mode: the umask would drop the sticky and world bits.
        os.chmod(tmp, 0o1777)
        # bwrap binds the host's file over this one, so it must be a plain file, not a
        # link that points into the host's /run.
        resolv = root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        resolv.write_text(HOST_RESOLV.read_text() if HOST_RESOLV.is_file() else "")

    def _apt_update(self) -> None:
        if self._apt_updated:
            return
        # Translations only serve people reading descriptions, which no job does.
        update = ["apt-get", "update", "--error-on=any", "-o", "Acquire::Languages=none"]
        in_root = self.commands.in_root
        self._retrying(lambda: self.commands.run(in_root(update), "apt-get update"))
        self._apt_updated = True

    def _packages(self) -> None:
        if not self.image.packages:
            self.log.start("packages", "no packages to install")
            return
        self.log.start("packages", f"installing {' '.join(self.image.packages)}")
        self._apt_update()
        install = ["apt-get", "install", "-y", "--no-install-recommends", *self.image.packages]
        in_root = self.commands.in_root
        self._retrying(lambda: self.commands.run(in_root(install), "apt-get install"))
        # Installed debs are not kept: only what `prefetch` fetches stays in the archives.
        self.commands.run(in_root(["apt-get", "clean"]), "apt-get clean")

    def _prefetch(self) -> None:
        if not self.image.prefetch:
            self.log.start("prefetch", "nothing to pre-fetch")
            return
        self.log.start("prefetch", f"downloading {' '.join(self.image.prefetch)}")
        archives = self.partial / "var/cache/apt/archives"
        before = {p.name for p in archives.glob("*.deb")}
        self._apt_update()
        in_root = self.commands.in_root
        fetch = ["apt-get", "install", "--download-only", "-y", *self.image.prefetch]
        self._retrying(lambda: self.commands.run(in_root(fetch), "apt-get install --download-only"))
        self.prefetched = {
            p.name: p.stat().st_size for p in sorted(archives.glob("*.deb")) if p.name not in before
        }
        total = sum(self.prefetched.values())
        self.log.emit(f"pre-fetched {len(self.prefetched)} packages, {total} bytes")

    def _clean(self) -> None:
        self.log.start("clean", "removing installed .debs, host keys and build-only files")
        root = self.partial
        installed = dpkg.installed_in(root, self.commands.env)
        versions = {(name.split(":")[0], version) for name, version in installed.items()}
        removed = 0
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            parts = deb.name.removesuffix(".deb").split("_")
            if len(parts) == 3 and (parts[0], parts[1].replace("%3a", ":")) in versions:
                deb.unlink()
                removed += 1
        self.log.emit(f"removed {removed} .debs of installed packages")
        (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        # Every node generates its own host keys; a shared key would let one node
        # impersonate all the others.
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        self.commands.run(self.commands.in_root(["passwd", "-l", "root"]), "passwd -l root")
        machine_id = root / "etc/machine-id"
        if machine_id.is_file() and not machine_id.is_symlink():
            machine_id.write_text("")
        # The build's resolver and the host's name stay out of the image; the node
        # driver provides both.
        (root / "etc/resolv.conf").write_text("")
        (root / "etc/hostname").write_text("localhost\n")
        self.installed = installed

    def _finalize(self) -> dict[str, Any]:
        began = time.monotonic()
        self.log.start("finalize", f"moving the image to {self.rootfs}")
        size, count = tree_stats(self.partial)
        # The manifest is the mark of a complete build, so the tree reaches the disk first.
        os.sync()
        os.rename(self.partial, self.rootfs)
        self.moved_into_place = True
        self.timings["finalize"] = round(time.monotonic() - began, 3)
        manifest = base_manifest(
            self.image,
            mirror=self.mirror,
            installed=self.installed,
            prefetched=self.prefetched,
            size=size,
            count=count,
            timings=self.timings,
        )
        write_base_manifest(self.build_dir / MANIFEST, manifest)
        self.log.emit(f"image {self.image.name}: {size} bytes, {count} entries")
        return manifest

    # --- failure -------------------------------------------------------------------------

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """Call `attempt`, again after a backoff while the network fails it."""

        def classified() -> T:
            try:
                return attempt()
            except CommandFailed as failed:
                failed.kind = self._classify(failed)
                raise

        retry = DownloadRetry(self.attempts, self.retry_delay, self.log.emit)
        try:
            return retry.run(classified)
        except CommandFailed as failed:
            raise self._command_error(failed, failed.kind, retry.tries) from None

    def _classify(self, failed: CommandFailed) -> str:
        if self.log.lost_lines:
            return "disk"
        lines = failed.output + failed.extra
        kind = failure_kind(lines, self.build_dir)
        # An unknown package wins over network lines: no retry can make it appear,
        # and a failed lookup can print lines that read like a failed download.
        if kind != "disk" and missing_packages(lines):
            return "package"
        return kind

    def _command_error(self, failed: CommandFailed, kind: str, tries: int) -> ImageBuildError:
        lines = failed.output + failed.extra
        if kind == "disk":
            reason = disk_full_reason(self.build_dir, failure_evidence(lines, "disk"))
        elif kind == "package":
            section = "prefetch" if self.log.stage == "prefetch" else "packages"
            names = ", ".join(missing_packages(lines))
            reason = f"unknown package in `{section}` of image {self.image.name}: {names}"
        elif kind == "network":
            reason = (
                f"cannot download from the mirror {self.mirror} after {tries}"
                f" {'try' if tries == 1 else 'tries'}: {failure_evidence(lines, 'network')}"
            )
        else:
            errors = [line for line in lines if line.startswith("E:")]
            reason = f"{failed.what} failed" + (f": {errors[-1]}" if errors else "")
        return ImageBuildError(
            self.log.stage,
            reason,
            exit_code=failed.exit_code,
            log_tail=failed.output[-TAIL_LINES:] or list(self.log.recent),
            disk_full=kind == "disk",
        )

    def _as_build_error(self, exc: BaseException) -> ImageBuildError | None:
        if isinstance(exc, ImageBuildError):
            return exc
        if isinstance(exc, CommandFailed):
            return self._command_error(exc, self._classify(exc), 1)
        if is_disk_full(exc) or (isinstance(exc, OSError) and self.log.lost_lines):
            return ImageBuildError(
                self.log.stage,
                f"the disk is full (no space left on device) under {self.build_dir}: {exc}",
                log_tail=list(self.log.recent),
                disk_full=True,
            )
        return None

    def _discard(self) -> None:
        """Leave no image behind: a partial tree must never be taken for a build."""
        for path in (self.partial, self.build_dir / f"{MANIFEST}.tmp"):
            try:
                remove_tree(path)
            except OSError as exc:
                self.log.line(f"could not remove {path}: {exc}")
        if self.moved_into_place:
            try:
                remove_tree(self.rootfs)
            except OSError as exc:
                self.log.line(f"could not remove {self.rootfs}: {exc}")

    def _write_after_failure(self, error: BaseException) -> None:
        # The partial tree is gone, so a log that stopped on a full disk can go on.
        if self.log.file is None:
            self._open_log()
        if self.log.lost_lines:
            self.log.line("(lines are missing above: the disk was full)")
        summary = error.summary if isinstance(error, ImageBuildError) else str(error)
        self.log.line(f"FAILED: {summary or type(error).__name__}")

    # --- log ---------------------------------------------------------------------------

    def _open_log(self) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        header = f"=== {stamp} build of image {self.image.name} into {self.build_dir}"
        self.log.open(self.build_dir / LOG, header)

    def _debootstrap_log(self) -> list[str]:
        """debootstrap's own log, where wget and dpkg say why they failed; copied to build.log."""
        path = self.partial / "debootstrap/debootstrap.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        self.log.line(f"--- {path} ---")
        for line in lines:
            self.log.line(line)
        self.log.line(f"--- end of {path.name} ---")
        return lines
