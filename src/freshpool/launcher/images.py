"""The image controller: keeps every image served, one launcher pass at a time.

Each pass it starts a due build (in a worker thread: builds take minutes),
validates finished builds on a fresh node, keeps the uploads (uploads.py) and
collects the garbage (garbage.py). Everything but the build itself is a
non-blocking driver operation advanced here, so one thread drives it all.

With several launchers on one database, the image work is one launcher's at a
time: the one holding the builder lease (core/fleet.BUILDER_LEASE), taken by any
launcher that builds on its own (not `--no-build`) and taken over within a lease
TTL when its holder dies. The builds live on the holder's disk; its uploads put
them where the other launchers' providers launch them. The taker fails the builds
its predecessor left running, as a launcher starting alone does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freshpool.core.errors import StaleState
from freshpool.core.fleet import BUILDER_LEASE
from freshpool.core.states import BuildState, UploadState
from freshpool.launcher import builds
from freshpool.launcher.context import Shared
from freshpool.launcher.garbage import Garbage
from freshpool.launcher.uploads import Uploads
from freshpool.launcher.validation import Validation, Verdict
from freshpool.store import BuildInProgress, BuildRow

log = logging.getLogger("freshpool.images")
B = BuildState
U = UploadState
# Seconds between looks at what is due; the rest of a pass only advances operations.
PLAN_INTERVAL = 0.5


@dataclass
class _Worker:
    build_id: str
    image: str
    thread: threading.Thread


class ImageController:
    name = "images"

    def __init__(
        self,
        shared: Shared,
        *,
        automatic: bool = True,
        base_cache: Path | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """`automatic`: build on age, definition changes and missing builds, not only
        on request. `base_cache`: tests and benchmarks take debootstrap bases from there.
        `wake`: called from the worker thread when a build finishes (the runner's wake)."""
        self.shared = shared
        self.config = shared.config
        self.store = shared.store
        self.automatic = automatic
        self.base_cache = base_cache
        self.wake = wake
        self.cancel = threading.Event()
        # Every provider this host can drive, leased or not: in a fleet the builder
        # uploads for the providers the other launchers drive too.
        self.uploads = Uploads(shared.config, shared.store, shared.configured, wake)
        self.garbage = Garbage(shared.config, shared.store, self.uploads)
        self._worker: _Worker | None = None
        self._validations: dict[str, tuple[str, Validation]] = {}
        self._next_plan = 0.0
        # The builder lease's generation while this launcher holds it (fleets only).
        self._lease: int | None = None
        self._next_lease = 0.0

    # ------------------------------------------------------------------ the pass

    def start(self) -> None:
        if not self.shared.leased:
            self._recover("freshpool stopped during the build")

    def _recover(self, why: str) -> None:
        # Only one process builds on a state dir (the launcher lock), and one in a
        # fleet (the builder lease), so a build left `building` belongs to a process
        # that is gone. `validating` ones are simply validated again.
        builds.fail_interrupted(self.store, f"{builds.INTERRUPTED}: {why}")
        self.garbage.layers.sweep_scratch()
        self.garbage.layers.empty_trash()

    def tick(self) -> None:
        """One pass; never blocks on a build, an upload or a node."""
        self._reap_worker()
        if not self._builds_here():
            return
        self._advance()
        self.uploads.advance()
        now = time.monotonic()
        if now >= self._next_plan:
            self._next_plan = now + PLAN_INTERVAL
            self._start_due_build()
            # Uploads first: a build is validated from its upload to the first provider.
            self.uploads.keep()
            self._start_validations()
            self.garbage.collect(building=self._worker is not None)
            self.garbage.replace_retired_ready_nodes()

    def due(self) -> float:
        if self.shared.leased and self._lease is None:
            return self._next_lease if self.automatic else float("inf")
        ops = [op.not_before for _, op in self._validations.values()]
        lease = [self._next_lease] if self._lease is not None else []
        return min([self._next_plan, self.uploads.not_before(), *ops, *lease])

    def _builds_here(self) -> bool:
        """Whether this launcher does the image work: always alone; in a fleet, while
        it holds the builder lease (renewed, or taken when free, every tenth TTL)."""
        if not self.shared.leased:
            return True
        if not self.automatic:
            return False  # `--no-build`: the fleet's builder builds
        now = time.monotonic()
        if now < self._next_lease:
            return self._lease is not None
        ttl = self.config.lease_ttl
        self._next_lease = now + ttl / 10
        me = self.config.launcher_name
        if self._lease is not None and not self.store.renew_leases(
            me, {BUILDER_LEASE: self._lease}, ttl
        ):
            log.warning("image builds: the builder lease was lost; another launcher builds")
            self._lease = None
            self.cancel.set()  # a build under way fails as interrupted
        if self._lease is None:
            self._lease = self.store.take_lease(BUILDER_LEASE, me, ttl)
            if self._lease is not None:
                log.info("image builds: this launcher builds for the fleet")
                self.cancel.clear()
                self._recover("the fleet's previous image builder stopped during the build")
        return self._lease is not None

    @property
    def busy(self) -> bool:
        """Whether a build, validation, upload or upload delete is under way."""
        return bool(self._worker or self._validations or self.uploads.busy)

    def building(self) -> str | None:
        return self._worker.build_id if self._worker else None

    def stop(self, deadline: float | None = None) -> None:
        """Stop a running build (it fails as interrupted) and wait for it to clean up."""
        self.cancel.set()
        if self._worker is not None:
            left = 30.0 if deadline is None else deadline - time.monotonic()
            self._worker.thread.join(max(0.0, left))
            self._reap_worker()
        if self._lease is not None:
            self.store.release_lease(BUILDER_LEASE, self.config.launcher_name, self._lease)
            self._lease = None

    # ------------------------------------------------------------------ building

    def _start_due_build(self) -> None:
        if self._worker is not None or self.cancel.is_set():
            return
        for due in builds.due_builds(self.config, self.store, self.automatic):
            fresh = due.fresh
            if due.requested:
                taken = self.store.take_build_request(due.image)
                if taken is None:
                    continue
                fresh = taken
            try:
                row = builds.start_build(self.config, self.store, due)
            except (BuildInProgress, builds.ImagingError) as exc:
                self.shared.warn_once(f"start:{due.image}", f"image {due.image}: {exc}")
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
            builds.run_build(
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
            image = next((i for i in self.config.images if i.name == build.image), None)
            if image is None:
                self._finish_validation(build, Verdict(False, "no longer in the config", 0.0))
                continue
            # A validation node is launched as any node is: on a provider this
            # launcher drives (in a fleet, one it holds the lease of).
            targets = [p for p in self.uploads.targets(image.name) if p in self.shared.drivers]
            if not targets:
                self.shared.warn_once(
                    f"validate:{build.id}",
                    f"build {build.id}: no provider to validate on"
                    " (none this launcher drives launches the image)",
                )
                continue
            provider = targets[0]
            upload = self.uploads.upload_of(build.id, provider)
            if upload is None or upload.state != U.READY:
                continue  # the uploads make it available there first
            used = sum(n for (p, _label, _state), n in counts.items() if p == provider)
            if used >= self.shared.providers[provider].max_nodes:
                self.shared.warn_once(
                    f"room:{build.id}",
                    f"build {build.id}: waiting for room on {provider} to validate",
                )
                continue
            op = Validation(
                self.store,
                self.shared.drivers[provider],
                provider,
                build,
                image,
                upload.external_id,
                _log_writer(build),
            )
            op.advance()
            self._validations[build.id] = (provider, op)

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

    def _advance(self) -> None:
        now = time.monotonic()
        for build_id, (_provider, op) in list(self._validations.items()):
            if now >= op.not_before:
                op.advance()
            if not op.done:
                continue
            del self._validations[build_id]
            if op.error is not None:
                verdict = Verdict(False, f"{type(op.error).__name__}: {op.error}", 0.0)
            else:
                assert op.result is not None
                verdict = op.result
            self._finish_validation(self.store.build(build_id), verdict)


def _log_writer(build: BuildRow) -> Callable[[str], None]:
    """Validation output goes to the end of the build's log, where `image log` shows it."""
    path = Path(build.log_path or Path(build.path) / "build.log")

    def write(line: str) -> None:
        with contextlib.suppress(OSError), open(path, "a") as handle:
            handle.write(line + "\n")
        log.debug("image build %s: %s", build.id, line)

    return write
