"""`freshpool serve`'s config reload, on SIGHUP (or `freshpool config reload`).

The file is read again and checked first, off the launcher's loop: a file with
errors, one that changes what only a restart can (state-dir, database-url), or a
new provider whose driver cannot work here is refused with its reasons, and the
running config stays. A good one that differs ends the current run of serve the
way SIGTERM does (launches in flight undone, ready and in-use nodes kept), and
serve starts again on it at once: the new run adopts every node, the API keeps its
listening socket when its address is unchanged, so clients wait rather than fail.

The outcome is written to <state-dir>/reload.json (reload-api.json for
`serve --api-only`, which reloads the same way) for `config reload` to show.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from freshpool.config import Config, ConfigError, load

log = logging.getLogger("freshpool.serve")
RESULT_FILE = "reload.json"
# What a run of serve cannot change under itself.
_RESTART_ONLY = ("state_dir", "database_url")


class Reloader:
    def __init__(
        self,
        path: Path | None,
        current: Config,
        stop: threading.Event,
        result_file: str = RESULT_FILE,
    ) -> None:
        self.path = path
        self.result_file = result_file
        self.current = current
        self.stop = stop
        self.next: Config | None = None
        self._asked = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="config-reload", daemon=True).start()

    def request(self) -> None:
        """From the SIGHUP handler: nothing but an event set."""
        self._asked.set()

    def close(self) -> None:
        self._done.set()
        self._asked.set()

    def _watch(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            if self._done.is_set():
                return
            new, why = self._check()
            self._report(new is not None, why)
            if new is not None:
                self.next = new
                self.stop.set()
                return

    def _check(self) -> tuple[Config | None, str]:
        try:
            new = load(self.path)
        except ConfigError as exc:
            return None, f"refused, the running config stays: {exc}"
        fixed = [key.replace("_", "-") for key in _RESTART_ONLY
                 if getattr(new, key) != getattr(self.current, key)]  # fmt: skip
        if fixed:
            return None, (f"refused, the running config stays: {', '.join(fixed)} change only "
                          "with a restart of serve")  # fmt: skip
        if new == self.current:
            return None, "unchanged: nothing to do"
        problem = _new_providers_problem(self.current, new)
        if problem:
            return None, f"refused, the running config stays: {problem}"
        return new, "taken: serve restarts its launcher and API on it, keeping every node"

    def _report(self, ok: bool, message: str) -> None:
        (log.info if ok else log.warning)("config reload: %s", message)
        result = {"at": time.time(), "ok": ok, "message": message}
        (self.current.state_dir / self.result_file).write_text(json.dumps(result) + "\n")


def _new_providers_problem(current: Config, new: Config) -> str | None:
    """Why a provider added or changed cannot work here, or None."""
    from freshpool.drivers.base import DriverError, load_driver

    old = {p.name: p for p in current.providers}
    for provider in new.providers:
        if old.get(provider.name) == provider:
            continue
        try:
            load_driver(provider, "reload-check", new.state_dir).check()
        except DriverError as exc:
            return str(exc)
    return None


def api_unchanged(current: Config, new: Config) -> bool:
    """Whether the next run can listen on the same socket."""
    a, b = current.api, new.api
    return (a.enabled, a.listen, a.port, a.tls) == (b.enabled, b.listen, b.port, b.tls)
