"""`python -m freshpool.drivers.qemu.relay HOST PORT`: one guest connection to a host port.

QEMU's user-mode network runs this for each connection a VM opens to a forwarded
host port (guestfwd's cmd: form), with the connection on stdin and stdout; it
copies both ways until either side closes.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> None:
    upstream = socket.create_connection((host, port), timeout=10)
    upstream.settimeout(None)
    watch = selectors.DefaultSelector()
    watch.register(0, selectors.EVENT_READ)
    watch.register(upstream, selectors.EVENT_READ)
    while True:
        for key, _ in watch.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    return
                upstream.sendall(data)
            else:
                data = upstream.recv(65536)
                if not data:
                    return
                os.write(1, data)


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
