"""A VM node's clean shutdown: the ACPI power button pressed over QMP from a worker thread,
then its QEMU waited for without blocking."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qemu.qmp import QMPClient

from freshpool.drivers.host import processes
from freshpool.drivers.qemu.records import QMP_SOCKET

# The logger keeps the name it had when the driver was one module.
log = logging.getLogger("freshpool.drivers.qemu")


class PowerButton:
    """Presses nodes' ACPI power buttons over QMP, off the launcher's thread."""

    def __init__(self) -> None:
        # QMP is asyncio; its calls run on these threads and their futures are polled.
        self._pool: ThreadPoolExecutor | None = None

    def press(self, node_dir: Path) -> Future[None]:
        """Send system_powerdown to the node's QEMU; the future says how the call went."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmp")
        return self._pool.submit(qmp_call, node_dir, "system_powerdown")

    def shut_down(
        self, name: str, node_dir: Path, pids: set[int], grace: float, reap: Callable[[], None]
    ) -> Generator[float, None, bool]:
        """Steps that press the button and wait for `pids` to end, until the monotonic
        `grace`; returns whether they all ended. `reap` collects exited children."""
        asked = self.press(node_dir)
        pause = 0.02
        while (pids := {p for p in pids if processes.start_time(p) is not None}) and (
            time.monotonic() < grace and not (asked.done() and asked.exception())
        ):
            reap()
            yield pause
            pause = min(pause * 2, 0.2)
        if asked.done() and asked.exception():
            log.info("%s: ACPI shutdown not possible: %s", name, asked.exception())
        return not pids


def qmp_call(node_dir: Path, command: str, timeout: float = 2.0) -> None:
    """Run one QMP command on the QEMU whose socket is in `node_dir`, and wait for it."""
    # Through /proc/self/fd: the socket's full path may be too long for a unix address.
    fd = os.open(node_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        address = f"/proc/self/fd/{fd}/{QMP_SOCKET}"

        async def call() -> None:
            client = QMPClient("freshpool")
            await asyncio.wait_for(client.connect(address), timeout)
            try:
                await asyncio.wait_for(client.execute(command), timeout)
            finally:
                await client.disconnect()

        asyncio.run(call())
    finally:
        os.close(fd)
