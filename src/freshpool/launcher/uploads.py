"""Uploads: each ready build made available on every provider that launches it, each
upload's state tracked, failed ones retried with the one backoff, unneeded ones
deleted there."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

from freshpool.config import Config
from freshpool.core.backoff import UPLOAD
from freshpool.core.errors import StaleState
from freshpool.core.states import BuildState, UploadState
from freshpool.drivers.base import Driver, ImageUpload, Operation
from freshpool.store import BuildRow, Store, UploadRow

log = logging.getLogger("freshpool.images")
B = BuildState
U = UploadState


class Uploads:
    def __init__(
        self,
        config: Config,
        store: Store,
        drivers: Mapping[str, Driver],
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.drivers = drivers
        self.wake = wake
        self._uploads: dict[int, Operation[str]] = {}
        self._removals: dict[int, Operation[None]] = {}
        self._failures: Counter[tuple[str, str]] = Counter()
        self._retry_at: dict[tuple[str, str], float] = {}

    @property
    def busy(self) -> bool:
        return bool(self._uploads or self._removals)

    def not_before(self) -> float:
        ops: list[Operation[str] | Operation[None]] = [
            *self._uploads.values(),
            *self._removals.values(),
        ]
        return min((op.not_before for op in ops), default=float("inf"))

    def advance(self) -> None:
        now = time.monotonic()
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

    def targets(self, image: str) -> list[str]:
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

    def upload_of(self, build_id: str, provider: str) -> UploadRow | None:
        rows = self.store.uploads(build_id=build_id, provider=provider)
        return rows[0] if rows else None

    def keep(self) -> None:
        now = time.monotonic()
        live = {b.id: b for b in self.store.builds(states_in=[B.VALIDATING, B.READY])}
        wanted: dict[tuple[str, str], BuildRow] = {}
        for build in live.values():
            targets = self.targets(build.image)
            if build.state == B.VALIDATING:
                targets = targets[:1]
            for provider in targets:
                wanted[(build.id, provider)] = build
        # Nodes may still run from a retired build, and a rollback may serve it again.
        retired = {b.id for b in self.store.builds(states_in=[B.RETIRED])}
        for upload in self.store.uploads():
            key = (upload.build_id, upload.provider)
            needed = wanted.pop(key) if key in wanted else None
            current: UploadRow | None = upload
            if upload.state == U.UPLOADING and upload.id not in self._uploads:
                if needed is None:
                    current = self.move(upload, U.DELETING, "not needed any more")
                else:
                    # Cut off by a restart: uploads are made again from the layers.
                    self._start_upload(upload, needed)
            elif upload.state == U.FAILED and now >= self._retry_at.get(key, 0.0):
                current = self.move(upload, U.DELETING, "failed: removed before a new try")
            elif upload.state == U.READY and needed is None and upload.build_id not in retired:
                # Its build failed or is deleted: nothing launches from it again.
                current = self.move(upload, U.DELETING, "its build is gone")
            if current is not None:
                self.remove(current)
        for (build_id, provider), build in wanted.items():
            if now < self._retry_at.get((build_id, provider), 0.0):
                continue
            if provider not in self.drivers:
                continue
            row = self.store.new_upload(build_id, provider)
            self._start_upload(row, build)

    def _start_upload(self, row: UploadRow, build: BuildRow) -> None:
        labels = tuple(label.name for label in self.config.labels if label.image == build.image)
        upload = ImageUpload(
            build.id, build.image, build.layer_paths(), build.manifest or {}, labels
        )
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
                self._failures.pop(key, None)
                self._retry_at.pop(key, None)
                log.info("image build %s: uploaded to %s", row.build_id, row.provider)
                if self.wake is not None:
                    self.wake()
            else:
                self._failures[key] += 1
                delay = UPLOAD.delay(self._failures[key] - 1)
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

    def move(self, upload: UploadRow, to: UploadState, reason: str) -> UploadRow | None:
        try:
            return self.store.upload_transition(upload.id, U(upload.state), to, reason)
        except StaleState:
            return None

    def remove(self, upload: UploadRow) -> None:
        """Delete a `deleting` upload at its provider (once at a time), then forget it."""
        if upload.state != U.DELETING or upload.id in self._removals:
            return
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
