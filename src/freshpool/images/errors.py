"""The exceptions an image build raises, each placed under the project's error root."""

from __future__ import annotations

from freshpool.core.errors import Refused, Unavailable


class ImageBuildError(Refused):
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


# Unavailable first, so that the error tables (core.errors.code_for) read this as the
# host's problem rather than a failed build, while `except ImageBuildError` still sees it.
class HostCannotBuild(Unavailable, ImageBuildError):
    """This host cannot build images at all (a tool missing, not root, no mirror)."""


class BuildCancelled(ImageBuildError):
    """The build was stopped from outside (serve shutting down)."""


class CommandFailed(Refused):
    """A build command exited non-zero; its output tells why (see images/failures.py)."""

    def __init__(self, what: str, exit_code: int, output: list[str]) -> None:
        super().__init__(f"{what} exited with {exit_code}")
        self.what = what
        self.exit_code = exit_code
        self.output = output
        # Lines the command wrote elsewhere (debootstrap's own log in its target).
        self.extra: list[str] = []
        # Why it failed, once classified: "disk", "network", "package" or "other".
        self.kind = "other"
