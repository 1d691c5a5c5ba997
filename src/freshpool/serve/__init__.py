"""`freshpool serve`'s processes, and the one map of every wake-up between them.

Two processes share the store and tell each other only what it cannot:

    launcher process (launcher/)              API process (serve/apiprocess.py)
      Runner: controllers' passes               uvicorn's event loop: the API, and
      (nodes, upkeep, leaks, images, metrics)   the Scheduler's pass task
      ApiProcess (supervisor.py)  <-- link -->  apiprocess.main (reads the link)

Why two: a hand-out is Python work (HTTP parsing, validation, the scheduler's pass)
and so are the launcher's passes, driver calls and node tests. In one process they
take turns at one interpreter lock, and a launcher pass lands in the hand-outs'
latency.

Every wake-up, and what it is for:

  1. The store's change counter (store/changes.py): SQLite's data_version, or a
     LISTEN for PostgreSQL's NOTIFY. Any process's commit moves it.
     - The Runner polls it while it sleeps: a release, a new request or a CLI's
       change starts a launcher pass within milliseconds.
     - A CLI's direct acquire (dispatch/direct.py) polls it while it waits.
     - The API's ChangeFeed (api/changes.py) polls it for the dashboard's
       long-poll of /status.
  2. The link (serve/link.py), messages of one word:
     - launcher -> API  b"pass": a launcher pass ended; nodes may be ready. The
       Scheduler passes (and from the first one on, it hands out).
     - API -> launcher  b"up" once, or b"failed <why>": the API process started or not.
     - API -> launcher  b"wake": requests wait for nodes that are not ready, or
       nodes were released or cancelled: the Runner passes now.
  3. The Scheduler's due event (dispatch/scheduler.py), on the API's loop: a
     handler submitted a request, or b"pass" came. One pass serves them all.
  4. The Waiters (dispatch/waiters.py): after each scheduler pass, long-polls and
     event streams on a request that is no longer pending are woken.
  5. The Runner's wake (launcher/runner.py): b"wake" from the API process, and the
     image controller's build thread when a build ends.

With several API servers on one PostgreSQL (`serve --api-only`, serve/apionly.py)
there is no link between a launcher and the other servers. The store's NOTIFY
(migration 0008) stands in for it: the change counter on PostgreSQL is a LISTEN, so
wake-ups 1 reach every process, and every scheduler there also passes on each
change (in place of b"pass"), while the launchers' Runners take a new request or a
release from it (in place of b"wake").

The API process exits when its end of the link reads EOF, so it never outlives
`serve`; the supervisor starts a new one when it dies, on the same listening
socket, so clients' connections wait in its queue instead of being refused.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from freshpool.api.server import bind, check_tls, url_of
from freshpool.config import Config
from freshpool.launcher import Runner
from freshpool.serve.supervisor import ApiProcess, StartError

if TYPE_CHECKING:
    from freshpool.integrations.nodepool.bridge import Bridge

URL_FILE = "api.url"


@dataclass
class Running:
    api: ApiProcess
    url: str | None
    url_file: Path | None
    # The nodepool-compat bridge (integrations/nodepool/), if configured.
    compat: Bridge | None = None

    def stop(self, keep_listener: bool = False) -> None:
        """Stop the API process; its listening socket too unless `keep_listener` (a
        reload hands it to the next one, so clients wait in its queue meanwhile)."""
        if self.compat is not None:
            self.compat.stop()
        self.api.stop()
        if keep_listener:
            return
        if self.api.listener is not None:
            self.api.listener.close()
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.url_file.unlink()


def start(config: Config, runner: Runner, port: int | None = None,
          listener: socket.socket | None = None) -> Running:  # fmt: skip
    """Start the API process beside `runner` and hook it into the runner's passes,
    listening on `listener` if given (a reload's), else on a new socket.

    Raises ListenError when the API cannot listen, StartError when the process does
    not come up; nothing has started then.
    """
    if config.api.enabled and listener is None:
        check_tls(config.api.tls)
        listener = bind(config.api.listen, config.api.port if port is None else port)
    api = ApiProcess(config, listener, wake=runner.wake)
    try:
        api.start()
    except StartError:
        if listener is not None:
            listener.close()
        raise
    runner.after_pass.append(api.after_pass)
    url = url_file = None
    if listener is not None:
        url = url_of(listener, config.api.tls)
        # Where clients on this host (and tests using port 0) find the API.
        url_file = config.state_dir / URL_FILE
        url_file.write_text(url + "\n")
    running = Running(api, url, url_file)
    if config.nodepool_compat is not None:
        # Zuul's front door: imported only when configured, as kazoo is an extra.
        from freshpool.integrations.nodepool.bridge import Bridge

        bridge = Bridge(config, runner.store, poke=api.poke)
        try:
            bridge.start()
        except Exception:
            running.stop()
            raise
        running.compat = bridge
        runner.after_pass.append(bridge.launcher_passed)
    return running


__all__ = ["Running", "StartError", "start"]
