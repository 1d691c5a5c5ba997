"""Build an image's layer stack: a base, then one cached layer per step, then a manifest.

The base is a debootstrap layer (images/build.py) or a parent image's whole stack.
On it go, each as one layer made in a build node: the files to copy in, every step
in order, and the pre-fetch downloads. A layer's cache key is the digest of the layer
below plus what defines the step (its script, environment, file contents), so an
unchanged step reuses its layer and a change redoes that step and those after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shlex
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from freshpool.config import Image
from freshpool.images import build as base_builder
from freshpool.images.build import ImageBuildError, failure_evidence, failure_kind
from freshpool.images.buildnode import INPUTS, BuildNode, Cancelled, StepTimeout
from freshpool.images.layers import Layer, LayerStore, TreeStats, digest_tree, merged_entry
from freshpool.images.layers import merged_listdir as merged_dir
from freshpool.images.remove import remove_tree

# Part of every cache key: bump when the same step would now make a different layer.
LAYER_FORMAT = 1
LOG = "build.log"
MANIFEST = "manifest.json"
WHEELS_DIR = "/var/cache/freshpool/wheels"
TAIL_LINES = 20
BASE_MEMO = "rootfs.layer.json"

Progress = Callable[[str, str], None]
OnLayers = Callable[[list[Path], str], None]


class BuildCancelled(ImageBuildError):
    """The build was stopped from outside (serve shutting down)."""


@dataclass(frozen=True)
class ParentStack:
    """What a child image builds on: a ready build of its parent image."""

    image: str
    build_id: str
    # Layer directories, top first.
    layers: tuple[Path, ...]
    # The top layer's digest; the cache keys of the child's layers start from it.
    digest: str
    # apt packages pre-fetched in those layers: a child that updates the package
    # lists fetches them again, or they would not install offline.
    prefetch: tuple[str, ...] = ()
    size_bytes: int = 0


@dataclass
class BuildOptions:
    # Ignore cached layers (a rebuild for freshness: new packages, new clones).
    fresh: bool = False
    # Tests and benchmarks: take debootstrap bases from this build_cached() directory.
    base_cache: Path | None = None
    # Where debootstrap keeps the .debs it downloaded, for the next base.
    debootstrap_cache: Path | None = None
    attempts: int = base_builder.ATTEMPTS
    retry_delay: float | None = None
    cancel: threading.Event | None = None
    progress: Progress | None = None
    # Called after each layer with the stack so far (top first) and its top digest.
    on_layers: OnLayers | None = None
    # Why this build runs (requested, definition changed, ...), for the log and manifest.
    why: str = ""


@dataclass(frozen=True)
class _Planned:
    kind: str
    name: str
    script: str
    env: dict[str, str]
    timeout: float
    # Hash of what defines this layer beyond the layer below it.
    content: str
    files: tuple[tuple[str, Any], ...] = ()


@dataclass
class _Done:
    layer: Layer
    kind: str
    name: str
    key: str
    content: str
    cached: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "digest": self.layer.digest,
            "kind": self.kind,
            "name": self.name,
            "key": self.key,
            "content": self.content,
            "cached": self.cached,
            "size_bytes": self.layer.size_bytes,
            "disk_bytes": self.layer.disk_bytes,
            "entries": self.layer.entries,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def cache_key(parent_digest: str, kind: str, content: str) -> str:
    text = json.dumps([LAYER_FORMAT, parent_digest, kind, content])
    return hashlib.sha256(text.encode()).hexdigest()


def base_key(image: Image) -> str:
    """The cache key of a debootstrap base: its definition, whatever the image's name."""
    base = base_builder.base_image(image).model_dump(mode="json")
    base.pop("name")
    return cache_key("debootstrap", "base", stable_hash(base))


def effective_prefetch(image: Image, parent: ParentStack | None) -> list[str]:
    """apt packages that must install offline on this image: its own and its parents'."""
    inherited = list(parent.prefetch) if parent is not None else []
    return list(dict.fromkeys([*inherited, *image.prefetch]))


def build_stack(
    image: Image,
    layers: LayerStore,
    build_dir: Path,
    parent: ParentStack | None = None,
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    """Build `image`'s layers into `layers`; write build_dir/build.log and manifest.json.

    Returns the manifest. Raises ImageBuildError naming the stage (a step's name),
    the exit code and the end of the log; the partial layer of a failed step is
    removed, and the layers made before it stay cached for the next try.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    return _Pipeline(image, layers, build_dir, parent, options or BuildOptions()).run()


class _Pipeline:
    def __init__(
        self,
        image: Image,
        layers: LayerStore,
        build_dir: Path,
        parent: ParentStack | None,
        options: BuildOptions,
    ) -> None:
        self.image = image
        self.store = layers
        self.build_dir = build_dir
        self.parent = parent
        self.options = options
        self.retry_delay = (
            options.retry_delay
            if options.retry_delay is not None
            else float(
                os.environ.get(base_builder.RETRY_DELAY_ENV, base_builder.DEFAULT_RETRY_DELAY)
            )
        )
        self.stage = "start"
        self.recent: deque[str] = deque(maxlen=TAIL_LINES)
        self.log: IO[str] | None = None
        self.done: list[_Done] = []
        # Layer directories built on so far, top first.
        self.stack: list[Path] = list(parent.layers) if parent is not None else []
        self.top = parent.digest if parent is not None else ""
        self.timings: dict[str, float] = {}
        self.env_passed = {k: v for k, v in os.environ.items() if k in base_builder.PASSED_ENV}

    # ------------------------------------------------------------------ the build

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.log = open(self.build_dir / LOG, "a")  # noqa: SIM115 - closed in finally
        try:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            self._line(f"=== {stamp} build of image {self.image.name} in {self.build_dir}")
            if self.options.why:
                fresh = " (fresh: no cached layers)" if self.options.fresh else ""
                self._line(f"why: {self.options.why}{fresh}")
            if self.parent is None:
                self._base()
            else:
                self._line(
                    f"parent: image {self.parent.image}, build {self.parent.build_id}"
                    f" ({len(self.parent.layers)} layers, top {self.parent.digest})"
                )
            plan = self._plan()
            for planned in plan:
                self._layer(planned)
            for planned in self._late_plan():
                self._layer(planned)
            manifest = self._finish(time.monotonic() - started)
        except ImageBuildError as exc:
            self._line(f"FAILED: {exc.summary}")
            raise
        except Cancelled as exc:
            error = BuildCancelled(self.stage, f"interrupted: {exc}", log_tail=list(self.recent))
            self._line(f"FAILED: {error.summary}")
            raise error from None
        except BaseException as exc:
            self._line(f"FAILED: {type(exc).__name__}: {exc}")
            raise
        finally:
            if self.log is not None:
                self.log.close()
                self.log = None
        return manifest

    def _base(self) -> None:
        key = base_key(self.image)
        base = base_builder.base_image(self.image)
        began = time.monotonic()
        self._start(
            "base", f"debootstrap {base.suite} ({base.variant}) + {len(base.packages)} packages"
        )
        cached = False
        if self.options.base_cache is not None:
            layer = self._linked_base(base, key, self.options.base_cache)
            cached = True
        elif not self.options.fresh and (found := self.store.lookup(key)) is not None:
            layer, cached = found, True
        else:
            layer = self._debootstrap(base, key)
        manifest = layer.about.get("manifest", {})
        self._emit(
            f"base layer {layer.digest}{' (cached)' if cached else ''}:"
            f" {layer.size_bytes / 1e6:.1f} MB, {len(manifest.get('installed', {}))} packages"
        )
        self._add(_Done(layer, "base", "base", key, key, cached, time.monotonic() - began))

    def _linked_base(self, base: Image, key: str, cache_root: Path) -> Layer:
        cached = base_builder.build_cached(base, cache_root, self._forward)
        # The cached tree never changes, so its digest is computed once and kept beside it.
        memo = cached / BASE_MEMO
        try:
            stats = TreeStats(**json.loads(memo.read_text()))
        except (OSError, ValueError, TypeError):
            stats = digest_tree(cached / base_builder.ROOTFS)
            temporary = memo.with_name(f".{memo.name}.{os.getpid()}")
            temporary.write_text(json.dumps(stats.__dict__))
            os.replace(temporary, memo)
        about = {
            "kind": "base",
            "manifest": json.loads((cached / base_builder.MANIFEST).read_text()),
        }
        return self.store.link(cached / base_builder.ROOTFS, key, about, stats)

    def _debootstrap(self, base: Image, key: str) -> Layer:
        scratch = self.store.scratch()
        try:
            manifest = base_builder.build_image(
                base,
                scratch / "base",
                cache_dir=self.options.debootstrap_cache,
                progress=self._forward,
                attempts=self.options.attempts,
                retry_delay=self.retry_delay,
            )
            self.stage = "base"
            return self._commit(
                scratch / "base" / base_builder.ROOTFS, key, {"kind": "base", "manifest": manifest}
            )
        finally:
            remove_tree(scratch)

    def _forward(self, stage: str, line: str) -> None:
        """Progress from the base builder: into this build's log, and a chance to stop."""
        if self.options.cancel is not None and self.options.cancel.is_set():
            raise Cancelled("the build was stopped")
        self.stage = f"base: {stage}"
        self._emit(line)

    # ------------------------------------------------------------------ planning

    def _plan(self) -> list[_Planned]:
        image = self.image
        plan: list[_Planned] = []
        env = {**image.env}
        if image.files:
            entries, content = self._files()
            script = f"tar -x -p --same-owner --no-overwrite-dir -C / -f {INPUTS}/files.tar\n"
            plan.append(_Planned("files", "files", script, {}, 600.0, content, entries))
        for i, step in enumerate(image.steps, 1):
            step_env = {**env, **step.env}
            content = stable_hash({"run": step.run, "env": step_env})
            name = f"step {i}/{len(image.steps)}" + (f" ({step.name})" if step.name else "")
            plan.append(_Planned("step", name, step.run, step_env, step.timeout, content))
        return plan

    def _late_plan(self) -> list[_Planned]:
        """Downloads that go last, so they match the package lists the steps left."""
        image = self.image
        plan: list[_Planned] = []
        packages = effective_prefetch(image, self.parent)
        lists_changed = any(
            _changes_package_lists(d.layer.path) for d in self.done if d.kind != "base"
        )
        if packages and ((self.parent is not None and image.prefetch) or lists_changed):
            words = " ".join(shlex.quote(p) for p in packages)
            # Lists a step of this build fetched are the ones to match; older ones (a
            # parent's) may name versions the mirror no longer has.
            update = "" if lists_changed else "apt-get update --error-on=any\n"
            script = f"{update}apt-get install --download-only -y {words}\n"
            content = stable_hash({"script": script, "packages": packages})
            plan.append(_Planned("prefetch", "prefetch apt", script, {}, 1800.0, content))
        if image.prefetch_wheels:
            specs = " ".join(shlex.quote(s) for s in image.prefetch_wheels)
            script = (
                "if command -v pip3 >/dev/null 2>&1; then pip=pip3\n"
                "elif python3 -m pip --version >/dev/null 2>&1; then pip='python3 -m pip'\n"
                "else echo 'prefetch-wheels needs pip in the image:"
                " add python3-pip to packages or to a step' >&2; exit 127; fi\n"
                f"mkdir -p {WHEELS_DIR}\n"
                "$pip download --no-cache-dir --disable-pip-version-check"
                f" --dest {WHEELS_DIR} {specs}\n"
            )
            content = stable_hash({"wheels": image.prefetch_wheels, "env": image.env})
            plan.append(
                _Planned("wheels", "prefetch wheels", script, dict(image.env), 1800.0, content)
            )
        return plan

    def _files(self) -> tuple[tuple[tuple[str, Any], ...], str]:
        described = []
        entries = []
        for item in self.image.files:
            mode = int(item.mode, 8) if item.mode else None
            if item.content is not None:
                data = item.content.encode()
                described.append([item.dest, item.mode, hashlib.sha256(data).hexdigest()])
                entries.append((item.dest, ("content", data, mode)))
                continue
            source = item.source
            assert source is not None  # the config allows exactly one of content and source
            if source.is_dir():
                summary = digest_tree(source).digest
            elif source.is_file():
                summary = hashlib.sha256(source.read_bytes()).hexdigest()
            else:
                raise ImageBuildError("files", f"{source} (for {item.dest}) does not exist")
            described.append([item.dest, item.mode, summary])
            entries.append((item.dest, ("source", source, mode)))
        return tuple(entries), stable_hash(described)

    # ------------------------------------------------------------------ one layer

    def _layer(self, planned: _Planned) -> None:
        self._start(planned.name, _first_line(planned.script))
        key = cache_key(self.top, planned.kind, planned.content)
        began = time.monotonic()
        found = None if self.options.fresh else self.store.lookup(key)
        if found is not None:
            self._emit(f"cached: layer {found.digest} ({found.size_bytes / 1e6:.1f} MB)")
            self._add(_Done(found, planned.kind, planned.name, key, planned.content, True, 0.0))
            return
        layer = self._run_with_retries(planned, key)
        seconds = time.monotonic() - began
        self._emit(
            f"layer {layer.digest}: {layer.size_bytes / 1e6:.1f} MB,"
            f" {layer.entries} entries, {seconds:.1f} s"
        )
        self._add(_Done(layer, planned.kind, planned.name, key, planned.content, False, seconds))

    def _run_with_retries(self, planned: _Planned, key: str) -> Layer:
        attempts = max(1, self.options.attempts)
        for attempt in range(1, attempts + 1):
            output: list[str] = []

            def on_line(line: str, output: list[str] = output) -> None:
                output.append(line)
                self._emit(line)

            scratch = self.store.scratch()
            try:
                node = BuildNode(self.stack, scratch, hostname=f"build-{self.image.name}")
                with node:
                    if planned.files:
                        _write_tar(node.inputs / "files.tar", planned.files)
                    node.put_input("step.sh", planned.script.encode())
                    env = {**self.env_passed, **planned.env}
                    code = node.run(
                        ["/bin/sh", "-e", f"{INPUTS}/step.sh"],
                        env,
                        on_line=on_line,
                        timeout=planned.timeout,
                        cancel=self.options.cancel,
                    )
                    if code != 0:
                        raise _StepFailed(code)
                about = {"kind": planned.kind, "name": planned.name, "image": self.image.name}
                return self._commit(node.upper, key, about)
            except _StepFailed as failed:
                kind = failure_kind(output, self.store.scratch_root)
                if kind == "network" and attempt < attempts:
                    delay = self.retry_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                    self._emit(
                        f"{planned.name} could not download (try {attempt} of {attempts});"
                        f" trying again in {delay:.1f} s"
                    )
                    time.sleep(delay)
                    continue
                raise self._step_error(planned, failed.code, output, kind, attempt) from None
            except StepTimeout as exc:
                raise ImageBuildError(
                    self.stage, f"{planned.name} {exc}", log_tail=output[-TAIL_LINES:]
                ) from None
            except OSError as exc:
                if base_builder.is_disk_full(exc):
                    raise self._disk_full(str(exc)) from None
                raise
            finally:
                remove_tree(scratch)
        raise AssertionError("unreachable")

    def _commit(self, tree: Path, key: str, about: dict[str, Any]) -> Layer:
        try:
            return self.store.commit(tree, key, about)
        except OSError as exc:
            if base_builder.is_disk_full(exc):
                remove_tree(tree)
                raise self._disk_full(str(exc)) from None
            raise

    def _step_error(
        self, planned: _Planned, code: int, output: list[str], kind: str, tries: int
    ) -> ImageBuildError:
        if kind == "disk":
            return self._disk_full(failure_evidence(output, "disk"), code, output)
        if kind == "network":
            reason = (
                f"{planned.name} could not download after {tries}"
                f" {'try' if tries == 1 else 'tries'}: {failure_evidence(output, 'network')}"
            )
        else:
            errors = [line for line in output if line.startswith(("E:", "error", "ERROR"))]
            reason = f"{planned.name} exited with status {code}"
            if errors:
                reason += f": {errors[-1]}"
        return ImageBuildError(self.stage, reason, exit_code=code, log_tail=output[-TAIL_LINES:])

    def _disk_full(
        self, evidence: str, code: int | None = None, output: list[str] | None = None
    ) -> ImageBuildError:
        reason = f"the disk is full (no space left on device) under {self.store.root}"
        if evidence:
            reason += f": {evidence}"
        tail = (output or list(self.recent))[-TAIL_LINES:]
        return ImageBuildError(self.stage, reason, exit_code=code, log_tail=tail, disk_full=True)

    def _add(self, done: _Done) -> None:
        self.done.append(done)
        self.stack.insert(0, done.layer.path)
        self.top = done.layer.digest
        self.timings[done.name] = round(done.seconds, 3)
        if self.options.on_layers is not None:
            self.options.on_layers(list(self.stack), self.top)

    # ------------------------------------------------------------------ the manifest

    def _finish(self, seconds: float) -> dict[str, Any]:
        self._start("finish", "writing the manifest")
        own = [d.describe() for d in self.done]
        parent = self.parent
        base_manifest: dict[str, Any] = {}
        for done in self.done:
            if done.kind == "base":
                base_manifest = done.layer.about.get("manifest", {})
        size = sum(d.layer.size_bytes for d in self.done) + (parent.size_bytes if parent else 0)
        disk = sum(d.layer.disk_bytes for d in self.done)
        built = sum(d.layer.disk_bytes for d in self.done if not d.cached)
        archives = merged_dir(self.stack, "var/cache/apt/archives")
        manifest: dict[str, Any] = {
            "image": self.image.name,
            "why": self.options.why,
            "fresh": self.options.fresh,
            "digest": self.top,
            "parent": (
                {
                    "image": parent.image,
                    "build": parent.build_id,
                    "digest": parent.digest,
                    "layers": [str(p) for p in parent.layers],
                }
                if parent is not None
                else None
            ),
            "base": {
                k: base_manifest.get(k)
                for k in ("suite", "mirror", "variant", "packages", "prefetch", "architecture")
                if k in base_manifest
            },
            "layers": own,
            "stack": [str(p) for p in self.stack],
            "installed": self._installed(),
            "prefetched": {
                "apt": [name for name in archives if name.endswith(".deb")],
                "wheels": merged_dir(self.stack, WHEELS_DIR.lstrip("/")),
            },
            "size_bytes": size,
            "disk_bytes": disk,
            "new_bytes": built,
            "timings": {**self.timings, "total": round(seconds, 3)},
            "log": str(self.build_dir / LOG),
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "layer_format": LAYER_FORMAT,
            "freshpool_version": _version(),
        }
        path = self.build_dir / MANIFEST
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, path)
        new = [d for d in self.done if not d.cached]
        self._emit(
            f"image {self.image.name}: {len(self.stack)} layers, {size / 1e6:.0f} MB;"
            f" {len(new)} built, {len(self.done) - len(new)} cached, in {seconds:.1f} s"
        )
        return manifest

    def _installed(self) -> dict[str, str]:
        """Packages installed in the merged image, from the topmost dpkg status file."""
        status = merged_entry(self.stack, "var/lib/dpkg/status")
        if status is None:
            return {}
        with tempfile.TemporaryDirectory() as admin:
            Path(admin, "status").write_bytes(status.read_bytes())
            Path(admin, "updates").mkdir()
            Path(admin, "info").mkdir()
            fmt = "${db:Status-Abbrev}\t${Package}\t${Version}\n"
            result = subprocess.run(
                ["dpkg-query", f"--admindir={admin}", "-W", "-f", fmt],
                capture_output=True,
                text=True,
                check=False,
            )
        installed = {}
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0].startswith("ii"):
                installed[parts[1]] = parts[2]
        return dict(sorted(installed.items()))

    # ------------------------------------------------------------------ log

    def _start(self, stage: str, description: str) -> None:
        self.stage = stage
        self._line(f"==> {stage}: {description}")
        if self.options.progress is not None:
            self.options.progress(stage, description)

    def _emit(self, line: str) -> None:
        self._line(line)
        if self.options.progress is not None:
            self.options.progress(self.stage, line)

    def _line(self, line: str) -> None:
        self.recent.append(line)
        if self.log is not None:
            try:
                self.log.write(line + "\n")
                self.log.flush()
            except OSError:
                # A full disk must not hide the build's own error.
                pass


class _StepFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exit status {code}")
        self.code = code


def _write_tar(path: Path, entries: tuple[tuple[str, Any], ...]) -> None:
    """The files to copy in, owned by root, as a tar that the node unpacks at /."""

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(path, "w") as tar:
        for dest, (kind, value, mode) in entries:
            name = dest.lstrip("/")
            if kind == "content":
                info = owned_by_root(tarfile.TarInfo(name))
                info.size = len(value)
                info.mode = 0o644 if mode is None else mode
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(value))
                continue

            def with_mode(
                info: tarfile.TarInfo, mode: int | None = mode, top: str = name
            ) -> tarfile.TarInfo:
                owned_by_root(info)
                if mode is not None and info.name == top and info.isfile():
                    info.mode = mode
                return info

            tar.add(value, arcname=name, filter=with_mode)


def _changes_package_lists(layer: Path) -> bool:
    """Whether a layer holds new apt package lists (an `apt-get update` that fetched some)."""
    lists = layer / "var/lib/apt/lists"
    try:
        names = os.listdir(lists)
    except OSError:
        return False
    return any(name.endswith(("Packages", "Release", "Packages.lz4")) for name in names)


def stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_line(script: str) -> str:
    lines = [line.strip() for line in script.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _version() -> str:
    try:
        return metadata.version("freshpool")
    except metadata.PackageNotFoundError:
        return "unknown"
