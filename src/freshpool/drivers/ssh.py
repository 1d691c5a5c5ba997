"""Reaching a node over SSH with its own client key and pinned host key."""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Generator, Sequence

from freshpool.drivers.base import SshAccess, StepOperation


def ssh_argv(
    access: SshAccess,
    command: Sequence[str] | str | None = None,
    tty: bool = False,
    connect_timeout: float = 10.0,
) -> list[str]:
    """The ssh command line for a node: its key, its known host key, no prompts."""
    argv = [
        "ssh",
        "-i",
        access.key_path,
        "-o",
        f"UserKnownHostsFile={access.known_hosts_path}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-p",
        str(access.port),
        "-t" if tty else "-T",
        f"{access.user}@{access.host}",
    ]
    if command is not None:
        argv.append(command if isinstance(command, str) else shlex.join(command))
    return argv


def paste_command(access: SshAccess) -> str:
    """A short ssh command a person can paste."""
    return shlex.join(
        [
            "ssh",
            "-i",
            access.key_path,
            "-o",
            f"UserKnownHostsFile={access.known_hosts_path}",
            *(["-p", str(access.port)] if access.port != 22 else []),
            f"{access.user}@{access.host}",
        ]
    )


def run(
    access: SshAccess, command: Sequence[str] | str, timeout: float = 60.0, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command on the node and wait for it."""
    return subprocess.run(
        ssh_argv(access, command),
        capture_output=capture,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def banner_ready(host: str, port: int, timeout: float = 0.2) -> bool:
    """True once an SSH server answers with its banner."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_banner(host: str, port: int, timeout: float) -> Generator[float, None, None]:
    """Steps of a StepOperation: poll without blocking until the SSH banner answers."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        # The node is on a local bridge: a refusal or an answer comes within
        # milliseconds, so a short blocking probe costs the loop almost nothing.
        if banner_ready(host, port, timeout=0.05):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SSH answer from {host}:{port} within {timeout:g} s")
        yield pause
        pause = min(pause * 2, 0.2)


class CommandOperation(StepOperation[int]):
    """Run a command on a node over SSH without blocking; the result is its exit status."""

    def __init__(self, access: SshAccess, command: str, timeout: float) -> None:
        self.output = ""
        super().__init__(self._steps(access, command, timeout))

    def _steps(
        self, access: SshAccess, command: str, timeout: float
    ) -> Generator[float, None, int]:
        proc = subprocess.Popen(
            ssh_argv(access, command, connect_timeout=timeout),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        pause = 0.005
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command!r} did not finish within {timeout:g} s")
                yield pause
                pause = min(pause * 2, 0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.output = proc.stdout.read() if proc.stdout else ""
            if proc.stdout:
                proc.stdout.close()
        return proc.returncode
