"""Logging set-up: one line per event, with the node or request it concerns."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("freshpool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
