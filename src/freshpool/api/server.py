"""Runs the API with uvicorn in a thread, on a socket bound up front."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from freshpool.config import ApiTls
from freshpool.core.errors import Unavailable

log = logging.getLogger("freshpool.api")


class ListenError(Unavailable):
    """The API cannot listen where the config says."""


def bind(listen: str, port: int) -> socket.socket:
    """The API's listening socket. Bound by `freshpool serve` itself, before it starts
    anything, so "address in use" is an error it reports at once; port 0 picks a free
    port. The socket outlives an API process that dies: connections wait in its queue
    for the next one."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            listen, port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ListenError(
            f"the API cannot listen on {listen}:{port}:"
            f" {exc.strerror or exc}; set api.listen/api.port in the config"
            " (port 0 picks a free one) or api.enabled: false"
        ) from None
    return sock


def check_tls(tls: ApiTls | None) -> None:
    """Load the certificate and key once up front, so a bad file is an error at start."""
    if tls is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ListenError(
            f"api.tls: cannot use cert {tls.cert} with key {tls.key}: {exc}"
        ) from None


def url_of(sock: socket.socket, tls: ApiTls | None = None) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class ApiServer:
    def __init__(self, app: ASGIApp, sock: socket.socket, tls: ApiTls | None = None) -> None:
        self.app = app
        self.sock = sock
        self.tls = tls
        self.url = url_of(sock, tls)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Serve in a thread; return the URL once requests are answered."""
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            log_level="warning",
            # Long-polls and event streams must not hold up a stop.
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
            ssl_certfile=self.tls.cert if self.tls else None,
            ssl_keyfile=self.tls.key if self.tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.sock]}, name="api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ListenError(f"the API did not start on {self.url}")
            time.sleep(0.01)
        log.info("API and dashboard at %s (OpenAPI at %s/docs)", self.url, self.url)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
