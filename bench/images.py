"""`python -m bench.images`: time the image pipeline with real builds and a real validation node.

Figures:
  cold_build_s     request to ready with nothing cached: debootstrap (downloading every
                   .deb), the steps, the snapshots, the validation node
  warm_rebuild_s   the same image after its last step changed: cached layers, one step
  validate_s       of the warm rebuild: boot a node from the new build, run `validate`
  layer sizes      every layer on disk (apparent and allocated), and what the two
                   builds take together (shared layers counted once)

`--quick` takes the debootstrap base from the test cache, so "cold" means the steps only.
Results go to bench/results/images.json (the run before is printed beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from freshpool.config import Config, parse
from freshpool.core.states import BuildState
from freshpool.drivers.base import Driver, load_driver
from freshpool.launcher.context import Shared
from freshpool.launcher.images import ImageController
from freshpool.store import BuildRow, Store

RESULTS = Path(__file__).parent / "results" / "images.json"
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))
SUBNET = "10.216.40.0/24"
# The test image's base (python3, make pre-fetched), so --quick can reuse its cache.
CONFIG = """
state-dir: {state}
providers:
  - name: local
    max-nodes: 4
    network: {{subnet: {subnet}}}
labels:
  - name: bench
    image: debian-bookworm
    min-ready: 0
images:
  - name: debian-bookworm
    packages: [python3]
    prefetch: [make]
    steps:
      - name: tools
        run: apt-get update && apt-get install -y --no-install-recommends jq
      - name: marker
        run: echo {marker} > /etc/bench-marker
    validate: ["jq --version", "grep -qx {marker} /etc/bench-marker"]
"""


def configure(root: Path, marker: str) -> Config:
    text = CONFIG.format(state=root / "state", subnet=SUBNET, marker=marker)
    return parse(text, "bench-images.yaml")


def build(
    config: Config, store: Store, drivers: dict[str, Driver], base_cache: Path | None
) -> tuple[BuildRow, float]:
    """Request a build and run keeper passes until it is ready; seconds from request to ready."""
    keeper = ImageController(Shared(config, store, drivers), automatic=False, base_cache=base_cache)
    keeper.start()
    name = config.images[0].name
    before = {b.id for b in store.builds(name)}
    started = time.perf_counter()
    store.request_build(name)
    while True:
        keeper.tick()
        fresh = [b for b in store.builds(name) if b.id not in before]
        if fresh and fresh[0].state in (BuildState.READY, BuildState.FAILED) and not keeper.busy:
            seconds = time.perf_counter() - started
            break
        time.sleep(0.01)
    keeper.tick()
    row = store.build(fresh[0].id)
    if row.state != BuildState.READY:
        sys.exit(f"build {row.id} failed: {row.reason}")
    return row, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="debootstrap base from the test cache")
    parser.add_argument("--no-save", action="store_true", help="do not write results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark builds images and boots nodes: it needs root")
    base_cache = IMAGE_CACHE if args.quick else None
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="freshpool-bench-images-") as tmp:
        root = Path(tmp)
        config = configure(root, "one")
        store = Store.open(config.state_dir)
        drivers = {
            p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers
        }
        try:
            cold, cold_s = build(config, store, drivers, base_cache)
            warm, warm_s = build(configure(root, "two"), store, drivers, base_cache)
            figures["cold_build_s"] = round(cold_s, 2)
            figures["warm_rebuild_s"] = round(warm_s, 2)
            figures["warm_validate_s"] = float(warm.reason.split()[-2])
            figures["warm_layers_built"] = sum(not x["cached"] for x in warm.manifest["layers"])
            layers = {x["digest"]: x for b in (cold, warm) for x in b.manifest["layers"]}
            print(f"{'layer':<14}{'kind':<10}{'step':<20}{'apparent MB':>12}{'on disk MB':>12}")
            for layer in layers.values():
                print(
                    f"{layer['digest'][7:19]:<14}{layer['kind']:<10}{layer['name'][:19]:<20}"
                    f"{layer['size_bytes'] / 1e6:>12.2f}{layer['disk_bytes'] / 1e6:>12.2f}"
                )
                short = layer["name"].split("(")[-1].rstrip(")").replace(" ", "_")
                key = f"layer_{short}_{layer['digest'][7:13]}_mb"
                figures[key] = round(layer["disk_bytes"] / 1e6, 2)
            both = sum(x["disk_bytes"] for x in layers.values())
            separate = sum(b.manifest["disk_bytes"] for b in (cold, warm))
            figures["two_builds_on_disk_mb"] = round(both / 1e6, 1)
            figures["two_builds_if_unshared_mb"] = round(separate / 1e6, 1)
            timings = cold.manifest["timings"]
            for name in ("base", "step 1/2 (tools)", "step 2/2 (marker)"):
                if name in timings:
                    figures[f"cold_{name.split(' (')[-1].rstrip(')')}_s"] = timings[name]
        finally:
            for driver in drivers.values():
                for instance in driver.list_instances():
                    driver.delete(instance.external_id).wait(timeout=60)
                teardown = getattr(driver, "teardown", None)
                if teardown is not None:
                    teardown()
            store.close()
            shutil.rmtree(root, ignore_errors=True)
    report(figures, args.no_save, "quick" if args.quick else "cold")


def report(figures: dict[str, Any], no_save: bool, mode: str) -> None:
    previous: dict[str, Any] = {}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text()).get(mode, {})
    print(f"\n{'figure (' + mode + ')':<40}{'now':>10}{'previous':>10}")
    for key, value in figures.items():
        print(f"{key:<40}{value:>10}{previous.get(key, '-'):>10}")
    if no_save:
        return
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[mode] = figures
    saved[f"{mode}_when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
