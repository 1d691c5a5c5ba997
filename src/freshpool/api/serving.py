"""`freshpool serve`'s second process: the front (scheduler, API) beside the launcher.

Why a process of its own: a hand-out is Python work (HTTP parsing, validation, the
scheduler's pass) and so are the launcher's passes, driver calls and node tests. In
one process they take turns at one interpreter lock; at 50 HTTP clients a hand-out's
p99 was 50-70 ms with the launcher's passes in the process and 35 ms without them.

The two processes share the store and tell each other only what it cannot, over a
socket pair (SOCK_SEQPACKET: a message per send, EOF when the other end is gone):

    launcher -> front   b"pass"     a launcher pass ended: nodes may be ready (the
                                    first one lets the scheduler hand out)
    front -> launcher   b"up"       the API answers (once, first)
                        b"failed …" it could not start, and why
                        b"wake"     look now: requests wait for nodes that are not
                                    ready, or nodes were released

The front exits when its end reads EOF, so it never outlives `freshpool serve`; the
launcher's side starts a new front when one dies, on the same listening socket, so
clients' connections wait in its queue instead of being refused.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from freshpool.api.server import bind, url_of
from freshpool.config import Config
from freshpool.service.launcher import Launcher
from freshpool.service.observing import Observing

if TYPE_CHECKING:
    from freshpool.api.front import Front

log = logging.getLogger("freshpool.serve")

URL_FILE = "api.url"
PASS, UP, FAILED, WAKE = b"pass", b"up", b"failed", b"wake"
# Longest message: a start-up failure's text.
MAX_MESSAGE = 65536
# A front that dies is replaced after this long, doubling while new ones die young.
RESTART_FIRST, RESTART_MOST, YOUNG = 1.0, 30.0, 10.0


class StartError(Exception):
    """The front process did not come up."""


class Link:
    """One end of the socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: bytes) -> None:
        # Never blocks: a full buffer means messages of the same kind wait unread
        # already, and each says what a later one repeats. A closed peer shows as EOF
        # to this side's reader, which deals with it.
        with contextlib.suppress(OSError):
            self.sock.send(message, socket.MSG_DONTWAIT)

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


# ---------------------------------------------------------------- the front process


def _front_main(config: Config, listener: socket.socket | None, end: socket.socket) -> None:
    """The front process's body (spawned: a fresh interpreter, nothing inherited but
    the config, the listening socket and its end of the link)."""
    from freshpool import logs
    from freshpool.api.front import start_front
    from freshpool.store import Store

    # Ctrl-C and a service manager's SIGTERM reach the whole process group; the front
    # keeps serving while `freshpool serve` winds its launcher down, then stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(config.log_level)
    link = Link(end)
    store = Store.open(config.state_dir, config.database_url)
    try:
        try:
            front = start_front(config, store, listener, wake=lambda: link.send(WAKE))
        except Exception as exc:
            link.send(FAILED + b" " + str(exc).encode()[: MAX_MESSAGE - 16])
            raise
        link.send(UP)
        follow(link, front)
        front.stop()
    finally:
        store.close()
        link.close()


def follow(link: Link, front: Front) -> None:
    """The front's side: act on the launcher's messages until its end closes."""
    while message := link.receive():
        if message == PASS:
            front.after_launcher_pass()


def relay_wakes(link: Link, wake: Callable[[], None]) -> None:
    """The launcher's side: call `wake` for each of the front's wakes until its end
    closes."""
    while message := link.receive():
        if message == WAKE:
            wake()


# ------------------------------------------------------------- the launcher's side


class FrontProcess:
    """Starts the front process, relays its wakes, replaces it if it dies."""

    def __init__(
        self,
        config: Config,
        listener: socket.socket | None,
        wake: Callable[[], None],
    ) -> None:
        self.config = config
        self.listener = listener
        self.wake = wake
        self.process: multiprocessing.process.BaseProcess | None = None
        self._link: Link | None = None
        self._passed = False
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._started_at = 0.0
        self._delay = RESTART_FIRST

    def start(self, timeout: float = 120.0) -> None:
        """Start the front; return once the API answers. Raises StartError."""
        self._spawn(timeout)
        self._supervisor = threading.Thread(target=self._supervise, name="front", daemon=True)
        self._supervisor.start()

    def _spawn(self, timeout: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # spawn, not fork: this process has threads (and a fork would copy their
        # locks mid-use); the front imports what it needs afresh.
        process = multiprocessing.get_context("spawn").Process(
            target=_front_main,
            args=(self.config, self.listener, theirs),
            name="freshpool-front",
            daemon=True,
        )
        process.start()
        theirs.close()
        link = Link(ours)
        first = link.receive(timeout)
        if first != UP:
            link.close()
            process.kill()
            process.join(10)
            why = first.removeprefix(FAILED).strip().decode(errors="replace")
            raise StartError(
                f"the API process did not start: {why}"
                if why
                else f"the API process did not start (exit code {process.exitcode})"
            )
        self.process, self._link = process, link
        self._started_at = time.monotonic()
        if self._passed:
            # A replacement: the launcher has passed before, so hand out at once.
            self.after_pass()

    def after_pass(self) -> None:
        """The launcher's pass hook."""
        self._passed = True
        if self._link is not None:
            self._link.send(PASS)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            assert self._link is not None
            relay_wakes(self._link, self.wake)
            if self._stopping.is_set():
                return
            self._replace()

    def _replace(self) -> None:
        assert self.process is not None and self._link is not None
        self.process.join(5)
        if self.process.is_alive():
            # It closed its end but lingers: one front at a time, so one scheduler.
            self.process.kill()
            self.process.join(10)
        self._link.close()
        young = time.monotonic() - self._started_at < YOUNG
        self._delay = min(self._delay * 2, RESTART_MOST) if young else RESTART_FIRST
        log.error(
            "the API process exited (exit code %s): starting a new one in %.0f s",
            self.process.exitcode,
            self._delay,
        )
        while not self._stopping.wait(self._delay):
            try:
                self._spawn(timeout=120.0)
                return
            except StartError as exc:
                self._delay = min(self._delay * 2, RESTART_MOST)
                log.error("%s; trying again in %.0f s", exc, self._delay)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._link is not None:
            self._link.close()  # the front reads EOF and stops
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._link is not None:
            self._link.close()  # a replacement started while stopping
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the API process did not stop in %.0f s: killing it", timeout)
                self.process.kill()
                self.process.join(10)


@dataclass
class Running:
    front: FrontProcess
    observing: Observing
    url: str | None
    url_file: Path | None

    def stop(self) -> None:
        self.front.stop()
        self.observing.stop()
        if self.front.listener is not None:
            self.front.listener.close()
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.url_file.unlink()


def start(config: Config, launcher: Launcher, port: int | None = None) -> Running:
    """Start the front process and the observer beside `launcher`, and hook both into
    the launcher's passes.

    Raises server.ListenError when the API cannot listen, StartError when the front
    does not come up; nothing has started then.
    """
    listener = None
    if config.api.enabled:
        listener = bind(config.api.listen, config.api.port if port is None else port)
    front = FrontProcess(config, listener, wake=launcher.wake)
    try:
        front.start()
    except StartError:
        if listener is not None:
            listener.close()
        raise
    launcher.add_pass(front.after_pass)
    observing = Observing(config, launcher)
    observing.start()
    url = url_file = None
    if listener is not None:
        url = url_of(listener)
        # Where clients on this host (and tests using port 0) find the API.
        url_file = config.state_dir / URL_FILE
        url_file.write_text(url + "\n")
    return Running(front, observing, url, url_file)
