"""The layer pipeline on the session's cached base: step caching, files, env, and failures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from freshpool.config import Image
from freshpool.images.errors import ImageBuildError
from freshpool.images.layers import LayerStore
from freshpool.images.pipeline import BuildOptions, build_stack
from freshpool.images.plan import ParentStack
from tests.conftest import IMAGE_CACHE, TEST_IMAGE


def image(steps: list[Any], **fields: Any) -> Image:
    """The session's test image (same base layer) with these steps."""
    return Image(**{**TEST_IMAGE.model_dump(), "steps": steps, **fields})


def build(img: Image, store: LayerStore, where: Path, **options: Any) -> dict[str, Any]:
    lines: list[str] = []
    options.setdefault("retry_delay", 0.01)
    manifest = build_stack(
        img,
        store,
        where,
        options=BuildOptions(
            base_cache=IMAGE_CACHE, progress=lambda _s, line: lines.append(line), **options
        ),
    )
    manifest["_lines"] = lines
    return manifest


@pytest.fixture
def store(tmp_path: Path, image_build_dir: Path) -> LayerStore:
    # image_build_dir: the cached base exists before a build links it.
    return LayerStore(tmp_path / "layers")


def own_layers(store: LayerStore) -> set[str]:
    return {layer.digest for layer in store.layers() if not layer.path.is_symlink()}


def test_changing_the_last_step_rebuilds_only_that_layer(store: LayerStore, tmp_path: Path) -> None:
    steps = ["echo one > /etc/fp-one", "echo two > /etc/fp-two", "echo three > /etc/fp-last"]
    first = build(image(steps), store, tmp_path / "b1")
    kinds = [(layer["kind"], layer["cached"]) for layer in first["layers"]]
    # The base comes from the session cache; every step ran.
    assert kinds == [("base", True), ("step", False), ("step", False), ("step", False)]
    before = own_layers(store)
    assert len(before) == 3

    again = build(image(steps), store, tmp_path / "b2")
    assert [layer["cached"] for layer in again["layers"]] == [True] * 4
    assert again["digest"] == first["digest"]
    assert own_layers(store) == before

    changed = build(image([*steps[:2], "echo THREE > /etc/fp-last"]), store, tmp_path / "b3")
    digests = [layer["digest"] for layer in changed["layers"]]
    assert digests[:3] == [layer["digest"] for layer in first["layers"]][:3]
    assert digests[3] != first["layers"][3]["digest"]
    assert [layer["cached"] for layer in changed["layers"]] == [True, True, True, False]
    # Exactly one new layer on disk, and it holds the change.
    (new,) = own_layers(store) - before
    assert new == digests[3]
    assert (store.path(new) / "etc/fp-last").read_text() == "THREE\n"
    assert sorted(os.listdir(store.path(new))) == ["etc"]
    # The stack is top first, and a rebuild's manifest says what it built.
    assert changed["stack"][0] == str(store.path(new))
    assert changed["new_bytes"] > 0 and "python3" in changed["installed"]
    assert "cached: layer" in (tmp_path / "b3/build.log").read_text()


def test_files_and_env_reach_the_steps_and_their_content_keys_the_cache(
    store: LayerStore, tmp_path: Path
) -> None:
    source = tmp_path / "ci.conf"
    source.write_text("v1\n")
    files = [
        {"dest": "/etc/fp/ci.conf", "source": str(source), "mode": "0600"},
        {"dest": "/etc/fp/inline", "content": "hello\n"},
    ]
    steps = [
        {
            "run": "cat /etc/fp/ci.conf /etc/fp/inline > /etc/fp-seen\n"
            "echo $FP_A$FP_B >> /etc/fp-seen",
            "env": {"FP_B": "b"},
        }
    ]
    img = image(steps, files=files, env={"FP_A": "a"})
    first = build(img, store, tmp_path / "b1")
    files_layer, step_layer = (Path(store.path(x["digest"])) for x in first["layers"][1:])
    assert (files_layer / "etc/fp/ci.conf").read_text() == "v1\n"
    assert oct((files_layer / "etc/fp/ci.conf").stat().st_mode & 0o777) == "0o600"
    assert (files_layer / "etc/fp/ci.conf").stat().st_uid == 0
    assert (step_layer / "etc/fp-seen").read_text() == "v1\nhello\nab\n"

    # A changed file makes a new files layer, and everything after it runs again.
    source.write_text("v2\n")
    second = build(img, store, tmp_path / "b2")
    assert [x["cached"] for x in second["layers"]] == [True, False, False]
    step_layer = store.path(second["layers"][2]["digest"])
    assert (step_layer / "etc/fp-seen").read_text() == "v2\nhello\nab\n"
    # So does a changed environment.
    third = build(image(steps, files=files, env={"FP_A": "A"}), store, tmp_path / "b3")
    assert [x["cached"] for x in third["layers"]] == [True, True, False]


def test_a_failing_step_names_itself_its_exit_code_and_its_output(
    store: LayerStore, tmp_path: Path
) -> None:
    steps = ["echo fine > /etc/fp-fine", {"name": "breaks", "run": "echo about to fail\nexit 3"}]
    with pytest.raises(ImageBuildError) as caught:
        build(image(steps), store, tmp_path / "b1")
    error = caught.value
    assert error.stage == "step 2/2 (breaks)"
    assert error.exit_code == 3
    assert "about to fail" in error.log_tail
    assert "step 2/2 (breaks) exited with status 3" in str(error)
    assert "about to fail" in str(error)
    log = (tmp_path / "b1/build.log").read_text()
    assert "FAILED:" in log and "about to fail" in log
    # Nothing of the failed step remains; the step before is cached for the next try.
    assert os.listdir(store.scratch_root) == []
    assert len(own_layers(store)) == 1
    retry = build(image([steps[0], "true"]), store, tmp_path / "b2")
    assert [x["cached"] for x in retry["layers"]] == [True, True, False]


def test_an_unreachable_mirror_is_retried_then_fails_with_the_reason(
    store: LayerStore, tmp_path: Path
) -> None:
    step = (
        "echo 'deb http://127.0.0.1:9/debian bookworm main' > /etc/apt/sources.list\n"
        "rm -rf /etc/apt/sources.list.d\n"
        "apt-get -o Acquire::Retries=0 update --error-on=any\n"
    )
    with pytest.raises(ImageBuildError) as caught:
        build(image([step]), store, tmp_path / "b1", attempts=3)
    error = caught.value
    assert "could not download after 3 tries" in error.reason
    assert "127.0.0.1" in error.reason
    log = (tmp_path / "b1/build.log").read_text()
    assert log.count("could not download (try") == 2
    assert os.listdir(store.scratch_root) == []


def test_a_full_disk_fails_the_step_and_removes_its_partial_layer(
    store: LayerStore, tmp_path: Path
) -> None:
    # The build node's writes land on a 16 MB file system.
    store.scratch_root.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(store.scratch_root)], check=True
    )
    try:
        with pytest.raises(ImageBuildError) as caught:
            build(image(["dd if=/dev/zero of=/fp-big bs=1M count=64"]), store, tmp_path / "b1")
        error = caught.value
        assert error.disk_full
        assert "disk is full" in str(error)
        # One try only: retrying cannot help, and the partial layer is gone.
        assert "try 1 of" not in (tmp_path / "b1/build.log").read_text()
        assert os.listdir(store.scratch_root) == []
        assert own_layers(store) == set()
    finally:
        subprocess.run(["umount", str(store.scratch_root)], check=False)


def test_a_child_image_builds_on_its_parents_layers(store: LayerStore, tmp_path: Path) -> None:
    parent = build(image(["echo parent > /etc/fp-parent"]), store, tmp_path / "p")
    stack = ParentStack(
        image="debian-bookworm",
        build_id="p-1",
        layers=tuple(Path(p) for p in parent["stack"]),
        digest=parent["digest"],
        size_bytes=parent["size_bytes"],
    )
    child = Image(
        name="child", parent="debian-bookworm", steps=["cat /etc/fp-parent > /etc/fp-child"]
    )
    manifest = build_stack(child, store, tmp_path / "c", stack, BuildOptions())
    assert manifest["parent"]["build"] == "p-1"
    assert [x["kind"] for x in manifest["layers"]] == ["step"]
    assert manifest["stack"][1:] == parent["stack"]
    top = Path(manifest["stack"][0])
    assert (top / "etc/fp-child").read_text() == "parent\n"
    assert manifest["size_bytes"] > parent["size_bytes"]
