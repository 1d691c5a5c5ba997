"""Image builds as the store sees them: a row per build, the builder in between."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from freshpool.config import Config
from freshpool.images.build import ImageBuildError, build_image
from freshpool.states import BuildState
from freshpool.store import BuildRow, Store

log = logging.getLogger("freshpool.images")
Progress = Callable[[str, str], None]


def images_dir(config: Config) -> Path:
    return config.state_dir / "images"


def build(
    config: Config, store: Store, image_name: str, progress: Progress | None = None
) -> BuildRow:
    """Build one image now; on success it is the build new nodes launch from."""
    image = config.image(image_name)
    build_id = f"{image.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path = images_dir(config) / image.name / build_id
    store.new_build(build_id, image.name, str(path))
    log.info("image %s: build %s started", image.name, build_id)
    try:
        manifest = build_image(
            image, path, cache_dir=config.state_dir / "cache" / "debootstrap", progress=progress
        )
    except (ImageBuildError, OSError) as exc:
        store.build_transition(build_id, BuildState.BUILDING, BuildState.FAILED, str(exc))
        log.error("image %s: build %s failed: %s", image.name, build_id, exc)
        raise
    except BaseException:
        store.build_transition(build_id, BuildState.BUILDING, BuildState.FAILED, "interrupted")
        raise
    row = store.build_transition(
        build_id, BuildState.BUILDING, BuildState.READY, "built", manifest=manifest
    )
    log.info("image %s: build %s ready", image.name, build_id)
    return row


def missing_images(config: Config, store: Store) -> list[str]:
    """Images some label needs that have no ready build and none in progress."""
    needed = sorted({label.image for label in config.labels})
    missing = []
    for name in needed:
        builds = store.builds(name)
        if not any(b.state in (BuildState.READY, BuildState.BUILDING) for b in builds):
            missing.append(name)
    return missing


def build_missing_in_background(config: Config, store: Store) -> threading.Thread | None:
    """Build every missing image, one after another, without holding up the launcher."""
    missing = missing_images(config, store)
    if not missing:
        return None

    def work() -> None:
        for name in missing:
            # A failure is logged and recorded on the build row by build(); the
            # launcher keeps serving other labels either way.
            with contextlib.suppress(Exception):
                build(config, store, name, progress=_log_progress(name))

    thread = threading.Thread(target=work, name="image-builder", daemon=True)
    thread.start()
    return thread


def _log_progress(image: str) -> Progress:
    def report(stage: str, line: str) -> None:
        log.debug("image %s: %s: %s", image, stage, line)

    return report
