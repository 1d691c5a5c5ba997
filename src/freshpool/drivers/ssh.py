"""Reaching a node over SSH with its own client key and pinned host key."""

from __future__ import annotations

import errno
import select
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from freshpool.drivers.operations import CommandResult, StepOperation


@dataclass(frozen=True)
class SshAccess:
    """Everything a client needs to reach a node over SSH; stored with the node."""

    host: str
    port: int
    user: str
    key_path: str
    known_hosts_path: str
    # The node's SSH host public keys ("ssh-ed25519 AAAA..."), for clients to pin.
    host_keys: Sequence[str] = ()
    # Where a client on another machine reaches the node's sshd, if it is published.
    public_host: str | None = None
    public_port: int | None = None
    # The host's address as the node sees it: where the provider's host-ports are.
    host_from_node: str | None = None
    # False only for nodes of an emulated cloud whose host key cannot be read: the
    # first key seen is then taken.
    strict_host_keys: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_path": self.key_path,
            "known_hosts_path": self.known_hosts_path,
            "host_keys": list(self.host_keys),
            "public_host": self.public_host,
            "public_port": self.public_port,
            "host_from_node": self.host_from_node,
            "strict_host_keys": self.strict_host_keys,
        }


def host_keys_in(known_hosts: str) -> list[str]:
    """The keys of a known_hosts file freshpool wrote ("ADDRESS TYPE KEY" lines)."""
    try:
        with open(known_hosts) as lines:
            return [" ".join(line.split()[1:3]) for line in lines if line.strip()]
    except FileNotFoundError:
        return []


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
        "StrictHostKeyChecking=" + ("yes" if access.strict_host_keys else "accept-new"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        # OpenSSH's default post-quantum key exchange costs much client CPU per
        # connection; nodes are short-lived and on a host-only network, so the
        # classic curve goes first (the rest of the default list stays allowed).
        "-o",
        "KexAlgorithms=^curve25519-sha256",
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


# Appends keys to the user's authorized_keys; the directory is made if missing.
AUTHORIZE = "umask 077 && mkdir -p ~/.ssh && cat >> ~/.ssh/authorized_keys"


def authorize_keys(
    accesses: Sequence[SshAccess], keys: Sequence[str], timeout: float = 30.0
) -> list[str | None]:
    """Let `keys` log in to each node too, all nodes at once; per node, None or why not."""
    text = "".join(f"{key}\n" for key in keys)
    procs = [
        subprocess.Popen(
            ssh_argv(access, AUTHORIZE),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for access in accesses
    ]
    deadline = time.monotonic() + timeout
    errors: list[str | None] = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(text, timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"no answer within {timeout:g} s")
            continue
        errors.append(None if proc.returncode == 0 else f"ssh: {stderr.strip()[-300:]}")
    return errors


class BannerProbe:
    """One non-blocking connection attempt; `poll()` until it says yes or no."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        self._connected = False
        self._result: bool | None = None
        code = self._sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            self._finish(False)
        self._connected = code == 0

    def _finish(self, result: bool) -> bool:
        self._result = result
        self._sock.close()
        return result

    def poll(self) -> bool | None:
        """True once the banner came, False if the attempt failed, None while pending."""
        if self._result is not None:
            return self._result
        if not self._connected:
            _, writable, _ = select.select([], [self._sock], [], 0)
            if not writable:
                return None
            if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                # Refused: nothing listens yet.
                return self._finish(False)
            self._connected = True
        try:
            data = self._sock.recv(4, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            return self._finish(False)
        if len(data) < 4 and data and b"SSH-".startswith(data):
            return None
        return self._finish(data.startswith(b"SSH-"))

    def close(self) -> None:
        if self._result is None:
            self._finish(False)


def wait_for_banner(
    host: str,
    port: int,
    proc: subprocess.Popen[bytes],
    deadline: float,
    died: Callable[[int], Exception],
    timed_out: Callable[[], Exception],
    pending: tuple[float, float],
    refused: tuple[float, float],
) -> Generator[float, None, None]:
    """Steps that poll host:port until an SSH banner comes, without ever blocking.

    If `proc` (what serves the node) exits first, `died(its status)` is raised; past
    the monotonic `deadline`, `timed_out()`. `pending` and `refused` are the first and
    the longest pause, doubling in between, while a connection waits for its banner
    and after a connection was refused.
    """
    wait_pending, wait_refused = pending[0], refused[0]
    probe = BannerProbe(host, port)
    try:
        while not (answer := probe.poll()):
            status = proc.poll()
            if status is not None:
                raise died(status)
            if time.monotonic() > deadline:
                raise timed_out()
            if answer is None:
                yield wait_pending
                wait_pending = min(wait_pending * 2, pending[1])
            else:
                yield wait_refused
                wait_refused = min(wait_refused * 2, refused[1])
                probe = BannerProbe(host, port)
    finally:
        probe.close()


class CommandOperation(StepOperation[int], CommandResult):
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
