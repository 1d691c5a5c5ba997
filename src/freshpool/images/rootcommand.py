"""Run the base builder's commands, on the host or in its partial root, into the build log."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

from freshpool.images.buildlog import BuildLog
from freshpool.images.errors import CommandFailed

SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_RESOLV = Path("/etc/resolv.conf")
# The environment variables a build passes on, so a host's proxy also serves the build.
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def build_env() -> dict[str, str]:
    """The environment of a build's commands: none of the caller's but its proxies."""
    env = {"PATH": SEARCH_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    env.update(passed_env())
    return env


def passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in PASSED_ENV}


class RootCommands:
    """Commands of one base build: run on the host, or inside the partial root."""

    def __init__(self, bwrap: str, root: Path, log: BuildLog) -> None:
        self.bwrap = bwrap
        self.root = root
        self.log = log
        self.env = build_env()

    def in_root(self, argv: list[str]) -> list[str]:
        """argv wrapped to run inside the partial image, with the host's network and resolver."""
        wrap = [
            self.bwrap,
            "--bind", str(self.root), "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--perms", "1777", "--tmpfs", "/tmp",
        ]  # fmt: skip
        if HOST_RESOLV.exists():
            wrap += ["--ro-bind", str(HOST_RESOLV), "/etc/resolv.conf"]
        wrap += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
        return [*wrap, *argv]

    def run(self, argv: list[str], what: str) -> list[str]:
        """Run argv, each output line emitted to the log; its output, or CommandFailed."""
        self.log.emit(f"$ {shlex.join(argv)}")
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
                    self.log.emit(line)
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if code != 0:
            raise CommandFailed(what, code, output)
        return output

    def has_option(self, tool: str, option: str) -> bool:
        """Whether `tool --help` mentions `option` (debootstrap's options vary by version)."""
        result = subprocess.run(
            [tool, "--help"], capture_output=True, text=True, env=self.env, check=False
        )
        return option in result.stdout + result.stderr
