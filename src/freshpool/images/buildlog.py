"""Where a build's output lines go: its log file, its progress callback, the tail an error shows."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from freshpool.images.failures import is_disk_full

# `progress(stage, line)`: a one-line description when a stage starts, then every line.
Progress = Callable[[str, str], None]
TAIL_LINES = 20


class BuildLog:
    """One build's lines: each goes to the open file, to `progress` and into `recent`.

    A line that cannot be written is dropped from the file: a full disk must not hide
    the build's own error.
    """

    def __init__(self, progress: Progress | None, stage: str) -> None:
        self.progress = progress
        self.stage = stage
        self.recent: deque[str] = deque(maxlen=TAIL_LINES)
        self.file: IO[str] | None = None

    def start(self, stage: str, description: str) -> None:
        self.stage = stage
        self.line(f"==> {stage}: {description}")
        if self.progress is not None:
            self.progress(stage, description)

    def emit(self, line: str) -> None:
        self.line(line)
        if self.progress is not None:
            self.progress(self.stage, line)

    def line(self, line: str) -> None:
        """Into the file and the tail only, not to `progress`."""
        self.recent.append(line)
        if self.file is not None:
            self._write(line)

    def _write(self, line: str) -> None:
        assert self.file is not None
        with contextlib.suppress(OSError):
            self.file.write(line + "\n")
            self.file.flush()


class DiskFullLog(BuildLog):
    """A log on the disk the build fills: on a full disk it goes on without its file.

    `lost_lines` then says lines are missing from the file, which is itself evidence
    that the disk filled up.
    """

    def __init__(self, progress: Progress | None, stage: str) -> None:
        super().__init__(progress, stage)
        self.lost_lines = False

    def open(self, path: Path, first_line: str) -> None:
        """Append to `path`, starting with `first_line`; a full disk leaves it closed."""
        try:
            self.file = open(path, "a")  # noqa: SIM115 - open for the whole build
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.file, self.lost_lines = None, True
            return
        if self.lost_lines:
            # The last line written before the disk filled up may have been cut short.
            self.line("")
        self.line(first_line)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def _write(self, line: str) -> None:
        assert self.file is not None
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.lost_lines = True
            self.close()
