"""A TCP proxy on loopback in front of PostgreSQL's unix socket, for cutting one
launcher off its database: `cut()` drops every connection through it at once (the
launcher sees its connections reset mid-query), and `block(seconds)` also refuses
new ones for a while (a partition: the launcher's lease may run out meanwhile)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CutProxy:
    def __init__(self, unix_socket: str) -> None:
        self.target = unix_socket
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._blocked_until = 0.0
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self._blocked_until:
                self.refused += 1
                _hang_up(client)
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                _hang_up(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            for a, b in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._end(pair)

    def _end(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for sock in pair:
            _hang_up(sock)

    def cut(self, block: float = 0.0) -> int:
        """Drop every connection now; with `block`, refuse new ones for that long.
        How many were dropped."""
        self._blocked_until = time.monotonic() + block
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._end(pair)
        self.dropped += len(pairs)
        return len(pairs)

    def blocked(self) -> bool:
        return time.monotonic() < self._blocked_until

    def close(self) -> None:
        self._closed = True
        _hang_up(self.listener)
        self.cut()


def _hang_up(sock: socket.socket) -> None:
    # SO_LINGER 0: the peer gets a reset, as from a dropped route, not a clean FIN.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
