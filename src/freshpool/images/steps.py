"""Turn a planned layer into a layer on disk by running its script in a build node."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from freshpool.images.buildlog import TAIL_LINES, BuildLog
from freshpool.images.buildnode import INPUTS, BuildNode, StepTimeout
from freshpool.images.errors import CommandFailed, ImageBuildError
from freshpool.images.failures import (
    disk_full_reason,
    failure_evidence,
    failure_kind,
    is_disk_full,
)
from freshpool.images.layers import Layer, LayerStore
from freshpool.images.plan import FileEntry, PlannedLayer
from freshpool.images.remove import remove_tree
from freshpool.images.retry import DownloadRetry
from freshpool.images.rootcommand import passed_env


class StepRunner:
    """Builds the layers of one image build; failures become ImageBuildError."""

    def __init__(
        self,
        store: LayerStore,
        log: BuildLog,
        image: str,
        *,
        attempts: int,
        retry_delay: float,
        cancel: threading.Event | None,
    ) -> None:
        self.store = store
        self.log = log
        self.image = image
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.cancel = cancel
        self.env_passed = passed_env()

    def build(self, planned: PlannedLayer, key: str, stack: list[Path]) -> Layer:
        """Run `planned` on `stack` (top first) and commit what it wrote under `key`.

        A run that fails for network reasons is tried again after a backoff.
        """
        retry = DownloadRetry(self.attempts, self.retry_delay, self.log.emit)
        try:
            return retry.run(lambda: self._once(planned, key, stack))
        except CommandFailed as failed:
            raise self._step_error(failed, retry.tries) from None

    def commit(self, tree: Path, key: str, about: dict[str, Any]) -> Layer:
        try:
            return self.store.commit(tree, key, about)
        except OSError as exc:
            if is_disk_full(exc):
                remove_tree(tree)
                raise self._disk_full(str(exc)) from None
            raise

    def _once(self, planned: PlannedLayer, key: str, stack: list[Path]) -> Layer:
        output: list[str] = []

        def on_line(line: str) -> None:
            output.append(line)
            self.log.emit(line)

        scratch = self.store.scratch()
        try:
            node = BuildNode(stack, scratch, hostname=f"build-{self.image}")
            with node:
                if planned.files:
                    _write_tar(node.inputs / "files.tar", planned.files)
                node.put_input("step.sh", planned.script.encode())
                code = node.run(
                    ["/bin/sh", "-e", f"{INPUTS}/step.sh"],
                    {**self.env_passed, **planned.env},
                    on_line=on_line,
                    timeout=planned.timeout,
                    cancel=self.cancel,
                )
                if code != 0:
                    raise CommandFailed(planned.name, code, output)
            about = {"kind": planned.kind, "name": planned.name, "image": self.image}
            return self.commit(node.upper, key, about)
        except CommandFailed as failed:
            # Before the scratch directory goes: a nearly full disk is evidence too.
            failed.kind = failure_kind(output, self.store.scratch_root)
            raise
        except StepTimeout as exc:
            raise ImageBuildError(
                self.log.stage, f"{planned.name} {exc}", log_tail=output[-TAIL_LINES:]
            ) from None
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full(str(exc)) from None
            raise
        finally:
            remove_tree(scratch)

    def _step_error(self, failed: CommandFailed, tries: int) -> ImageBuildError:
        code, output, what = failed.exit_code, failed.output, failed.what
        if failed.kind == "disk":
            return self._disk_full(failure_evidence(output, "disk"), code, output)
        if failed.kind == "network":
            reason = (
                f"{what} could not download after {tries}"
                f" {'try' if tries == 1 else 'tries'}: {failure_evidence(output, 'network')}"
            )
        else:
            errors = [line for line in output if line.startswith(("E:", "error", "ERROR"))]
            reason = f"{what} exited with status {code}"
            if errors:
                reason += f": {errors[-1]}"
        return ImageBuildError(
            self.log.stage, reason, exit_code=code, log_tail=output[-TAIL_LINES:]
        )

    def _disk_full(
        self, evidence: str, code: int | None = None, output: list[str] | None = None
    ) -> ImageBuildError:
        tail = (output or list(self.log.recent))[-TAIL_LINES:]
        return ImageBuildError(
            self.log.stage,
            disk_full_reason(self.store.root, evidence),
            exit_code=code,
            log_tail=tail,
            disk_full=True,
        )


def _write_tar(path: Path, entries: tuple[FileEntry, ...]) -> None:
    """The files to copy in, owned by root, as a tar that the node unpacks at /."""

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(path, "w") as tar:
        for dest, value, mode in entries:
            name = dest.lstrip("/")
            if isinstance(value, bytes):
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
