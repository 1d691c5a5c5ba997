"""The image pipeline in a real pool: build, validate on a real node, serve, rebuild, delete.

Builds start from the session's cached debootstrap base (linked, not copied), so each
build here costs its steps, a validation node and the snapshots, not a debootstrap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from freshpool import launcher as launching
from freshpool.config import Config, Image
from freshpool.core.backoff import FAILED_BUILD, Backoff
from freshpool.core.states import BuildState
from freshpool.dispatch import direct
from freshpool.drivers import ssh
from freshpool.drivers.base import (
    DoneOperation,
    DriverError,
    ImageUpload,
    Instance,
    NodeSpec,
    Operation,
    SshAccess,
    StepOperation,
)
from freshpool.drivers.local import LocalDriver
from freshpool.launcher import Launcher, builds, uploads
from freshpool.launcher.images import ImageController
from freshpool.store import BuildRow, NodeRow
from tests.conftest import IMAGE_CACHE
from tests.support import Pool, run_until

B = BuildState
# The session's test image (tests/conftest.py TEST_IMAGE), plus steps: same base layer.
BASE = """  - name: debian-bookworm
    packages: [python3]
    prefetch: [make]
"""


def images_yaml(steps: list[str], validate: list[str] | None = None, **extra: object) -> str:
    text = BASE + "    steps:\n" + "".join(f"      - {s!r}\n" for s in steps)
    if validate is not None:
        text += "    validate:\n" + "".join(f"      - {v!r}\n" for v in validate)
    for key, value in extra.items():
        text += f"    {key}: {value}\n"
    return text


def image_launcher(pool: Pool, config: Config | None = None) -> tuple[Launcher, ImageController]:
    """The launcher with its image controller, as `serve` builds it: the controller
    shares the launcher's providers, so on PostgreSQL it validates on those the
    launcher's leases give it, as they come, and builds while it holds the builder
    lease. Builds start from the session's cached base."""
    launcher = pool.launcher(config, images=True, base_cache=IMAGE_CACHE)
    assert launcher.images is not None
    return launcher, launcher.images


def with_image(config: Config, **changes: object) -> Config:
    """The same pool with the first image's definition changed, as after a config edit."""
    data = {**config.images[0].model_dump(), **changes}
    return config.model_copy(update={"images": [Image.model_validate(data), *config.images[1:]]})


def settle(
    launcher: Launcher,
    keeper: ImageController,
    done: Callable[[], bool],
    timeout: float = 180,
    failures_expected: bool = False,
) -> None:
    """Run launcher passes (the keeper's included) until done; stop early if a build fails."""
    store = launcher.store
    known_failed = {b.id for b in store.builds(states_in=[B.FAILED])}

    def finished() -> bool:
        if not failures_expected:
            failed = [b for b in store.builds(states_in=[B.FAILED]) if b.id not in known_failed]
            assert not failed, f"build {failed[0].id} failed: {failed[0].reason}"
        return done()

    try:
        run_until(launcher, finished, timeout)
    except BaseException:
        keeper.stop()
        raise


def newest(pool: Pool, image: str = "debian-bookworm") -> BuildRow:
    return pool.store.builds(image)[0]


def run_on(node: NodeRow, command: str) -> str:
    assert node.access is not None
    result = ssh.run(SshAccess(**node.access), command)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def image_base(image_build_dir: Path) -> Path:
    """Make sure the session's base is built (and cached) before a keeper links it."""
    return image_build_dir


def test_build_validate_serve_rebuild_and_delete(
    make_pool: Callable[..., Pool], image_base: Path
) -> None:
    v1 = images_yaml(
        ["echo v1 > /etc/fp-version", "rm /etc/debian_version"],
        validate=["grep -qx v1 /etc/fp-version", "! test -e /etc/debian_version"],
        keep=1,
    )
    pool = make_pool(min_ready=1, images=v1)
    launcher, keeper = image_launcher(pool)
    prebuilt = pool.store.serving_build("debian-bookworm")
    assert prebuilt is not None

    # The pool serves the prebuilt build while the new one builds and validates.
    pool.store.request_build("debian-bookworm")
    settle(
        launcher,
        keeper,
        lambda: newest(pool).id != prebuilt.id and newest(pool).state in (B.READY, B.FAILED),
    )
    first = newest(pool)
    assert first.state == B.READY, first.reason
    assert first.reason.startswith("validated in")
    assert pool.store.serving_build("debian-bookworm").id == first.id
    log = Path(first.log_path).read_text()
    assert "==> validate: booting node" in log and "validated in" in log
    # The validation node is gone, row and instance.
    assert not [n for n in pool.store.nodes() if n.label.startswith("image:")]
    assert [(u.provider, u.state) for u in pool.store.uploads(build_id=first.id)] == [
        ("local", "ready")
    ]
    manifest = first.manifest or {}
    assert [layer["kind"] for layer in manifest["layers"]] == ["base", "step", "step"]
    assert first.layer_paths() == tuple(Path(p) for p in manifest["stack"])
    assert "python3" in manifest["installed"]
    assert any(name.startswith("make_") for name in manifest["prefetched"]["apt"])

    # New nodes launch from it. keep: 1 retired the prebuilt build, so the node launched
    # from it meanwhile is replaced too.
    settle(
        launcher, keeper, lambda: any(n.build_id == first.id for n in pool.store.nodes(["ready"]))
    )
    (old_node,) = direct.acquire(pool.config, pool.store, ["debian"], timeout=30)
    assert old_node.build_id == first.id
    assert run_on(
        old_node, "cat /etc/fp-version; test -e /etc/debian_version || echo gone"
    ).split() == [
        "v1",
        "gone",
    ]

    # The definition changes (a restarted serve with the new config): it rebuilds on its own.
    v2 = with_image(
        pool.config,
        steps=[*pool.config.images[0].steps[:1], {"run": "echo v2 > /etc/fp-version"}],
        validate_commands=["grep -qx v2 /etc/fp-version"],
    )
    launcher, keeper = image_launcher(pool, v2)
    # The ready node of the first build is replaced as soon as keep: 1 retires that build.
    settle(
        launcher,
        keeper,
        lambda: any(n.build_id == newest(pool).id for n in pool.store.nodes(["ready"])),
    )
    second = newest(pool)
    assert second.reason.startswith("validated in")
    layers = second.manifest["layers"]
    assert [(layer["kind"], layer["cached"]) for layer in layers] == [
        ("base", True),
        ("step", True),
        ("step", False),
    ]
    (new_node,) = [n for n in pool.store.nodes(["ready"]) if n.build_id == second.id]
    assert run_on(new_node, "cat /etc/fp-version").split() == ["v2"]
    # The job that started before keeps its node and its build.
    assert pool.store.node(old_node.id).state == "in-use"
    assert run_on(old_node, "cat /etc/fp-version").split() == ["v1"]

    # keep: 1. The first build is retired but stays while a node uses it; the prebuilt
    # one nobody uses is deleted (its files are not the pool's, so they stay).
    assert pool.store.build(first.id).state == B.RETIRED
    assert pool.store.build(prebuilt.id).state == B.DELETED
    assert (Path(prebuilt.path) / "rootfs").is_dir()
    first_dir = Path(first.path)
    own_layer = Path(first.manifest["stack"][0])
    assert first_dir.is_dir() and own_layer.is_dir()

    pool.store.release_set(old_node.id, "released")
    settle(launcher, keeper, lambda: pool.store.build(first.id).state == B.DELETED)
    settle(launcher, keeper, lambda: not own_layer.exists())
    assert not first_dir.exists()
    # Layers the serving build shares (the base, the unchanged step) stay.
    for path in second.layer_paths():
        assert path.is_dir(), path
    assert pool.store.uploads(build_id=first.id) == []
    keeper.stop()


def test_failed_validation_leaves_the_previous_build_serving(
    make_pool: Callable[..., Pool], image_base: Path
) -> None:
    pool = make_pool(min_ready=1, images=images_yaml(["true"], validate=["echo broken; exit 7"]))
    launcher, keeper = image_launcher(pool)
    before = pool.store.serving_build("debian-bookworm")
    pool.store.request_build("debian-bookworm")
    settle(
        launcher,
        keeper,
        lambda: newest(pool).state == B.FAILED and not keeper.busy,
        failures_expected=True,
    )
    assert newest(pool).id != before.id
    failed = newest(pool)
    assert "validation failed" in failed.reason
    assert "'echo broken; exit 7' exited 7" in failed.reason
    assert "broken" in failed.reason
    assert pool.store.serving_build("debian-bookworm").id == before.id
    # Nodes keep coming from the build before, and no validation node is left.
    settle(launcher, keeper, lambda: len(pool.store.nodes(["ready"])) == 1)
    assert [n.build_id for n in pool.store.nodes()] == [before.id]
    # A failed build is not tried again at once: it backs off.
    assert builds.due_builds(pool.config, pool.store, automatic=True) == []
    later = time.time() + FAILED_BUILD.base + 1
    due = builds.due_builds(pool.config, pool.store, automatic=True, now=later)
    assert [d.why for d in due] == ["its last build failed"]
    keeper.stop()


def test_rebuild_on_age_runs_the_steps_again(
    make_pool: Callable[..., Pool], image_base: Path
) -> None:
    pool = make_pool(
        min_ready=0, images=images_yaml(["echo same > /etc/fp-same"], **{"rebuild-age": 3600})
    )
    launcher, keeper = image_launcher(pool)
    pool.store.request_build("debian-bookworm")
    settle(
        launcher,
        keeper,
        lambda: newest(pool).id != "debian-bookworm-test" and newest(pool).state == B.READY,
    )
    first = newest(pool)
    # Nothing is due while the build is younger than rebuild-age.
    for _ in range(5):
        launcher.pass_once()
        time.sleep(0.1)
    assert newest(pool).id == first.id
    # An hour and a bit later (as far as the store knows):
    pool.store.set_built_at("debian-bookworm", time.time() - 3700)
    settle(launcher, keeper, lambda: newest(pool).id != first.id and newest(pool).state == B.READY)
    second = newest(pool)
    assert "older than rebuild-age" in second.manifest["why"]
    assert second.manifest["fresh"]
    steps = [layer for layer in second.manifest["layers"] if layer["kind"] == "step"]
    # Fresh: the step ran again, and as it wrote the same file, it made the same layer.
    assert [layer["cached"] for layer in steps] == [False]
    assert (
        steps[0]["digest"]
        == next(x for x in first.manifest["layers"] if x["kind"] == "step")["digest"]
    )
    assert pool.store.serving_build("debian-bookworm").id == second.id
    keeper.stop()


def test_job_installs_a_prefetched_package_with_no_network(
    make_pool: Callable[..., Pool], image_base: Path
) -> None:
    # A child image on the prebuilt base: its own pre-fetch comes last, after the lists.
    images = (
        "  - name: debian-bookworm\n"
        "  - name: tools\n    parent: debian-bookworm\n    prefetch: [hello]\n"
    )
    pool = make_pool(
        min_ready=1, images=images, extra_label="  - {name: tools, image: tools, min-ready: 1}\n"
    )
    launcher, keeper = image_launcher(pool)
    settle(launcher, keeper, lambda: any(n.label == "tools" for n in pool.store.nodes(["ready"])))
    build = pool.store.serving_build("tools")
    assert build is not None and build.parent_build == "debian-bookworm-test"
    assert any(name.startswith("hello_") for name in build.manifest["prefetched"]["apt"])
    (node,) = direct.acquire(pool.config, pool.store, ["tools"], timeout=30)
    # Host-only: no default route out of the node.
    routes = run_on(node, "cat /proc/net/route").splitlines()[1:]
    assert not [r for r in routes if r.split()[1] == "00000000"], routes
    output = run_on(node, "apt-get install --no-download -y hello >/dev/null && hello")
    assert "Hello, world!" in output
    keeper.stop()


def test_stopping_mid_build_fails_it_as_interrupted_and_leaves_nothing(
    make_pool: Callable[..., Pool], image_base: Path
) -> None:
    pool = make_pool(min_ready=0, images=images_yaml(["echo started; sleep 60"]))
    launcher, keeper = image_launcher(pool)
    pool.store.request_build("debian-bookworm")
    settle(launcher, keeper, lambda: "started" in _log_of(newest(pool)))
    keeper.stop()
    stopped = newest(pool)
    assert stopped.state == B.FAILED
    assert stopped.reason.startswith("interrupted in step 1/1")
    scratch = pool.config.state_dir / "layers/.tmp"
    assert os.listdir(scratch) == []
    assert not [
        m for m in Path("/proc/self/mountinfo").read_text().splitlines() if str(scratch) in m
    ]
    # An interruption is no failure of the image: the next serve builds it again at
    # once, where a failed build would wait before another try.
    due = builds.due_builds(pool.config, pool.store, automatic=True)
    assert [(d.image, d.why) for d in due] == [("debian-bookworm", "its last build failed")]


def _log_of(build: BuildRow) -> str:
    try:
        return Path(build.log_path).read_text()
    except OSError:
        return ""


class UploadingDriver(LocalDriver):
    """The local driver, but a build is made available by an upload that takes a while
    and can fail, as a cloud's would; it records what it was asked."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.release = threading.Event()
        self.fail_next = False
        self.uploads: list[str] = []
        self.deleted: list[str] = []
        self.launched_from: list[str | None] = []

    def upload_image(self, upload: ImageUpload) -> Operation[str]:
        self.uploads.append(upload.build_id)
        fail, self.fail_next = self.fail_next, False

        def steps() -> Generator[float, None, str]:
            while not self.release.is_set():
                yield 0.01
            if fail:
                raise DriverError("the cloud said no")
            assert all(p.is_dir() for p in upload.layers)
            return f"cloud-{upload.build_id}"

        return StepOperation(steps())

    def delete_image(self, external_id: str) -> Operation[None]:
        self.deleted.append(external_id)
        return DoneOperation()

    def create(self, spec: NodeSpec) -> Operation[Instance]:
        self.launched_from.append(spec.image_external_id)
        return super().create(spec)


def test_launches_wait_for_the_upload_to_each_provider(
    make_pool: Callable[..., Pool], image_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uploads, "UPLOAD", Backoff(base=0.01, cap=0.02))
    pool = make_pool(min_ready=1, images=images_yaml(["echo up > /etc/fp-up"], keep=1))
    provider = pool.config.providers[0]
    driver = UploadingDriver(
        provider, pool.store.cluster_id, pool.config.state_dir / "providers/local"
    )
    launcher = launching.build(
        pool.config, pool.store, {"local": driver}, base_cache=IMAGE_CACHE, publish=False
    )
    assert launcher.images is not None
    keeper = launcher.images
    # The prebuilt build is uploaded already (tests/support.py): the pool fills from it.
    settle(launcher, keeper, lambda: len(pool.store.nodes(["ready"])) == 1)
    assert driver.launched_from == ["debian-bookworm-test"]

    driver.fail_next = True
    pool.store.request_build("debian-bookworm")
    settle(launcher, keeper, lambda: newest(pool).state == B.VALIDATING and driver.uploads)
    build = newest(pool)
    # Validated only where it is uploaded; the upload is under way.
    for _ in range(20):
        launcher.pass_once()
    assert [(u.provider, u.state) for u in pool.store.uploads(build_id=build.id)] == [
        ("local", "uploading")
    ]
    assert pool.store.build(build.id).state == B.VALIDATING
    # The first try fails; it is retried, then validation and serving follow.
    driver.release.set()
    settle(launcher, keeper, lambda: pool.store.build(build.id).state == B.READY)
    assert driver.uploads == [build.id, build.id]
    (upload,) = pool.store.uploads(build_id=build.id)
    assert (upload.state, upload.external_id) == ("ready", f"cloud-{build.id}")
    # keep: 1 retired the prebuilt build; its ready node is replaced from the new upload.
    settle(
        launcher, keeper, lambda: any(n.build_id == build.id for n in pool.store.nodes(["ready"]))
    )
    assert driver.launched_from[-1] == f"cloud-{build.id}"
    # The validation node booted from the upload too.
    assert driver.launched_from.count(f"cloud-{build.id}") == 2
    # The prebuilt build, unused now, is deleted, and its upload with it.
    settle(launcher, keeper, lambda: pool.store.build("debian-bookworm-test").state == B.DELETED)
    assert driver.deleted == ["debian-bookworm-test"]
    assert pool.store.uploads(build_id="debian-bookworm-test") == []
    keeper.stop()
