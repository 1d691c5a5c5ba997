"""The image keeper: one pass of the launcher's loop at a time, keeps every image served.

Each pass it starts a due build (in a worker thread: builds take minutes), validates
finished builds on a fresh node, uploads ready builds to every provider that launches
them and tracks each upload's state, retires builds beyond `keep`, and deletes
builds (uploads, files, layers) that nothing uses any more. Everything but the build
itself is a non-blocking driver operation advanced here, so one thread drives it all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freshpool.config import Config, Image, UnknownName
from freshpool.core.states import BuildState, NodeState, UploadState
from freshpool.drivers.base import Driver, ImageUpload, Operation
from freshpool.images.remove import remove_tree
from freshpool.service import imaging
from freshpool.service.retry import RetryPolicy
from freshpool.service.validation import Validation, Verdict
from freshpool.store import BuildRow, NotFound, StaleState, Store
from freshpool.store.builds import BuildInProgress
from freshpool.store.uploads import UploadRow

log = logging.getLogger("freshpool.images")
B = BuildState
U = UploadState
# Seconds between looks at what is due; the rest of a pass only advances operations.
PLAN_INTERVAL = 0.5
# Failed builds kept (with their logs and cached layers) while newer than the serving one.
FAILED_KEPT = 3
UPLOAD_RETRY = RetryPolicy(base=30.0, cap=3600.0)
SWEEP_INTERVAL = 300.0


@dataclass
class _Worker:
    build_id: str
    image: str
    thread: threading.Thread


class ImageKeeper:
    def __init__(
        self,
        config: Config,
        store: Store,
        drivers: dict[str, Driver],
        *,
        automatic: bool = True,
        base_cache: Path | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """`automatic`: build on age, definition changes and missing builds, not only
        on request. `base_cache`: tests and benchmarks take debootstrap bases from there.
        `wake`: called from the worker thread when a build finishes (launcher.wake)."""
        self.config = config
        self.store = store
        self.drivers = drivers
        self.automatic = automatic
        self.base_cache = base_cache
        self.wake = wake
        self.layers = imaging.layer_store(config)
        self.cancel = threading.Event()
        self._worker: _Worker | None = None
        self._validations: dict[str, tuple[str, Validation]] = {}
        self._uploads: dict[int, Operation[str]] = {}
        self._removals: dict[int, Operation[None]] = {}
        self._upload_failures: Counter[tuple[str, str]] = Counter()
        self._retry_at: dict[tuple[str, str], float] = {}
        self._next_plan = 0.0
        self._recovered = False
        # Layers are swept after a build is deleted, and now and then for leftovers.
        self._sweep_due = True
        self._next_sweep = 0.0
        self._warned: dict[str, float] = {}

    # ------------------------------------------------------------------ the pass

    def tick(self) -> None:
        """One pass; never blocks on a build, an upload or a node."""
        if not self._recovered:
            self._recover()
        self._reap_worker()
        self._advance()
        now = time.monotonic()
        if now >= self._next_plan:
            self._next_plan = now + PLAN_INTERVAL
            self._plan()

    @property
    def busy(self) -> bool:
        """Whether a build, validation, upload or upload delete is under way."""
        return bool(self._worker or self._validations or self._uploads or self._removals)

    def building(self) -> str | None:
        return self._worker.build_id if self._worker else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a running build (it fails as interrupted) and wait for it to clean up."""
        self.cancel.set()
        if self._worker is not None:
            self._worker.thread.join(timeout)
            self._reap_worker()

    def _recover(self) -> None:
        # Only one process builds on a state dir (the launcher lock), so a build left
        # `building` belongs to a process that is gone. `validating` ones are simply
        # validated again.
        imaging.fail_interrupted(
            self.store, f"{imaging.INTERRUPTED}: freshpool stopped during the build"
        )
        self.layers.sweep_scratch()
        self.layers.empty_trash()
        self._recovered = True

    def _plan(self) -> None:
        self._start_due_build()
        # Uploads first: a build is validated from its upload to the first provider.
        self._keep_uploads()
        self._start_validations()
        self._collect_garbage()
        self._replace_retired_ready_nodes()

    # ------------------------------------------------------------------ building

    def _start_due_build(self) -> None:
        if self._worker is not None or self.cancel.is_set():
            return
        for due in imaging.due_builds(self.config, self.store, self.automatic):
            fresh = due.fresh
            if due.requested:
                taken = self.store.take_build_request(due.image)
                if taken is None:
                    continue
                fresh = taken
            try:
                row = imaging.start_build(self.config, self.store, due)
            except (BuildInProgress, imaging.ImagingError) as exc:
                self._warn(f"start:{due.image}", f"image {due.image}: {exc}")
                continue
            thread = threading.Thread(
                target=self._build, args=(row, fresh), name=f"build-{row.id}", daemon=True
            )
            self._worker = _Worker(row.id, row.image, thread)
            thread.start()
            return

    def _build(self, row: BuildRow, fresh: bool) -> None:
        def progress(stage: str, line: str) -> None:
            log.debug("image %s: %s: %s", row.image, stage, line)

        try:
            imaging.run_build(
                self.config,
                self.store,
                row,
                fresh=fresh,
                base_cache=self.base_cache,
                cancel=self.cancel,
                progress=progress,
            )
        finally:
            if self.wake is not None:
                self.wake()

    def _reap_worker(self) -> None:
        if self._worker is not None and not self._worker.thread.is_alive():
            self._worker = None

    # ------------------------------------------------------------------ validating

    def _start_validations(self) -> None:
        validating = self.store.builds(states_in=[B.VALIDATING])
        counts = self.store.node_counts() if validating else Counter()
        for build in validating:
            if build.id in self._validations:
                continue
            image = self._image(build.image)
            if image is None:
                self._finish_validation(build, Verdict(False, "no longer in the config", 0.0))
                continue
            targets = self._targets(image.name)
            if not targets:
                self._warn(f"validate:{build.id}", f"build {build.id}: no provider to validate on")
                continue
            provider = targets[0]
            upload = self._upload_of(build.id, provider)
            if upload is None or upload.state != U.READY:
                continue  # _keep_uploads makes it available there first
            used = sum(n for (p, _label, _state), n in counts.items() if p == provider)
            if used >= self._max_nodes(provider):
                self._warn(
                    f"room:{build.id}",
                    f"build {build.id}: waiting for room on {provider} to validate",
                )
                continue
            op = Validation(
                self.store,
                self.drivers[provider],
                provider,
                build,
                image,
                upload.external_id,
                _log_writer(build),
            )
            op.advance()
            self._validations[build.id] = (provider, op)

    def _max_nodes(self, provider: str) -> int:
        for p in self.config.providers:
            if p.name == provider:
                return p.max_nodes
        return 0

    def _finish_validation(self, build: BuildRow, verdict: Verdict) -> None:
        try:
            if verdict.passed:
                self.store.build_transition(
                    build.id, B.VALIDATING, B.READY, f"validated in {verdict.seconds:.1f} s"
                )
                self.store.set_built_at(build.image, build.created_at)
                log.info("image %s: build %s ready", build.image, build.id)
                if self.wake is not None:
                    self.wake()
            else:
                self.store.build_transition(
                    build.id, B.VALIDATING, B.FAILED, f"validation failed: {verdict.reason}"
                )
                log.error(
                    "image %s: build %s failed validation: %s",
                    build.image,
                    build.id,
                    verdict.reason,
                )
        except StaleState:
            pass

    # ------------------------------------------------------------------ operations

    def _advance(self) -> None:
        now = time.monotonic()
        for build_id, (_provider, op) in list(self._validations.items()):
            if now >= op.not_before:
                op.advance()
            if not op.done:
                continue
            del self._validations[build_id]
            build = self.store.build(build_id)
            if op.error is not None:
                verdict = Verdict(False, f"{type(op.error).__name__}: {op.error}", 0.0)
            else:
                assert op.result is not None
                verdict = op.result
            self._finish_validation(build, verdict)
        for upload_id, op in list(self._uploads.items()):
            if now >= op.not_before:
                op.advance()
            if op.done:
                del self._uploads[upload_id]
                self._uploaded(upload_id, op)
        for upload_id, removal in list(self._removals.items()):
            if now >= removal.not_before:
                removal.advance()
            if removal.done:
                del self._removals[upload_id]
                self._upload_removed(upload_id, removal)

    # ------------------------------------------------------------------ uploads

    def _targets(self, image: str) -> list[str]:
        """Providers that launch this image (config order); a parent-only image is
        uploaded only where it is validated: the first provider."""
        labels = [label.name for label in self.config.labels if label.image == image]
        found = [
            p.name
            for p in self.config.providers
            if p.name in self.drivers and any(p.serves(label) for label in labels)
        ]
        if not found:
            found = [p.name for p in self.config.providers if p.name in self.drivers][:1]
        return found

    def _upload_of(self, build_id: str, provider: str) -> UploadRow | None:
        rows = self.store.uploads(build_id=build_id, provider=provider)
        return rows[0] if rows else None

    def _keep_uploads(self) -> None:
        now = time.monotonic()
        live = {b.id: b for b in self.store.builds(states_in=[B.VALIDATING, B.READY])}
        wanted: dict[tuple[str, str], BuildRow] = {}
        for build in live.values():
            targets = self._targets(build.image)
            if build.state == B.VALIDATING:
                targets = targets[:1]
            for provider in targets:
                wanted[(build.id, provider)] = build
        # Nodes may still run from a retired build, and a rollback may serve it again.
        retired = {b.id for b in self.store.builds(states_in=[B.RETIRED])}
        for upload in self.store.uploads():
            key = (upload.build_id, upload.provider)
            build = wanted.pop(key, None)
            current: UploadRow | None = upload
            if upload.state == U.UPLOADING and upload.id not in self._uploads:
                if build is None:
                    current = self._move_upload(upload, U.DELETING, "not needed any more")
                else:
                    # Cut off by a restart: uploads are made again from the layers.
                    self._start_upload(upload, build)
            elif upload.state == U.FAILED and now >= self._retry_at.get(key, 0.0):
                current = self._move_upload(upload, U.DELETING, "failed: removed before a new try")
            elif upload.state == U.READY and build is None and upload.build_id not in retired:
                # Its build failed or is deleted: nothing launches from it again.
                current = self._move_upload(upload, U.DELETING, "its build is gone")
            if current is not None and self._removable(current):
                self._start_removal(current)
        for (build_id, provider), build in wanted.items():
            if now < self._retry_at.get((build_id, provider), 0.0):
                continue
            if provider not in self.drivers:
                continue
            row = self.store.new_upload(build_id, provider)
            self._start_upload(row, build)

    def _start_upload(self, row: UploadRow, build: BuildRow) -> None:
        upload = ImageUpload(build.id, build.image, build.layer_paths(), build.manifest or {})
        op = self.drivers[row.provider].upload_image(upload)
        op.advance()
        self._uploads[row.id] = op
        if op.done:  # drivers that use the layers in place answer at once
            del self._uploads[row.id]
            self._uploaded(row.id, op)

    def _uploaded(self, upload_id: int, op: Operation[str]) -> None:
        rows = [u for u in self.store.uploads() if u.id == upload_id]
        if not rows:
            return
        row = rows[0]
        key = (row.build_id, row.provider)
        try:
            if op.error is None:
                self.store.upload_transition(
                    upload_id, U.UPLOADING, U.READY, "uploaded", external_id=op.result
                )
                self._upload_failures.pop(key, None)
                self._retry_at.pop(key, None)
                log.info("image build %s: uploaded to %s", row.build_id, row.provider)
                if self.wake is not None:
                    self.wake()
            else:
                self._upload_failures[key] += 1
                delay = UPLOAD_RETRY.delay(self._upload_failures[key] - 1)
                self._retry_at[key] = time.monotonic() + delay
                self.store.upload_transition(upload_id, U.UPLOADING, U.FAILED, str(op.error))
                log.warning(
                    "image build %s: upload to %s failed (retry in %.0f s): %s",
                    row.build_id,
                    row.provider,
                    delay,
                    op.error,
                )
        except StaleState:
            pass

    def _move_upload(self, upload: UploadRow, to: UploadState, reason: str) -> UploadRow | None:
        try:
            return self.store.upload_transition(upload.id, U(upload.state), to, reason)
        except StaleState:
            return None

    def _removable(self, upload: UploadRow) -> bool:
        return upload.state == U.DELETING and upload.id not in self._removals

    def _start_removal(self, upload: UploadRow) -> None:
        driver = self.drivers.get(upload.provider)
        if driver is None or upload.external_id is None:
            # Nothing was made there, or the provider is gone from the config.
            with contextlib.suppress(StaleState):
                self.store.remove_upload(upload.id)
            return
        op = driver.delete_image(upload.external_id)
        op.advance()
        if op.done:  # drivers that use the layers in place have nothing to delete
            self._upload_removed(upload.id, op)
        else:
            self._removals[upload.id] = op

    def _upload_removed(self, upload_id: int, op: Operation[None]) -> None:
        if op.error is None:
            with contextlib.suppress(StaleState):
                self.store.remove_upload(upload_id)
            return
        # Left in `deleting`; the next plan starts the delete again.
        log.warning("image upload %s: delete failed: %s", upload_id, op.error)

    # ------------------------------------------------------------------ garbage

    def _collect_garbage(self) -> None:
        in_use = self.store.nodes_per_build()
        builds = self.store.builds()
        live = [b for b in builds if b.state != B.DELETED]
        parents = {b.parent_build for b in live if b.parent_build}
        by_image: dict[str, list[BuildRow]] = {}
        for build in builds:
            by_image.setdefault(build.image, []).append(build)
        for name, rows in by_image.items():
            image = self._image(name)
            keep = image.keep if image is not None else 0
            ready = [b for b in rows if b.state == B.READY]
            for build in ready[keep:]:
                with contextlib.suppress(StaleState):
                    self.store.build_transition(
                        build.id, B.READY, B.RETIRED, f"beyond keep ({keep})"
                    )
                    build = self.store.build(build.id)
                    log.info("image %s: build %s retired (beyond keep %d)", name, build.id, keep)
            rows = self.store.builds(name)
            serving = next((b for b in rows if b.state == B.READY), None)
            failed = [b for b in rows if b.state == B.FAILED]
            for build in rows:
                if in_use.get(build.id) or build.id in parents:
                    continue
                old_failure = build.state == B.FAILED and (
                    (serving is not None and build.created_at < serving.created_at)
                    or build in failed[FAILED_KEPT:]
                )
                if build.state == B.RETIRED or old_failure:
                    self._delete_build(build)
        now = time.monotonic()
        if self._worker is None and (self._sweep_due or now >= self._next_sweep):
            self._sweep_due = False
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep_layers(in_use)

    def _delete_build(self, build: BuildRow) -> None:
        for upload in self.store.uploads(build_id=build.id):
            current: UploadRow | None = upload
            if upload.state in (U.READY, U.FAILED):
                current = self._move_upload(upload, U.DELETING, f"build {build.id} is deleted")
            if current is not None and self._removable(current):
                self._start_removal(current)
        if self.store.uploads(build_id=build.id):
            return  # the next plan looks again once the providers confirm
        self._discard_dir(Path(build.path))
        with contextlib.suppress(StaleState):
            self.store.build_transition(
                build.id, B(build.state), B.DELETED, f"deleted: {build.reason}"[:500]
            )
            log.info("image %s: build %s deleted", build.image, build.id)
        self._sweep_due = True

    def _discard_dir(self, path: Path) -> None:
        # A build registered from elsewhere (a prebuilt tree) is not ours to delete.
        if not path.exists() or not imaging.owns(self.config, path):
            return
        self.layers.trash.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, self.layers.trash / f"build-{path.name}.{secrets.token_hex(4)}")
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            remove_tree(path)
        self.layers.empty_trash()

    def _sweep_layers(self, in_use: Counter[str]) -> None:
        """Remove layers no build refers to (deleted builds still count while nodes run)."""
        referenced: set[str] = set()
        for build in self.store.builds():
            if build.state != B.DELETED or in_use.get(build.id):
                referenced.update(Path(p).name for p in build.layers or [])
        unused = [layer.digest for layer in self.layers.layers() if layer.digest not in referenced]
        if unused:
            self.layers.discard(unused)
            log.info("removed %d unused image layers", len(unused))

    def _replace_retired_ready_nodes(self) -> None:
        """A retired build serves no more jobs: its ready nodes are deleted (and replaced)."""
        ready = self.store.nodes(states_in=[NodeState.READY])
        states: dict[str, str] = {}
        for build_id in {n.build_id for n in ready}:
            with contextlib.suppress(NotFound):
                states[build_id] = self.store.build(build_id).state
        for node in ready:
            if states.get(node.build_id) in (B.RETIRED, B.DELETED):
                with contextlib.suppress(StaleState):
                    self.store.transition(
                        node.id,
                        NodeState.READY,
                        NodeState.DELETING,
                        f"image build {node.build_id} was retired",
                    )
                    log.info("node %s: replaced (build %s retired)", node.id, node.build_id)

    # ------------------------------------------------------------------ helpers

    def _image(self, name: str) -> Image | None:
        try:
            return self.config.image(name)
        except UnknownName:
            return None

    def _warn(self, key: str, message: str, every: float = 60.0) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -every) >= every:
            self._warned[key] = now
            log.warning("%s", message)


def _log_writer(build: BuildRow) -> Callable[[str], None]:
    """Validation output goes to the end of the build's log, where `image log` shows it."""
    path = Path(build.log_path or Path(build.path) / "build.log")

    def write(line: str) -> None:
        with contextlib.suppress(OSError), open(path, "a") as handle:
            handle.write(line + "\n")
        log.debug("image build %s: %s", build.id, line)

    return write
