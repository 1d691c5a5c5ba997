"""The link between `serve`'s two processes: a socket pair with one message per send,
and the messages it carries (serve/__init__.py maps them)."""

from __future__ import annotations

import contextlib
import socket

PASS, UP, FAILED, WAKE = b"pass", b"up", b"failed", b"wake"
# The API process could not reach the database: worth another try, unlike FAILED.
UNREACHABLE = b"unreachable"
# Longest message: a start-up failure's text.
MAX_MESSAGE = 65536


def pair() -> tuple[Link, socket.socket]:
    """Our end, and the socket to hand to the other process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Link(ours), theirs


class Link:
    """One end of the socket pair (SOCK_SEQPACKET: a message per send, EOF when the
    other end is gone)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: bytes) -> None:
        # Never blocks: a full buffer means messages of the same kind wait unread
        # already, and each says what a later one repeats. A closed peer shows as EOF
        # to this side's reader, which deals with it.
        with contextlib.suppress(OSError):
            self.sock.send(message[:MAX_MESSAGE], socket.MSG_DONTWAIT)

    def receive(self, timeout: float | None = None) -> bytes:
        """The next message; b"" once the other end is gone (or after `timeout`)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(MAX_MESSAGE)
        except OSError:
            return b""

    def close(self) -> None:
        # shutdown() also wakes a thread blocked in receive() on this end.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
