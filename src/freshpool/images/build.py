"""Build an image into a read-only root file system layer with a manifest that describes it.

The stages: debootstrap a Debian system, prepare it for running package scripts,
pre-fetch packages that jobs install later without network, clean out what must not
be shared between nodes, then move the result into place and describe it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TypeVar

from freshpool.config import Image
from freshpool.images.mirror import MirrorNotFound, host_mirror
from freshpool.images.remove import remove_tree

# Bump when a change to the stages changes what an image contains.
BUILDER_VERSION = 1
STAGES = ("debootstrap", "prepare", "prefetch", "clean", "finalize")
ROOTFS = "rootfs"
PARTIAL = ".rootfs.partial"
MANIFEST = "manifest.json"
LOG = "build.log"
LOCK = ".build.lock"

ATTEMPTS = 3
DEFAULT_RETRY_DELAY = 2.0
RETRY_DELAY_ENV = "FRESHPOOL_BUILD_RETRY_DELAY"
TAIL_LINES = 20
# Below this much room a file system cannot hold even the smallest image, so a command
# that failed there failed for lack of space whatever it printed.
NEARLY_FULL = 4 * 1024 * 1024
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("debootstrap", "bwrap")
INSTALL_HINT = "apt-get install debootstrap bubblewrap"
HOST_RESOLV = Path("/etc/resolv.conf")
# Package scripts run during the build must not start services: they would run on the
# host's network and outlive the build.
POLICY_RC_D = (
    "#!/bin/sh\n# freshpool image build: no service starts while packages install.\nexit 101\n"
)
# The environment variables a build passes on, so a host's proxy also serves the build.
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

Progress = Callable[[str, str], None]
T = TypeVar("T")

_DISK_FULL = re.compile(
    r"No space left on device|Disk quota exceeded|You don't have enough free space", re.I
)
_NETWORK = re.compile(
    r"Failed getting release|Couldn't download|Failed to fetch|Could not connect|"
    r"Connection refused|Connection timed out|Connection reset|Temporary failure|"
    r"Could not resolve|Unable to connect|Network is unreachable|No route to host|"
    r"Hash Sum mismatch|File has unexpected size|Read error|Unable to establish SSL|"
    r"^failed: "
)
_MISSING_DEBS = re.compile(r"Couldn't find these debs: (.+)")
_MISSING_APT = re.compile(
    r"Unable to locate package (\S+)|Package '?([^' ]+)'? has no installation candidate"
)


class ImageBuildError(Exception):
    """A failed build: names the stage, the failing command's exit code and the log's end."""

    def __init__(
        self,
        stage: str,
        reason: str,
        *,
        exit_code: int | None = None,
        log_tail: list[str] | None = None,
        disk_full: bool = False,
    ) -> None:
        self.stage = stage
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = list(log_tail or [])
        self.disk_full = disk_full
        text = f"image build failed in stage {stage!r}"
        if exit_code is not None:
            text += f" (exit code {exit_code})"
        text += f": {reason}"
        # The log already holds the tail, so it records only this first part.
        self.summary = text
        if self.log_tail:
            text += "\n--- last lines of the log ---\n" + "\n".join(self.log_tail)
        super().__init__(text)


class _CommandFailed(Exception):
    def __init__(self, what: str, exit_code: int, output: list[str]) -> None:
        super().__init__(f"{what} exited with {exit_code}")
        self.what = what
        self.exit_code = exit_code
        self.output = output
        # Lines the command wrote elsewhere (debootstrap's own log in its target).
        self.extra: list[str] = []


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
    Downloads that fail for network reasons are tried `attempts` times, waiting
    `retry_delay` seconds (doubled each time, with jitter; default from the
    environment variable FRESHPOOL_BUILD_RETRY_DELAY, else 2 s). On any failure the
    partial root file system is removed, build.log is kept, and ImageBuildError is raised.
    """
    if retry_delay is None:
        retry_delay = float(os.environ.get(RETRY_DELAY_ENV, DEFAULT_RETRY_DELAY))
    tools = find_tools()
    build_dir = Path(build_dir).absolute()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError("check", f"cannot create {build_dir}: {exc.strerror}") from None
    builder = _Builder(image, build_dir, cache_dir, progress, tools, attempts, retry_delay)
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


# What this builder makes an image from; the rest of an image definition (steps, files,
# ...) is layered on top by images/pipeline.py.
BASE_FIELDS = ("name", "suite", "mirror", "variant", "packages", "prefetch")


def content_key(image: Image) -> str:
    """The sha256 of the base definition: equal definitions give equal keys."""
    dumped = image.model_dump(mode="json")
    base = {name: dumped[name] for name in BASE_FIELDS}
    definition = json.dumps(base, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(definition.encode()).hexdigest()


def base_image(image: Image) -> Image:
    """The part of `image` this builder makes: debootstrap, packages and apt pre-fetch."""
    return Image(**{name: getattr(image, name) for name in BASE_FIELDS})


def failure_kind(lines: list[str], where: Path) -> str:
    """Why a command failed, from its output: "disk", "network" or "other"."""
    if any(_DISK_FULL.search(line) for line in lines):
        return "disk"
    with contextlib.suppress(OSError):
        fs = os.statvfs(where)
        if fs.f_bavail * fs.f_frsize < NEARLY_FULL:
            return "disk"
    if any(_NETWORK.search(line) for line in lines):
        return "network"
    return "other"


def failure_evidence(lines: list[str], kind: str) -> str:
    """The output lines that show why a command failed, joined into one line."""
    pattern = {"disk": _DISK_FULL, "network": _NETWORK}.get(kind)
    return _evidence(lines, pattern) if pattern is not None else ""


def find_tools(search_path: str = SEARCH_PATH) -> dict[str, str]:
    """The absolute paths of debootstrap and bwrap, after checking that a build can run at all."""
    found = {tool: shutil.which(tool, path=search_path) for tool in TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise ImageBuildError("check", f"{' and '.join(missing)} not found: run `{INSTALL_HINT}`")
    if os.geteuid() != 0:
        raise ImageBuildError(
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


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _version() -> str:
    try:
        return metadata.version("freshpool")
    except metadata.PackageNotFoundError:
        return "unknown"


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
        self.progress = progress
        self.tools = tools
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.partial = build_dir / PARTIAL
        self.rootfs = build_dir / ROOTFS
        self.mirror = image.mirror
        self.stage = "check"
        self.timings: dict[str, float] = {}
        self.recent: deque[str] = deque(maxlen=TAIL_LINES)
        self.log: IO[str] | None = None
        self.log_lost_lines = False
        self.moved_into_place = False
        self.prefetched: dict[str, int] = {}
        self.installed: dict[str, str] = {}
        self.env = {"PATH": SEARCH_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root"}
        self.env["DEBIAN_FRONTEND"] = "noninteractive"
        self.env.update({k: v for k, v in os.environ.items() if k in PASSED_ENV})

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
                ("prefetch", self._prefetch),
                ("clean", self._clean),
            ):
                began = time.monotonic()
                step()
                self.timings[stage] = round(time.monotonic() - began, 3)
            manifest = self._finalize()
            self._append_log(
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
            self._close_log()
        return manifest

    def _check(self) -> None:
        self._start("check", f"checking {self.build_dir}")
        if self.partial.exists():
            self._emit(f"removing {self.partial} left by an interrupted build")
            remove_tree(self.partial)
        if self.mirror == "auto":
            try:
                self.mirror = host_mirror(self.image.suite)
            except MirrorNotFound as exc:
                raise ImageBuildError("check", str(exc)) from None
            self._emit(f"mirror: {self.mirror} (from the host's apt sources)")
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _debootstrap(self) -> None:
        include = ",".join(dict.fromkeys(["openssh-server", *self.image.packages]))
        argv = [self.tools["debootstrap"]]
        if self.image.variant != "default":
            argv.append(f"--variant={self.image.variant}")
        argv.append(f"--include={include}")
        self._start("debootstrap", f"debootstrap {self.image.suite} from {self.mirror}")
        if self.cache_dir is not None:
            if self._debootstrap_has_cache_dir():
                argv.append(f"--cache-dir={self.cache_dir}")
            else:
                self._emit("this debootstrap has no --cache-dir: every .deb is downloaded")
        argv += [self.image.suite, str(self.partial), self.mirror]

        def attempt() -> None:
            # debootstrap resumes nothing: each try starts from an empty target.
            remove_tree(self.partial)
            try:
                self._run(argv, "debootstrap")
            except _CommandFailed as failed:
                failed.extra = self._debootstrap_log()
                raise

        self._retrying(attempt)

    def _prepare(self) -> None:
        self._start("prepare", "policy-rc.d, /tmp and resolv.conf for the build")
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

    def _prefetch(self) -> None:
        if not self.image.prefetch:
            self._start("prefetch", "nothing to pre-fetch")
            return
        self._start("prefetch", f"downloading {' '.join(self.image.prefetch)}")
        archives = self.partial / "var/cache/apt/archives"
        before = {p.name for p in archives.glob("*.deb")}
        # Translations only serve people reading descriptions: 30 MB no job needs.
        update = ["apt-get", "update", "--error-on=any", "-o", "Acquire::Languages=none"]
        self._retrying(lambda: self._run(self._in_root(update), "apt-get update"))
        fetch = ["apt-get", "install", "--download-only", "-y", *self.image.prefetch]
        self._retrying(lambda: self._run(self._in_root(fetch), "apt-get install --download-only"))
        self.prefetched = {
            p.name: p.stat().st_size for p in sorted(archives.glob("*.deb")) if p.name not in before
        }
        total = sum(self.prefetched.values())
        self._emit(f"pre-fetched {len(self.prefetched)} packages, {total} bytes")

    def _clean(self) -> None:
        self._start("clean", "removing installed .debs, host keys and build-only files")
        root = self.partial
        installed = self._installed()
        versions = {(name.split(":")[0], version) for name, version in installed.items()}
        removed = 0
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            parts = deb.name.removesuffix(".deb").split("_")
            if len(parts) == 3 and (parts[0], parts[1].replace("%3a", ":")) in versions:
                deb.unlink()
                removed += 1
        self._emit(f"removed {removed} .debs of installed packages")
        (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        # Every node generates its own host keys; a shared key would let one node
        # impersonate all the others.
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        self._run(self._in_root(["passwd", "-l", "root"]), "passwd -l root")
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
        self._start("finalize", f"moving the image to {self.rootfs}")
        size, count = tree_stats(self.partial)
        # The manifest is the mark of a complete build, so the tree reaches the disk first.
        os.sync()
        os.rename(self.partial, self.rootfs)
        self.moved_into_place = True
        prefetch_bytes = sum(self.prefetched.values())
        self.timings["finalize"] = round(time.monotonic() - began, 3)
        manifest: dict[str, Any] = {
            "image": self.image.name,
            "suite": self.image.suite,
            "mirror": self.mirror,
            "variant": self.image.variant,
            "packages": list(self.image.packages),
            "prefetch": list(self.image.prefetch),
            "architecture": self._architecture(),
            "installed": dict(sorted(self.installed.items())),
            "prefetched": self.prefetched,
            "prefetch_bytes": prefetch_bytes,
            "size_bytes": size,
            "file_count": count,
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "timings": self.timings,
            "builder_version": BUILDER_VERSION,
            "freshpool_version": _version(),
            "content_key": content_key(self.image),
        }
        path = self.build_dir / MANIFEST
        temporary = path.with_suffix(".json.tmp")
        with open(temporary, "w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
        self._emit(f"image {self.image.name}: {size} bytes, {count} entries")
        return manifest

    # --- commands ----------------------------------------------------------------------

    def _in_root(self, argv: list[str]) -> list[str]:
        """Run argv inside the partial image, with the host's network and resolver."""
        wrap = [
            self.tools["bwrap"],
            "--bind", str(self.partial), "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--perms", "1777", "--tmpfs", "/tmp",
        ]  # fmt: skip
        if HOST_RESOLV.exists():
            wrap += ["--ro-bind", str(HOST_RESOLV), "/etc/resolv.conf"]
        wrap += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
        return [*wrap, *argv]

    def _run(self, argv: list[str], what: str) -> list[str]:
        self._emit(f"$ {shlex.join(argv)}")
        output: list[str] = []
        # A session of its own, so that a failure here kills everything it started
        # (debootstrap runs wget and dpkg in chroots).
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            with proc.stdout:
                for raw in proc.stdout:
                    line = raw.rstrip("\n")
                    output.append(line)
                    self._emit(line)
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if code != 0:
            raise _CommandFailed(what, code, output)
        return output

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """Call `attempt`, again after a pause when it failed for network reasons."""
        for number in range(1, self.attempts + 1):
            try:
                return attempt()
            except _CommandFailed as failed:
                kind = self._classify(failed)
                if kind != "network" or number == self.attempts:
                    raise self._command_error(failed, kind, number) from None
                # Jitter keeps builds that failed together from retrying together.
                delay = self.retry_delay * 2 ** (number - 1) * random.uniform(0.5, 1.5)
                self._emit(
                    f"{failed.what} could not download (try {number} of {self.attempts}); "
                    f"trying again in {delay:.1f} s"
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _classify(self, failed: _CommandFailed) -> str:
        lines = failed.output + failed.extra
        if self.log_lost_lines or any(_DISK_FULL.search(line) for line in lines):
            return "disk"
        with contextlib.suppress(OSError):
            fs = os.statvfs(self.build_dir)
            if fs.f_bavail * fs.f_frsize < NEARLY_FULL:
                return "disk"
        if self._missing_packages(lines):
            return "package"
        if any(_NETWORK.search(line) for line in lines):
            return "network"
        return "other"

    def _command_error(self, failed: _CommandFailed, kind: str, tries: int) -> ImageBuildError:
        lines = failed.output + failed.extra
        if kind == "disk":
            evidence = _evidence(lines, _DISK_FULL)
            reason = f"the disk is full (no space left on device) under {self.build_dir}"
            if evidence:
                reason += f": {evidence}"
        elif kind == "package":
            section = "prefetch" if self.stage == "prefetch" else "packages"
            names = ", ".join(self._missing_packages(lines))
            reason = f"unknown package in `{section}` of image {self.image.name}: {names}"
        elif kind == "network":
            reason = (
                f"cannot download from the mirror {self.mirror} "
                f"after {tries} {'try' if tries == 1 else 'tries'}: {_evidence(lines, _NETWORK)}"
            )
        else:
            errors = [line for line in lines if line.startswith("E:")]
            reason = f"{failed.what} failed" + (f": {errors[-1]}" if errors else "")
        return ImageBuildError(
            self.stage,
            reason,
            exit_code=failed.exit_code,
            log_tail=failed.output[-TAIL_LINES:] or list(self.recent),
            disk_full=kind == "disk",
        )

    @staticmethod
    def _missing_packages(lines: list[str]) -> list[str]:
        names: list[str] = []
        for line in lines:
            match = _MISSING_DEBS.search(line)
            if match:
                names += match.group(1).split()
            match = _MISSING_APT.search(line)
            if match:
                names.append(match.group(1) or match.group(2))
        return list(dict.fromkeys(names))

    def _debootstrap_has_cache_dir(self) -> bool:
        result = subprocess.run(
            [self.tools["debootstrap"], "--help"],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        return "--cache-dir" in result.stdout + result.stderr

    def _debootstrap_log(self) -> list[str]:
        """debootstrap's own log, where wget and dpkg say why they failed; copied to build.log."""
        path = self.partial / "debootstrap/debootstrap.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        self._append_log(f"--- {path} ---")
        for line in lines:
            self._append_log(line)
        self._append_log(f"--- end of {path.name} ---")
        return lines

    def _installed(self) -> dict[str, str]:
        admin = self.partial / "var/lib/dpkg"
        fmt = "${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Version}\n"
        result = subprocess.run(
            ["dpkg-query", f"--admindir={admin}", "-W", "-f", fmt],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        if result.returncode != 0:
            raise _CommandFailed("dpkg-query", result.returncode, result.stderr.splitlines())
        native = self._architecture()
        installed: dict[str, str] = {}
        for line in result.stdout.splitlines():
            status, name, arch, version = line.split("\t")
            if status.startswith("ii"):
                # Qualified only when foreign, so the usual single-arch list reads plainly.
                installed[name if arch in (native, "all") else f"{name}:{arch}"] = version
        return installed

    def _architecture(self) -> str:
        result = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
        )
        return result.stdout.strip() or os.uname().machine

    # --- failure -------------------------------------------------------------------------

    def _as_build_error(self, exc: BaseException) -> ImageBuildError | None:
        if isinstance(exc, ImageBuildError):
            return exc
        if isinstance(exc, _CommandFailed):
            return self._command_error(exc, self._classify(exc), 1)
        if is_disk_full(exc) or (isinstance(exc, OSError) and self.log_lost_lines):
            return ImageBuildError(
                self.stage,
                f"the disk is full (no space left on device) under {self.build_dir}: {exc}",
                log_tail=list(self.recent),
                disk_full=True,
            )
        return None

    def _discard(self) -> None:
        """Leave no image behind: a partial tree must never be taken for a build."""
        for path in (self.partial, self.build_dir / f"{MANIFEST}.tmp"):
            try:
                remove_tree(path)
            except OSError as exc:
                self._append_log(f"could not remove {path}: {exc}")
        if self.moved_into_place:
            try:
                remove_tree(self.rootfs)
            except OSError as exc:
                self._append_log(f"could not remove {self.rootfs}: {exc}")

    def _write_after_failure(self, error: BaseException) -> None:
        # The partial tree is gone, so a log that stopped on a full disk can go on.
        if self.log is None:
            self._open_log()
        if self.log_lost_lines:
            self._append_log("(lines are missing above: the disk was full)")
        summary = error.summary if isinstance(error, ImageBuildError) else str(error)
        self._append_log(f"FAILED: {summary or type(error).__name__}")

    # --- log and progress ------------------------------------------------------------

    def _start(self, stage: str, description: str) -> None:
        self.stage = stage
        self._append_log(f"==> {stage}: {description}")
        if self.progress is not None:
            self.progress(stage, description)

    def _emit(self, line: str) -> None:
        self._append_log(line)
        if self.progress is not None:
            self.progress(self.stage, line)

    def _open_log(self) -> None:
        try:
            self.log = open(self.build_dir / LOG, "a")  # noqa: SIM115 - open for the whole build
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.log, self.log_lost_lines = None, True
            return
        if self.log_lost_lines:
            # The last line written before the disk filled up may have been cut short.
            self._append_log("")
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        self._append_log(f"=== {stamp} build of image {self.image.name} into {self.build_dir}")

    def _append_log(self, line: str) -> None:
        self.recent.append(line)
        if self.log is None:
            return
        try:
            self.log.write(line + "\n")
            self.log.flush()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # A full disk must not hide the build's own error: go on without the file.
            self.log_lost_lines = True
            self._close_log()

    def _close_log(self) -> None:
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.close()
            self.log = None


def _evidence(lines: list[str], pattern: re.Pattern[str], limit: int = 2) -> str:
    """The last few distinct lines that match, to say in one line why a command failed."""
    found = list(dict.fromkeys(line.strip() for line in lines if pattern.search(line)))
    return "; ".join(found[-limit:])
